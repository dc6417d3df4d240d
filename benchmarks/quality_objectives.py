"""Objectives for states: does any training objective make a tuned state follow its input?

On the shipped tiny RWKV-7 and the E2E dev set split by meaning representation (as the quality study,
``benchmarks/quality/split.py``), it trains a direct WKV state with each objective at an equal budget
(``--steps`` optimizer steps of ``--batch-size``; a two-stage method's stages add up to it) and scores each on
the held-out MRs: test loss, BLEU, chrF, slot error rate and the share of distinct outputs, decoded as
``statetune eval --generate`` does (greedy with presence/frequency penalties 0.2, decay 0.996).

- ``sft``: next-token loss (LR 30, the study's best at 160 steps);
- ``sft+dpo``: ``--steps - --dpo-steps`` of SFT, then ``--dpo-steps`` of DPO (beta 0.1) from that state on
  pairs whose rejected side is a reference of another MR that contradicts this one; LR swept on seed 0;
- ``orpo``: ORPO from zeros on the same pairs;
- ``distill-full`` / ``distill-lora``: distilled from the fully fine-tuned model / from LoRA merged into the
  weights (teachers trained with ``benchmarks/quality/methods.py`` at the study's best rates, one seed,
  saved as checkpoints; their training is not counted in the student's budget, and they are scored too);
- ``layers-A-B``: SFT of layers A..B's states only (``train --layers A-B``), the rest stay zero.

Resumable: every finished run is appended to ``benchmarks/results/quality_objectives.json`` (under a lock)
and skipped when the script runs again; two processes may run at once with disjoint ``--methods``.

    python benchmarks/quality_objectives.py --threads 1 --methods sft,sft+dpo,orpo
    python benchmarks/quality_objectives.py --threads 1 --methods distill-full,layers-0-2
    python benchmarks/quality_objectives.py --table          # print the table of what is recorded
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import methods, objectives, split  # noqa: E402
from quality.bench import REPO, rel  # noqa: E402
from quality.curves import budget_for  # noqa: E402
from quality.measure import Probe  # noqa: E402
from quality.objectives_results import append, find, read, table, update  # noqa: E402

from statetune.model.checkpoint import load_model  # noqa: E402
from statetune.tokenizer import tokenizer_for_vocab  # noqa: E402

#: The built-in LR grid of each objective (the first is the only one with --quick); a grid of several rates
#: is swept on seed 0 and the best on validation (the objective's own loss) is used for every seed.
GRID = {"sft": [30.0], "sft+dpo": [3.0, 10.0, 30.0], "orpo": [30.0], "distill-full": [30.0],
        "distill-lora": [30.0], "layers": [30.0]}
TEACHER_LR = {"full": 1e-3, "lora": 1e-2}  # the study's best rates at 160 steps
DEFAULT_METHODS = "sft,sft+dpo,orpo,distill-full,distill-lora,layers-0-2,layers-3-5,layers-0-1"


def family(method: str) -> str | None:
    if re.fullmatch(r"layers-\d+-\d+", method):
        return "layers"
    return method if method in GRID and method != "layers" else None


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "statetune/assets/tiny-rwkv7/model.pth")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/e2e/devset.csv")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=160, help="optimizer steps of every method, stages summed")
    ap.add_argument("--dpo-steps", type=int, default=None, help="sft+dpo: steps of the DPO stage (default a quarter)")
    ap.add_argument("--teacher-steps", type=int, default=160, help="steps of the teachers' weight training")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]",
                    help="LR grid of one method instead of the built-in one (repeatable)")
    ap.add_argument("--val-records", type=int, default=48)
    ap.add_argument("--test-prompts", type=int, default=None, help="test MRs generated from (default all)")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny budget, one seed, one LR: a smoke test")
    ap.add_argument("--results", type=Path, default=None, help="default benchmarks/results/quality_objectives"
                                                                "[_quick].json")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="states and teachers kept between invocations (default: a folder in the temp dir)")
    ap.add_argument("--table", action="store_true", help="only print the table of the results file")
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if family(m) is None]
    if bad:
        ap.error(f"--methods: unknown {bad} (choose from {DEFAULT_METHODS}, or layers-A-B)")
    grids = {}
    for item in args.lr:
        name, _, rates = item.partition("=")
        try:
            grids[name] = [float(r) for r in rates.split(",") if r.strip()]
        except ValueError:
            grids[name] = []
        if family(name) is None or not grids[name] or min(grids[name]) <= 0:
            ap.error(f"--lr {item}: expected METHOD=LR[,LR...] with a known method and positive rates")
    args.grids = grids
    if args.quick:
        args.steps, args.dpo_steps, args.teacher_steps, args.batch_size, args.seeds = 4, 2, 4, 2, 1
        args.val_records, args.test_prompts, args.max_new_tokens = 4, 3, 12
    args.dpo_steps = args.dpo_steps or max(1, args.steps // 4)
    if not 0 < args.dpo_steps < args.steps:
        ap.error(f"--dpo-steps {args.dpo_steps}: must be between 0 and --steps {args.steps}")
    stem = "quality_objectives_quick" if args.quick else "quality_objectives"
    args.results = args.results or REPO / "benchmarks/results" / f"{stem}.json"
    args.work_dir = args.work_dir or Path(tempfile.gettempdir()) / f"statetune-{stem}"
    return args


# -- the runs ------------------------------------------------------------------------------------------------

class Study:
    """The shared context of one invocation: data, base model, probe, budget, and the results file."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.t0 = args, time.perf_counter()
        work = args.work_dir
        (work / "states").mkdir(parents=True, exist_ok=True)
        data_dir = work / f"data-{os.getpid()}"  # per process: two may tokenize at once
        self.data = split.build(args.data, data_dir, args.model, val_records=args.val_records, test_refs=2,
                                test_prompts=args.test_prompts, shots=3)
        s = self.data.split
        self.pairs = objectives.prepare_pairs(
            objectives.pair_rows(s.train, split.round_robin(s.train, None)), data_dir / "pairs", args.model)
        self.val_pairs = objectives.prepare_pairs(
            objectives.pair_rows(s.val, split.round_robin(s.val, args.val_records)), data_dir / "pairs_val",
            args.model)
        self.data_dir = data_dir
        self.model = load_model(args.model)
        self.tok = tokenizer_for_vocab(self.model.config.vocab_size)
        self.probe = Probe(self.data.test, self.data.test_groups, [], args.batch_size, args.max_new_tokens, 0)
        self.ctx = methods.Context(args.model, self.model, self.data.train, self.data.val, "", work, 0.0, 0.0,
                                   lora_rank=methods.lora_rank_for(self.model, self.n_trainable(None)))
        self.budget = budget_for(args.steps, args.batch_size)
        cfg = self.model.config
        update(args.results, lambda res: res.update(config={
            "model_rel": rel(args.model), "data_rel": rel(args.data), "n_layer": cfg.n_layer,
            "steps": args.steps, "dpo_steps": args.dpo_steps, "batch_size": args.batch_size, "beta": args.beta,
            "warmup": self.budget.warmup, "eval_every": self.budget.eval_every, "split": s.summary(),
            "test_mrs": len(self.data.test_groups), "max_new_tokens": args.max_new_tokens,
            "decoding": "greedy, presence 0.2 + frequency 0.2, decay 0.996 (eval --generate)"}))

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.0f}s] {msg}", flush=True)

    def n_trainable(self, layers: list[int] | None) -> int:
        c = self.model.config
        return (len(layers) if layers is not None else c.n_layer) * c.n_head * c.head_size ** 2

    def keep(self, name: str) -> Path:
        return self.args.work_dir / "states" / f"{name}.safetensors"

    def budget_of(self, steps: int) -> methods.Budget:
        return budget_for(steps, self.args.batch_size)

    # -- baselines and teachers
    def baselines(self) -> None:
        res = read(self.args.results)
        if not find(res, "runs", method="base"):
            append(self.args.results, "runs", objectives.score(self.model, self.tok, self.probe, None), method="base")
        if not find(res, "runs", method="reference"):
            refs = [r[0] for _, r in self.probe.groups]
            append(self.args.results, "runs", objectives.faithfulness(self.probe, refs), method="reference")

    def teacher(self, kind: str) -> Path:
        path = self.args.work_dir / f"teacher-{kind}.pth"
        steps = self.args.teacher_steps
        if not path.is_file() or not find(read(self.args.results), "runs", method=f"teacher-{kind}", steps=steps):
            self.log(f"training the {kind} teacher")
            model, info = objectives.make_teacher(kind, self.ctx, self.budget_of(steps), TEACHER_LR[kind], path)
            row = {**info, **objectives.score(model, self.tok, self.probe, None)}
            update(self.args.results, lambda res: (
                res.__setitem__("runs", [r for r in res["runs"] if r.get("method") != f"teacher-{kind}"]),
                res["runs"].append({"method": f"teacher-{kind}", "steps": steps, **row})))
            self.log(f"teacher-{kind}: val {info['best_val']:.4f} (saved checkpoint {info['saved_val']:.4f}), "
                     f"test {row['test_loss']:.3f}, SER {row['ser']:.3f}")
        return path

    # -- one training run of a method
    def train(self, method: str, lr: float, seed: int) -> tuple[objectives.StateRun, dict]:
        a, fam, tag = self.args, family(method), f"{method}-{self.args.steps}-lr{lr:g}-s{seed}"
        d = self.data
        if fam in ("sft", "layers"):
            layers = method.removeprefix("layers-") if fam == "layers" else None
            run = objectives.train_state(self.ctx, self.budget, lr, seed, self.keep(tag), d.train, d.val,
                                         layers=layers)
            idx = None if layers is None else list(range(int(layers.split("-")[0]), int(layers.split("-")[1]) + 1))
            return run, {"trainable": self.n_trainable(idx), "stages": f"sft {a.steps}"}
        if fam == "sft+dpo":
            s1 = a.steps - a.dpo_steps
            first = self.keep(f"sft-{s1}-s{seed}")
            if not first.is_file():
                objectives.train_state(self.ctx, self.budget_of(s1), GRID["sft"][0], seed, first, d.train, d.val)
            run = objectives.train_state(self.ctx, self.budget_of(a.dpo_steps), lr, seed, self.keep(tag),
                                         self.pairs, self.val_pairs, objective="dpo", beta=a.beta, init=str(first))
            return run, {"trainable": self.n_trainable(None), "stages": f"sft {s1} (LR 30) + dpo {a.dpo_steps}"}
        if fam == "orpo":
            run = objectives.train_state(self.ctx, self.budget, lr, seed, self.keep(tag), self.pairs,
                                         self.val_pairs, objective="orpo")
            return run, {"trainable": self.n_trainable(None), "stages": f"orpo {a.steps}"}
        teacher = self.teacher(method.removeprefix("distill-"))
        run = objectives.train_state(self.ctx, self.budget, lr, seed, self.keep(tag), d.train, d.val,
                                     objective="distill", teacher=str(teacher))
        return run, {"trainable": self.n_trainable(None), "stages": f"distill {a.steps}"}

    def lr_for(self, method: str) -> float:
        """The method's LR: its only grid rate, or seed 0's sweep (run here for the rates not yet recorded)."""
        a = self.args
        grid = a.grids.get(method) or GRID[family(method)]
        grid = grid[:1] if a.quick else grid
        if len(grid) == 1:
            return grid[0]
        for lr in grid:
            done = find(read(a.results), "sweeps", method=method, lr=lr, steps=a.steps)
            if done and self.keep(f"{method}-{a.steps}-lr{lr:g}-s0").is_file():
                continue
            run, info = self.train(method, lr, 0)
            append(a.results, "sweeps", {"best_val": run.best_val, "val": run.best_event, "train_s": run.train_s,
                                         "curve": run.curve, "info": info}, method=method, lr=lr, steps=a.steps)
            self.log(f"{method} sweep lr={lr:g}: best val {run.best_val:.4f}")
        sweeps = [find(read(a.results), "sweeps", method=method, lr=lr, steps=a.steps) for lr in grid]
        return min(sweeps, key=lambda s: s["best_val"])["lr"]

    def one(self, method: str, seed: int) -> None:
        a = self.args
        if find(read(a.results), "runs", method=method, seed=seed, steps=a.steps):
            return
        lr = self.lr_for(method)
        keep = self.keep(f"{method}-{a.steps}-lr{lr:g}-s{seed}")
        sweep = find(read(a.results), "sweeps", method=method, lr=lr, steps=a.steps) if seed == 0 else None
        if sweep and keep.is_file():
            run_info = {k: sweep[k] for k in ("best_val", "val", "train_s", "curve")}
            info = sweep["info"]
        else:
            run, info = self.train(method, lr, seed)
            run_info = {"best_val": run.best_val, "val": run.best_event, "train_s": run.train_s, "curve": run.curve}
        row = {"lr": lr, **info, **run_info,
               **objectives.score(self.model, self.tok, self.probe, objectives.read_state(keep, self.model)),
               "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
        append(a.results, "runs", row, method=method, seed=seed, steps=a.steps)
        self.log(f"{method} seed {seed} lr={lr:g}: test {row['test_loss']:.3f}, BLEU {row['bleu']:.1f}, "
                 f"SER {row['ser']:.3f}, distinct {row['distinct']:.2f}")

    def run(self) -> None:
        self.baselines()
        for seed in range(self.args.seeds):
            for method in self.args.methods:
                self.one(method, seed)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.table:
        print(table(read(args.results)))
        return 0
    torch.set_num_threads(args.threads)
    for path, flag in ((args.model, "--model"), (args.data, "--data")):
        if not path.is_file():
            raise SystemExit(f"{path}: not found (pass {flag})")
    command = "python benchmarks/quality_objectives.py " + shlex.join(rel(a) if os.path.isabs(a) else a for a in argv)
    study = Study(args)
    update(args.results, lambda res: res["commands"].append(
        {"command": command, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "threads": args.threads}))
    try:
        study.run()
    finally:
        shutil.rmtree(study.data_dir, ignore_errors=True)
    print(table(read(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
