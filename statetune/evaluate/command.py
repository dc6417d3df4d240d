"""``statetune eval``: task loss and generation metrics, base model and states side by side."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from statetune.data.loader import TokenDataset
from statetune.device import resolve_device
from statetune.errors import DataError, OptionError
from statetune.evaluate.loss import dataset_loss
from statetune.evaluate.metrics import generation_scores
from statetune.evaluate.report import markdown_report
from statetune.fileio import atomic_write

log = logging.getLogger("statetune.eval")


def _h(text: str, **kw) -> dict:
    return {"help": text, **kw}


@dataclass
class EvalOptions:
    """Masked loss and perplexity (and, with --generate, BLEU/chrF/ROUGE-L) with and without states."""

    model: str | None = field(default=None, metadata=_h("Base model checkpoint."))
    data: str | None = field(default=None, metadata=_h("Tokenized JSONL (from `statetune prepare`)."))
    state: list[str] = field(default_factory=list, metadata=_h("State files to compare with the base model."))
    generate: bool = field(default=False, metadata=_h("Also generate for each distinct prompt and score it."))
    max_prompts: int | None = field(default=None, metadata=_h("Generate for at most N distinct prompts."))
    max_tokens: int = field(default=96, metadata=_h("Longest generation."))
    examples: int = field(default=3, metadata=_h("Side-by-side examples in the report."))
    batch_size: int = field(default=8, metadata=_h("Sequences per batch for the loss."))
    ctx_len: int = field(default=1024, metadata=_h("Segment length for long sequences."))
    out: str | None = field(default=None, metadata=_h("Write OUT.md and OUT.json (default: print only)."))
    plot: str | None = field(default=None, metadata=_h("Instead: draw RUN_DIR's loss curves to RUN_DIR/curves.png."))
    tokenizer: str = field(default="auto", metadata=_h("world, bytes, or auto."))
    device: str = field(default="cpu", metadata=_h("Torch device."))

    def __post_init__(self) -> None:
        if self.plot is None and (self.model is None or self.data is None):
            raise OptionError("--model and --data are required (or --plot RUN_DIR)")
        for name in ("batch_size", "ctx_len", "max_tokens"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise OptionError(f"--max-prompts: must be at least 1, got {self.max_prompts} (scores over no "
                              f"prompts mean nothing; leave --generate off to skip generation)")
        if self.examples < 0:
            raise OptionError(f"--examples: must not be negative, got {self.examples}")


def prompts_and_references(data: TokenDataset, stop_ids: set[int]) -> list[tuple[list[int], list[list[int]]]]:
    """Distinct prompts (the ids before the first loss token) with every reference completion that follows
    them, in first-seen order; end markers are removed from references."""
    groups: dict[tuple[int, ...], list[list[int]]] = {}
    for i in range(len(data)):
        ex = data[i]
        cut = next((j for j, m in enumerate(ex.mask) if m), None)
        if cut is None or cut == 0:
            continue
        ref = [t for t in ex.ids[cut:] if t not in stop_ids]
        groups.setdefault(tuple(ex.ids[:cut]), []).append(ref)
    return [(list(p), refs) for p, refs in groups.items()]


def evaluate(opts: EvalOptions) -> int:
    """Run the comparison; prints a Markdown table and writes OUT.md / OUT.json when --out is given."""
    if opts.plot is not None:
        from statetune.evaluate.plot import plot_run

        print(plot_run(opts.plot))
        return 0
    from statetune.evaluate.generation import greedy_batch
    from statetune.model.checkpoint import load_model
    from statetune.runtime import dataset_meta, pick_tokenizer
    from statetune.tuning.formats import read_any

    model = load_model(opts.model, device=resolve_device(opts.device))
    data = TokenDataset(opts.data, model.config.vocab_size)
    if data.loss_tokens == 0:
        raise DataError(f"--data {opts.data}: no record has a loss token (every mask is 0 after the first "
                        f"token), so there is no loss or perplexity to measure")
    meta = dataset_meta(opts.data)
    tok = pick_tokenizer(opts.tokenizer, meta, model.config.vocab_size)
    stop = set((meta.get("stop") or {}).get("ids") or [tok.eot_id])
    candidates = [("base (zero state)", None)]
    for path in opts.state:
        candidates.append((Path(path).stem, read_any(path, model).state))
    groups = prompts_and_references(data, stop)[: opts.max_prompts] if opts.generate else []
    if opts.generate and not groups:
        raise DataError(f"--generate: no record of {opts.data} has a prompt (tokens with mask 0 before its "
                        f"first loss token), so there is nothing to generate from")
    rows, outputs = [], {}
    for name, state in candidates:
        res = dataset_loss(model, data, state, opts.batch_size, opts.ctx_len)
        row = {"name": name, "loss": res.loss, "ppl": res.ppl, "loss_tokens": res.loss_tokens}
        if opts.generate:
            hyps = greedy_batch(model, tok, [p for p, _ in groups], state, opts.max_tokens, sorted(stop),
                                batch_size=opts.batch_size)
            refs = [[tok.decode(r).strip() for r in refs] for _, refs in groups]
            row.update(generation_scores(hyps, refs), prompts=len(groups))
            outputs[name] = hyps
        rows.append(row)
        log.info("%s: loss %.4f", name, res.loss)
    examples = [{"prompt": tok.decode(p), "references": [tok.decode(r) for r in refs],
                 "outputs": {n: outputs[n][i] for n in outputs}} for i, (p, refs) in enumerate(groups[: opts.examples])]
    report = {"model": Path(opts.model).name, "data": Path(opts.data).name, "rows": rows, "examples": examples}
    md = markdown_report(report)
    print(md)
    if opts.out:
        atomic_write(opts.out + ".md", lambda tmp: Path(tmp).write_text(md))
        atomic_write(opts.out + ".json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2,
                                                                                     ensure_ascii=False)))
    return 0


__all__ = ["EvalOptions", "evaluate"]
