"""``statetune demo``: tune a state on the shipped small model and show what it changed, in minutes.

Prepares a small E2E subset (split by meaning representation), trains a state on it, then prints the
validation loss and BLEU before and after, with examples side by side, and the commands to use the state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from statetune.device import resolve_device
from statetune.errors import OptionError, StatetuneError
from statetune.options import flag, h
from statetune.runtime import DEVICE_HELP

PROMPT = "Input: {mr}\n\nResponse:"
COMPLETION = " {ref}"


def asset(*parts: str) -> Path:
    """A file shipped inside the package (``statetune/assets``)."""
    return Path(str(resources.files("statetune").joinpath("assets", *parts)))


@dataclass
class DemoOptions:
    """Tune a state on the shipped small RWKV-7 with E2E data and compare it with the untuned model."""

    out: str = field(default="statetune-demo", metadata=h("Directory for data, run and state."))
    model: str | None = field(default=None, metadata=h("Model checkpoint (default: the shipped one)."))
    steps: int | None = field(default=None, metadata=h("Training steps (default: 160; 8 with --quick)."))
    prompts: int | None = field(default=None, metadata=h("Held-out prompts scored with BLEU (default: 32; 4 with "
                                                         "--quick)."))
    lr: float = field(default=30.0, metadata=h("Peak learning rate of the state (default 30: the best at 160 steps "
                                               "for this small model in the learning curves of "
                                               "benchmarks/RESULTS.md, far above train's 1.0)."))
    quick: bool = field(default=False, metadata=h("A sub-minute smoke run."))
    device: str = field(default="cpu", metadata=h(DEVICE_HELP))

    def __post_init__(self) -> None:
        for name in ("steps", "prompts"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise OptionError(f"{flag(name)}: must be at least 1, got {v}")
        if not self.lr > 0:
            raise OptionError(f"--lr: must be positive, got {self.lr}")


def demo(opts: DemoOptions) -> int:
    """Run the demo; returns 0."""
    from tqdm import tqdm

    from statetune.data.formats import Format
    from statetune.data.loader import TokenDataset
    from statetune.data.prepare import PrepareSettings, prepare_dataset, resolve_tokenizer
    from statetune.evaluate.compare import prompts_and_references
    from statetune.evaluate.generation import DEFAULT_PENALTIES, greedy_batch
    from statetune.evaluate.metrics import generation_scores
    from statetune.model.checkpoint import load_model
    from statetune.tokenizer import tokenizer_for_vocab
    from statetune.train.config import TrainConfig
    from statetune.train.loop import train
    from statetune.train.metrics import read_metrics
    from statetune.tuning.statefile import load_state

    t0 = time.perf_counter()
    model_path = Path(opts.model) if opts.model else asset("tiny-rwkv7", "model.pth")
    if not model_path.is_file():
        raise StatetuneError(f"{model_path}: model not found (the shipped model lives in statetune/assets)")
    steps = opts.steps or (8 if opts.quick else 160)
    n_prompts = opts.prompts or (4 if opts.quick else 32)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("statetune").setLevel(logging.WARNING)

    print(f"[1/4] preparing E2E data (CC BY-SA 4.0, Novikova et al. 2017) for {model_path.name}", flush=True)
    data = out / "data" / "e2e"
    train_path, val_path = Path(f"{data}.jsonl"), Path(f"{data}.val.jsonl")
    settings = PrepareSettings(format=Format.TEMPLATE, prompt_template=PROMPT, completion_template=COMPLETION,
                               val_fraction=0.15, split_by="mr")
    prepare_dataset([asset("e2e", "e2e_subset.csv")], (train_path, val_path, Path(f"{data}.meta.json")),
                    resolve_tokenizer("auto", str(model_path)), settings)

    print(f"[2/4] tuning the initial state for {steps} steps (every weight frozen)", flush=True)
    run = out / "run"
    if run.exists() and (run / "config.toml").exists():
        import shutil

        shutil.rmtree(run)
    train(TrainConfig(model=str(model_path), train_data=str(train_path), val_data=str(val_path), out=str(run),
                       max_steps=steps, batch_size=8, lr=opts.lr, lr_final=opts.lr / 100,
                       eval_every=max(1, steps // 3), save_every=steps, samples=0,
                       val_batches=4 if opts.quick else 12, warmup_steps=min(10, steps), device=opts.device))
    vals = [e for e in read_metrics(run / "metrics.jsonl") if e["type"] == "val"]
    before, after = vals[0]["loss"], min(e["loss"] for e in vals[1:])

    print(f"[3/4] generating for {n_prompts} held-out meaning representations, untuned and tuned (greedy, "
          f"presence/frequency penalties {DEFAULT_PENALTIES['presence_penalty']:g}, decay "
          f"{DEFAULT_PENALTIES['penalty_decay']:g})", flush=True)
    model = load_model(model_path, device=resolve_device(opts.device))
    tok = tokenizer_for_vocab(model.config.vocab_size)
    state = load_state(run / "state-best.safetensors", model).state
    groups = prompts_and_references(TokenDataset(val_path, model.config.vocab_size), {tok.eot_id})[:n_prompts]
    prompts = [p for p, _ in groups]
    refs = [[tok.decode(r).strip() for r in rs] for _, rs in groups]
    with tqdm(total=2 * len(prompts), unit="prompt", dynamic_ncols=True) as bar:
        base = greedy_batch(model, tok, prompts, None, 96, [tok.eot_id], ["\n"], progress=bar,
                            penalties=DEFAULT_PENALTIES)
        tuned = greedy_batch(model, tok, prompts, state, 96, [tok.eot_id], ["\n"], progress=bar,
                             penalties=DEFAULT_PENALTIES)
    s_base, s_tuned = generation_scores(base, refs), generation_scores(tuned, refs)

    print("[4/4] results\n")
    print(f"{'':24}{'untuned':>10}{'tuned':>10}")
    print(f"{'validation loss':24}{before:10.3f}{after:10.3f}")
    print(f"{'BLEU (held-out MRs)':24}{s_base['bleu']:10.1f}{s_tuned['bleu']:10.1f}")
    print(f"{'chrF':24}{s_base['chrf']:10.1f}{s_tuned['chrf']:10.1f}")
    for i in range(min(3, len(prompts))):
        print(f"\n--- example {i + 1}\ninput:     {tok.decode(prompts[i]).strip()}\nuntuned:   {base[i]!r}"
              f"\ntuned:     {tuned[i]!r}\nreference: {refs[i][0]!r}")
    state_path = out / "e2e-state.safetensors"
    state_path.write_bytes((run / "state-best.safetensors").read_bytes())
    m = model_path
    print(f"\nsaved the tuned state to {state_path} ({state_path.stat().st_size / 1e3:.0f} kB) in "
          f"{time.perf_counter() - t0:.0f} s. Use it:\n"
          f"  statetune generate --model {m} --state {state_path} --prompt \"name[The Eagle], food[French]\" "
          f"--temperature 0 --presence-penalty 0.2 --frequency-penalty 0.2 --penalty-decay 0.996\n"
          f"  statetune eval --model {m} --data {val_path} --state {state_path} --generate\n"
          f"  statetune chat --model {m} --state {state_path}")
    return 0
