"""Decoding comparison: BLEU/chrF on E2E's validation MRs of greedy decoding against penalised decoding.

From one tuned state (trained here, direct WKV state tuning on the benchmark's split, or ``--state FILE``),
every validation MR is decoded with each setting through statetune's engine: greedy, greedy with a
repetition penalty, greedy with presence / frequency penalties (the RWKV ecosystem's usual 0.5 / 0.5), and
one sampled setting like RWKV's chat defaults (seeded), each penalised setting also with RWKV's count decay
(``penalty_decay`` 0.996 per token, as in its pipeline). Besides BLEU/chrF it reports how many outputs loop
(a word 3-gram that occurs twice). With ``--scales`` it also scores the state times each factor
(``--state-scale``): validation loss, and BLEU/chrF with the best setting above. Prints a table, writes
``benchmarks/results/quality_decoding[_quick].json`` and a section of ``benchmarks/RESULTS.md`` (or
``RESULTS-DIR/quality_decoding[_quick].md``).

    python benchmarks/quality_decoding.py --threads 1 --steps 160 --lr 30 \
        --data ../shared/data/e2e/devset.csv --scales 0.25,0.5,0.75,1,1.25,1.5   # train, compare, scale
    python benchmarks/quality_decoding.py --state my.safetensors           # compare on a given state
    python benchmarks/quality_decoding.py --quick --threads 1              # a smoke test
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from benchio import REPO, output_paths, print_rows, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import methods, split  # noqa: E402
from quality.curves_report import write_section  # noqa: E402

from statetune.data.loader import TokenDataset  # noqa: E402
from statetune.evaluate.metrics import generation_scores  # noqa: E402
from statetune.infer.engine import decode_all  # noqa: E402
from statetune.infer.sampling import SamplingParams  # noqa: E402
from statetune.model.checkpoint import load_model  # noqa: E402
from statetune.objective import dataset_loss  # noqa: E402
from statetune.tokenizer import tokenizer_for_vocab  # noqa: E402
from statetune.tuning.statefile import load_state, save_state  # noqa: E402

BEGIN, END = "<!-- quality_decoding: begin -->", "<!-- quality_decoding: end -->"
#: name → sampling fields (temperature 0 = greedy unless set).
SETTINGS: dict[str, dict] = {
    "greedy": {},
    "greedy, repetition 1.1": {"repetition_penalty": 1.1},
    "greedy, repetition 1.2": {"repetition_penalty": 1.2},
    "greedy, presence 0.5 + frequency 0.5": {"presence_penalty": 0.5, "frequency_penalty": 0.5},
    "greedy, presence 0.2 + frequency 0.2": {"presence_penalty": 0.2, "frequency_penalty": 0.2},
    "greedy, frequency 0.5": {"frequency_penalty": 0.5},
    "greedy, presence 0.5 + frequency 0.5, decay 0.996": {"presence_penalty": 0.5, "frequency_penalty": 0.5,
                                                          "penalty_decay": 0.996},
    "greedy, presence 0.2 + frequency 0.2, decay 0.996": {"presence_penalty": 0.2, "frequency_penalty": 0.2,
                                                          "penalty_decay": 0.996},
    "greedy, presence 0.2 + frequency 0.2, decay 0.99": {"presence_penalty": 0.2, "frequency_penalty": 0.2,
                                                         "penalty_decay": 0.99},
    "sampled T=1 top-p 0.3, presence 0.5 + frequency 0.5 (seed 0)": {
        "temperature": 1.0, "top_p": 0.3, "presence_penalty": 0.5, "frequency_penalty": 0.5, "seed": 0},
    "sampled T=1 top-p 0.3, presence 0.5 + frequency 0.5, decay 0.996 (seed 0)": {
        "temperature": 1.0, "top_p": 0.3, "presence_penalty": 0.5, "frequency_penalty": 0.5,
        "penalty_decay": 0.996, "seed": 0},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "statetune/assets/tiny-rwkv7/model.pth")
    ap.add_argument("--data", type=Path, default=REPO / "statetune/assets/e2e/e2e_subset.csv",
                    help="E2E CSV (mr,ref), split by MR as in quality_e2e.py")
    ap.add_argument("--state", type=Path, default=None, help="a tuned state file to decode from (skips training)")
    ap.add_argument("--quick", action="store_true", help="a few steps and MRs: a smoke test")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="training steps of batch --batch-size (default 160)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 (2 with --quick)")
    ap.add_argument("--lr", type=float, default=3.0, help="peak LR of the direct state (default 3)")
    ap.add_argument("--val-mrs", type=int, default=None, help="validation MRs decoded (default all; 3 with --quick)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 192 (12 with --quick)")
    ap.add_argument("--scales", default=None, metavar="A[,A...]",
                    help="also score the state times each factor (validation loss; BLEU/chrF, best setting)")
    ap.add_argument("--save-state", type=Path, default=None, help="keep the trained state in this file")
    ap.add_argument("--results-dir", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument("--report", type=Path, default=None)
    a = ap.parse_args(argv)
    for k, full, quick in (("steps", 160, 3), ("batch_size", 8, 2), ("val_mrs", None, 3), ("max_new_tokens", 192, 12)):
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    for flag, v in (("--steps", a.steps), ("--batch-size", a.batch_size), ("--max-new-tokens", a.max_new_tokens)):
        if v < 1:
            ap.error(f"{flag} {v}: must be at least 1")
    try:
        a.scales = [float(x) for x in a.scales.split(",") if x.strip()] if a.scales else []
    except ValueError:
        ap.error(f"--scales {a.scales}: expected comma-separated numbers, e.g. 0.5,1")
    if any(x < 0 for x in a.scales):
        ap.error("--scales: factors must be 0 or more")
    a.json, a.report = output_paths(a.results_dir, "quality_decoding", a.quick, a.report)
    return a


def loops(text: str) -> bool:
    """True when a word 3-gram occurs at least twice (the "coffee shop coffee shop" failure)."""
    words = text.lower().split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(grams) != len(set(grams))




def groups_of(a: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The validation MRs decoded, each with its references."""
    return list(split.split_by_mr(split.read_csv(a.data)).val.items())[:a.val_mrs]


def decode_row(a: argparse.Namespace, model, tok, state, groups, fields: dict) -> dict:
    """Greedy (or ``fields``) decoding of every MR from ``state``, scored against its references."""
    prompts = [tok.encode(split.PROMPT.format(mr=mr)) for mr, _ in groups]
    params = SamplingParams(**{"temperature": 0.0, **fields}, max_tokens=a.max_new_tokens,
                            stop_token_ids=[tok.eot_id], stop=["\n"])
    s0 = time.perf_counter()
    hyps = [t.strip() for t in decode_all(model, tok, prompts, state, params)]
    scores = generation_scores(hyps, [refs for _, refs in groups])
    return {"fields": fields, "bleu": scores["bleu"], "chrf": scores["chrf"],
            "loop_rate": sum(map(loops, hyps)) / max(len(hyps), 1),
            "mean_words": sum(len(h.split()) for h in hyps) / max(len(hyps), 1),
            "seconds": time.perf_counter() - s0, "samples": hyps[:3]}


def score_scales(a: argparse.Namespace, model, state, val) -> list[dict]:
    """Validation loss of the state times each of ``--scales`` (None without the validation split)."""
    return [{"scale": x, "val_loss": None if val is None else dataset_loss(model, val, state.scaled(x), 8).loss}
            for x in a.scales]


def train_state(a: argparse.Namespace, model, work: Path):
    """Direct WKV state tuning on the split's training MRs; the best state on validation and its run info."""
    data = split.build(a.data, work / "data", a.model, val_records=48, test_refs=2, test_prompts=None, shots=0)
    val = TokenDataset(data.val, model.config.vocab_size)
    base_val = dataset_loss(model, val, None, a.batch_size).loss
    ctx = methods.Context(a.model, model, data.train, data.val, "", work, base_val, base_val)
    b = methods.Budget(a.steps, a.batch_size, eval_every=max(1, a.steps // 5), warmup=max(1, a.steps // 6))
    t = methods.state_direct(ctx, b, a.lr, 0)
    return t.state, {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "best_val": t.best_val,
                     "base_val": base_val, "train_s": t.train_s}, val


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    for flag, p in (("--model", a.model), ("--data", a.data), ("--state", a.state)):
        if p is not None and not p.is_file():
            raise SystemExit(f"{flag} {p}: file not found")
    t0 = time.perf_counter()
    model = load_model(a.model)
    model.requires_grad_(False)
    tok = tokenizer_for_vocab(model.config.vocab_size)
    work = Path(tempfile.mkdtemp(prefix="decoding-"))
    try:
        if a.state is not None:
            state, trained = load_state(a.state, model).state, {"state_file": os.path.basename(a.state)}
            val = None
        else:
            state, trained, val = train_state(a, model, work)
            if a.save_state is not None:
                save_state(a.save_state, state, model, {"tokenizer": tok.name})
        scales = score_scales(a, model, state, val)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    groups = groups_of(a)
    rows = {}
    for name, fields in SETTINGS.items():
        rows[name] = decode_row(a, model, tok, state, groups, fields)
        print(f"{name}: BLEU {rows[name]['bleu']:.1f}, chrF {rows[name]['chrf']:.1f}", flush=True)
    best = max(rows, key=lambda n: (rows[n]["bleu"], rows[n]["chrf"]))
    for scale in scales:
        scale.update(decode_row(a, model, tok, state.scaled(scale["scale"]), groups, rows[best]["fields"]))
        print(f"state x{scale['scale']:g}: val {scale['val_loss']}, BLEU {scale['bleu']:.1f}", flush=True)
    words = [os.path.relpath(w, REPO) if os.path.isabs(w) else w for w in argv]
    out = {"benchmark": "quality_decoding", "command": "python benchmarks/quality_decoding.py " + shlex.join(words),
           "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "threads": torch.get_num_threads(),
           "val_mrs": len(groups), "max_new_tokens": a.max_new_tokens, "trained": trained,
           "settings": rows, "best_setting": best, "scales": scales,
           "elapsed_s": time.perf_counter() - t0}
    write_json(out, a.json, indent=1)
    report(out, a.report)
    print_rows([(n, f"BLEU {r['bleu']:5.1f}  chrF {r['chrf']:5.1f}  loops {r['loop_rate']:.2f}")
                for n, r in rows.items()])
    print(f"wrote {a.json} and {a.report}")
    return 0


def report(r: dict, path: Path) -> None:
    t = r["trained"]
    state = (f"state file `{t['state_file']}`" if "state_file" in t else
             f"a direct WKV state trained here: {t['steps']} steps x batch {t['batch_size']}, LR {t['lr']:g}, "
             f"best validation loss {t['best_val']:.3f} (zero state {t['base_val']:.3f})")
    lines = [BEGIN, "## Decoding: greedy against penalised decoding", "",
             f"- command: `{r['command']}`; {r['date']}, {r['elapsed_s'] / 60:.1f} min, {r['threads']} thread(s)",
             f"- from {state}; {r['val_mrs']} validation MRs, at most {r['max_new_tokens']} tokens, stop at a "
             "newline or end of text; penalties count generated tokens only; `decay` fades the counts per token "
             "(`--penalty-decay`)", "",
             "| setting | BLEU | chrF | outputs that loop | mean words |", "|---|---:|---:|---:|---:|"]
    for name, x in r["settings"].items():
        lines.append(f"| {name} | {x['bleu']:.1f} | {x['chrf']:.1f} | {x['loop_rate']:.2f} | {x['mean_words']:.1f} |")
    if r.get("scales"):
        lines += ["", f"The state times a factor (`--state-scale`), decoded with the best setting above "
                      f"({r['best_setting']}):", "",
                  "| scale | validation loss | BLEU | chrF | outputs that loop |", "|---:|---:|---:|---:|---:|"]
        for x in r["scales"]:
            v = "–" if x["val_loss"] is None else f"{x['val_loss']:.4f}"
            lines.append(f"| {x['scale']:g} | {v} | {x['bleu']:.1f} | {x['chrf']:.1f} | {x['loop_rate']:.2f} |")
    write_section(path, "\n".join(lines + [END]), BEGIN, END)


if __name__ == "__main__":
    sys.exit(main())
