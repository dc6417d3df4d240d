"""``statetune eval``: task loss and generation metrics, base model and states side by side; ``statetune eval
plot RUN_DIR``: a run's loss curves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from statetune.errors import DataError, OptionError
from statetune.evaluate.generation import DEFAULT_PENALTIES
from statetune.options import flag, h
from statetune.outpaths import check_name, check_output
from statetune.runtime import STATE_SCALE_HELP, ModelOptions, check_state_scale

__all__ = ["EvalOptions", "PlotOptions", "evaluate", "plot"]


@dataclass(kw_only=True)
class EvalOptions(ModelOptions):
    """Masked loss and perplexity (and, with --generate, BLEU/chrF/ROUGE-L) with and without states."""

    data: str = field(metadata=h("Tokenized JSONL (from `statetune prepare`)."))
    state: list[str] = field(default_factory=list, metadata=h("State files to compare with the base model."))
    state_scale: list[float] = field(default_factory=lambda: [1.0], metadata=h(
        STATE_SCALE_HELP + " Several factors compare each state at each (a sweep on validation data)."))
    generate: bool = field(default=False, metadata=h("Also generate for each distinct prompt and score it."))
    max_prompts: int | None = field(default=None, metadata=h("Generate for at most N distinct prompts."))
    max_tokens: int = field(default=96, metadata=h("Longest generation."))
    repetition_penalty: float = field(default=DEFAULT_PENALTIES["repetition_penalty"], metadata=h(
        "With --generate: divide the positive logits of tokens already generated (1 = off)."))
    presence_penalty: float = field(default=DEFAULT_PENALTIES["presence_penalty"], metadata=h(
        "With --generate: subtract from the logit of every token already generated."))
    frequency_penalty: float = field(default=DEFAULT_PENALTIES["frequency_penalty"], metadata=h(
        "With --generate: subtract this times a token's count so far from its logit."))
    penalty_decay: float = field(default=DEFAULT_PENALTIES["penalty_decay"], metadata=h(
        "With --generate: fade the counts by this factor per generated token (1 = never)."))
    examples: int = field(default=3, metadata=h("Side-by-side examples in the report."))
    batch_size: int = field(default=8, metadata=h("Sequences per batch for the loss."))
    ctx_len: int = field(default=1024, metadata=h("Segment length for long sequences."))
    out: str | None = field(default=None, metadata=h("Write OUT.md and OUT.json (default: print only)."))

    def __post_init__(self) -> None:
        self.check_model_options()
        if not self.state_scale:
            raise OptionError("--state-scale: give at least one factor (1 = the states as trained)")
        for scale in self.state_scale:
            check_state_scale(scale)
        for name in ("batch_size", "ctx_len", "max_tokens"):
            if getattr(self, name) < 1:
                raise OptionError(f"{flag(name)}: must be at least 1, got {getattr(self, name)}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise OptionError(f"--max-prompts: must be at least 1, got {self.max_prompts} (scores over no "
                              f"prompts mean nothing; leave --generate off to skip generation)")
        if self.out is not None:
            check_name(self.out, "--out")  # OUT is a prefix of OUT.md and OUT.json
            inputs = [("--data", self.data), ("--model", self.model), *(("--state", s) for s in self.state)]
            for ext in (".md", ".json"):
                check_output(self.out + ext, "--out", inputs)
        if self.examples < 0:
            raise OptionError(f"--examples: must not be negative, got {self.examples}")
        from statetune.infer.sampling import SamplingError, SamplingParams

        try:
            SamplingParams(**self.penalties())
        except SamplingError as e:
            raise OptionError(f"{flag(e.field)}: {e.detail}, got {e.value!r}") from None

    def penalties(self) -> dict[str, float]:
        """The decoding penalties of ``--generate`` (``SamplingParams`` fields)."""
        return {k: getattr(self, k) for k in DEFAULT_PENALTIES}


def evaluate(opts: EvalOptions) -> int:
    """Run the comparison; prints a Markdown table and writes OUT.md / OUT.json when --out is given."""
    from statetune.data.loader import TokenDataset
    from statetune.errors import state_source
    from statetune.evaluate.compare import compare_states
    from statetune.evaluate.report import markdown_report, state_labels
    from statetune.model.state import RWKVState
    from statetune.runtime import dataset_meta, pick_tokenizer
    from statetune.tuning.formats import read_any

    model = opts.load_model()
    if opts.generate:
        model.use_batch_layout()  # batched greedy decoding: weights blocked once for oneDNN on CPU
    data = TokenDataset(opts.data, model.config.vocab_size)
    meta = dataset_meta(opts.data)
    tok = pick_tokenizer(opts.tokenizer, meta, model.config.vocab_size)
    stop_meta = meta.get("stop") if isinstance(meta.get("stop"), dict) else {}
    ids = stop_meta.get("ids") or [tok.eot_id]
    vocab = model.config.vocab_size
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab] \
        if isinstance(ids, list) else [ids]
    if bad:  # named by the file and field the user can fix, not by the engine's internal field
        where = Path(opts.data).with_name(Path(opts.data).name.removesuffix(".jsonl") + ".meta.json")
        raise DataError(f"{where}: stop.ids: {bad[0]!r} is not a token id of the model (0..{vocab - 1})")
    stop = set(ids)
    candidates: list[tuple[str, RWKVState | None, str]] = [("base (zero state)", None, state_source(None))]
    for path, name in zip(opts.state, state_labels(opts.state), strict=True):
        state = read_any(path, model).state
        for scale in opts.state_scale:
            label = name if opts.state_scale == [1.0] else f"{name} x{scale:g}"
            candidates.append((label, state.scaled(scale), state_source(path, scale)))
    result = compare_states(model, tok, data, candidates, stop, generate=opts.generate, max_prompts=opts.max_prompts,
                            max_tokens=opts.max_tokens, examples=opts.examples, batch_size=opts.batch_size,
                            ctx_len=opts.ctx_len, penalties=opts.penalties())
    report = {"model": Path(opts.model).name, "data": Path(opts.data).name, **result,
              **({"decoding": {"greedy": True, **opts.penalties()}} if opts.generate else {})}
    md = markdown_report(report)
    print(md)
    if opts.out:
        write_report(opts.out, md, json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False))
    return 0


def write_report(out: str, md: str, js: str) -> None:
    """Write ``OUT.md`` and ``OUT.json`` as one pair: both are replaced or neither, and two evals writing the
    same ``--out`` take turns, so the pair always comes from one of them."""
    from statetune.fileio import AtomicGroup
    from statetune.locking import lock_beside, waiting

    with AtomicGroup([out + ".md", out + ".json"]) as group, group.naming_destinations():
        group.temps[0].write_text(md)
        group.temps[1].write_text(js)
        with waiting(lock_beside(out)):
            group.commit()


@dataclass
class PlotOptions:
    """Draw a training run's loss curves (train, validation, zero-state baseline) to RUN_DIR/curves.png."""

    run_dir: str = field(metadata=h("Run directory of `statetune train` (holds metrics.jsonl).", positional=True))


def plot(opts: PlotOptions) -> int:
    """Draw the curves and print where they went."""
    from statetune.evaluate.plot import plot_run

    print(plot_run(opts.run_dir))
    return 0
