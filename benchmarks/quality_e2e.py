"""State-tuning quality benchmark: what state tuning buys on E2E, against prompting, LoRA and full fine-tuning.

On the shipped tiny RWKV-7 and the E2E dev set split by meaning representation (80/10/10 by hash), it
compares the base model zero-shot and few-shot, five kinds of state tuning (direct WKV; + token-shift;
per-layer encoder; global encoder; direct from a prompt's state), LoRA (peft) and full fine-tuning under
an equal budget of tokens, each at its best learning rate from a sweep on validation. It reports trainable
parameters, stored bytes, training time, held-out loss, BLEU/chrF, decode speed and loss on general text
(forgetting), and writes ``benchmarks/results/quality_e2e.json``, ``benchmarks/RESULTS.md`` and a plot of
the validation curves.

    python benchmarks/quality_e2e.py --threads 2            # the full run (under an hour on 2 CPU threads)
    python benchmarks/quality_e2e.py --quick --threads 1    # a few steps of everything (a smoke test)

Learning curves (``--budgets``): every method at several budgets, each with its own schedule and LR sweep,
several seeds per point; invocations with different ``--methods`` or ``--budgets`` merge into one results
file (``benchmarks/results/quality_curves.json``) and one section of ``benchmarks/RESULTS.md``:

    python benchmarks/quality_e2e.py --budgets 40,160,640 --methods state_direct,lora --seeds 2 \
        --seeds-largest 3 --plan                            # print the runs and an estimated time
    python benchmarks/quality_e2e.py --budgets 160 --methods state_direct --lr-auto   # the LR finder instead
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import methods, report  # noqa: E402
from quality.bench import FULL, QUICK, REPO, Bench, rel  # noqa: E402
from quality.curves import curves_main  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "statetune/assets/tiny-rwkv7/model.pth")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/e2e/devset.csv",
                    help="E2E CSV with columns mr,ref")
    ap.add_argument("--general-text", type=Path, default=REPO / "corpus/val.txt",
                    help="held-out pretraining text for the forgetting measure (skipped when missing)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets, one seed, one LR: a smoke test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(methods.METHODS), help="comma-separated trained methods")
    for key, kind in (("steps", int), ("batch_size", int), ("eval_every", int), ("seeds", int),
                      ("val_records", int), ("test_refs", int), ("test_prompts", int), ("max_new_tokens", int),
                      ("decode_tokens", int), ("general_bytes", int)):
        ap.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                        help=f"default {FULL[key]} ({QUICK[key]} with --quick)")
    ap.add_argument("--weight-seeds", type=int, default=1, help="seeds for LoRA and full fine-tuning")
    ap.add_argument("--shots", type=int, default=3, help="in-context examples for few-shot and prompt init")
    ap.add_argument("--shift-lr-scale", type=float, default=1.0,
                    help="token-shift states' LR as a fraction of the WKV state's, for the token-shift method")
    ap.add_argument("--batch-ablation", action="store_true",
                    help="also run direct state tuning at half and double batch, equal tokens (adds two runs)")
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]", dest="lr_grid",
                    help="learning rates to sweep for one method instead of its built-in grid (repeatable)")
    ap.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                    help="start no new training run after this many minutes (the report is then marked partial)")
    curves = ap.add_argument_group("learning curves")
    curves.add_argument("--budgets", default=None, metavar="STEPS[,STEPS...]",
                        help="run the learning curves at these budgets (optimizer steps of --batch-size) instead "
                             "of the single-budget benchmark, e.g. 40,160,640")
    curves.add_argument("--seeds-largest", type=int, default=None,
                        help="seeds per point at the largest budget of --budgets (default: --seeds)")
    curves.add_argument("--plan", action="store_true", help="print the runs and an estimated time, run nothing")
    curves.add_argument("--lr-auto", action="store_true",
                        help="pick each (method, budget)'s LR with statetune's LR finder instead of a sweep")
    curves.add_argument("--finder-steps", type=int, default=None,
                        help="LR finder: steps per tried rate (default 24; 2 with --quick)")
    curves.add_argument("--resume", action="store_true",
                        help="skip the points the results file already has, e.g. after --time-limit or a killed run "
                             "(a sweep trains only the rates it lacks)")
    curves.add_argument("--seeds-only", action="store_true",
                        help="run only the further seeds, at the LRs the results file's sweeps chose")
    curves.add_argument("--scale-sweep", default=None, metavar="A[,A...]",
                        help="for every scored state point, also the validation loss of the state times each "
                             "factor (--state-scale); the best factor is scored on test too")
    curves.add_argument("--max-extend", type=int, default=1,
                        help="sweep: rates added beyond a grid edge when the best sits there (default 1)")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="only rewrite the report and plot from an existing results JSON")
    ap.add_argument("--results-dir", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument("--report", type=Path, default=None,
                    help="Markdown report (default benchmarks/RESULTS.md; with --quick or another "
                         "--results-dir, RESULTS-DIR/quality_e2e[_quick].md)")
    ap.add_argument("--work-dir", type=Path, default=None, help="data and runs (default: a temporary folder)")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = {m for m in args.methods if not methods.known(m)}
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)} (choose from {', '.join(methods.METHODS)}, or "
                 f"{methods.PARAMETERISED_USAGE})")
    args.lr_grid = dict(parse_lr_grid(ap, item) for item in args.lr_grid)
    stem = "quality_e2e_quick" if args.quick else "quality_e2e"
    args.json = args.results_dir / f"{stem}.json"
    args.curves = args.results_dir / f"{stem}_curves.png"
    official = not args.quick and args.results_dir.resolve() == (REPO / "benchmarks/results").resolve()
    if args.budgets is not None:
        parse_curves(ap, args, official)
    args.report = args.report or (REPO / "benchmarks/RESULTS.md" if official else args.results_dir / f"{stem}.md")
    return args


def parse_curves(ap: argparse.ArgumentParser, args: argparse.Namespace, official: bool) -> None:
    """Check the learning-curve flags and name the curves' results file, plots and report."""
    try:
        args.budgets = sorted({int(b) for b in args.budgets.split(",") if b.strip()})
    except ValueError:
        args.budgets = []
    if not args.budgets or min(args.budgets) < 1:
        ap.error(f"--budgets {args.budgets}: expected positive step counts, e.g. 40,160,640")
    for flag, value in (("--seeds", args.seeds), ("--seeds-largest", args.seeds_largest),
                        ("--max-extend", args.max_extend + 1), ("--finder-steps", args.finder_steps)):
        if value is not None and value < 1:
            ap.error(f"{flag} {value}: must be at least 1" if flag != "--max-extend" else "--max-extend: 0 or more")
    try:
        args.scale_sweep = [float(x) for x in (args.scale_sweep or "").split(",") if x.strip()]
    except ValueError:
        ap.error(f"--scale-sweep {args.scale_sweep}: expected comma-separated factors, e.g. 0.5,0.75,1")
    if any(x < 0 for x in args.scale_sweep):
        ap.error("--scale-sweep: factors must be 0 or more")
    if args.finder_steps is None:
        args.finder_steps = 2 if args.quick else 24
    stem = "quality_curves_quick" if args.quick else "quality_curves"
    args.json = args.results_dir / f"{stem}.json"
    args.curves_by_budget = args.results_dir / f"{stem}_by_budget.png"
    args.curves_by_params = args.results_dir / f"{stem}_by_params.png"
    args.report = args.report or (REPO / "benchmarks/RESULTS.md" if official else args.results_dir / f"{stem}.md")
    args.curves_report = args.report


def parse_lr_grid(ap: argparse.ArgumentParser, item: str) -> tuple[str, list[float]]:
    """``METHOD=LR[,LR...]`` from ``--lr`` as ``(method, rates)``; a bad value stops with a usage error."""
    name, _, rates = item.partition("=")
    if not methods.known(name):
        ap.error(f"--lr {item}: unknown method {name!r} (choose from {', '.join(methods.METHODS)}, or "
                 f"{methods.PARAMETERISED_USAGE})")
    try:
        grid = [float(r) for r in rates.split(",") if r.strip()]
    except ValueError:
        grid = []
    if not grid or any(not lr > 0 for lr in grid):
        ap.error(f"--lr {item}: expected METHOD=LR[,LR...] with positive rates, e.g. state_direct=10,3")
    return name, grid


def command_line(argv: list[str]) -> str:
    """The command as typed from the repository root, with paths made repository-relative."""
    words = [rel(a) if os.path.isabs(a) else a for a in argv]
    return "python benchmarks/quality_e2e.py " + shlex.join(words)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render is not None and args.budgets is not None:
        from quality import curves_report, points

        curves_report.render(points.read(args.render), args)
        return 0
    if args.render is not None:
        results = json.loads(args.render.read_text())
        report.plot_curves(results, args.curves)
        report.write_report(results, args.report, os.path.relpath(args.curves, args.report.parent))
        return 0
    if args.budgets is not None and args.plan:
        return curves_main(args, command_line(argv))
    torch.set_num_threads(args.threads)
    if not args.model.is_file():
        raise SystemExit(f"{args.model}: model not found (pass --model)")
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: E2E CSV not found (pass --data)")
    if args.budgets is not None:
        return curves_main(args, command_line(argv))
    Bench(args, command_line(argv)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

