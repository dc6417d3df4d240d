"""Long-sequence quality: full vs truncated backpropagation through time on packed E2E examples.

On the shipped tiny RWKV-7 and the shipped E2E subset (split by meaning representation, as in
``quality_e2e.py``), each sequence packs ``--pack`` examples (``Input: MR\\n\\nResponse: REF`` + end of
text, loss on the responses); ``--ctx-len`` is shorter than a sequence, so most loss tokens sit after the
first segment. Both modes train the state (direct, WKV only) on the same batches with the same budget and
learning rate; the best state on validation is scored on test sequences: the loss of the first example of
each sequence and of the later ones. Mean ± sample std over seeds (the seed sets the data order). Prints a
table, writes ``benchmarks/results/quality_long.json`` and a section of ``benchmarks/RESULTS.md``.

    python benchmarks/quality_long.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from benchio import print_rows, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality.split import read_csv, split_by_mr  # noqa: E402

from statetune.commands.train import TrainOptions, train  # noqa: E402
from statetune.data.loader import TokenDataset  # noqa: E402
from statetune.fileio import atomic_write  # noqa: E402
from statetune.model.checkpoint import load_model  # noqa: E402
from statetune.objective import dataset_loss  # noqa: E402
from statetune.tokenizer import get_tokenizer  # noqa: E402
from statetune.train.metrics import read_metrics  # noqa: E402
from statetune.tuning.statefile import load_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- quality_long: begin -->", "<!-- quality_long: end -->"


def packed(groups: dict[str, list[str]], n_seq: int, pack: int, seed: int, part: str = "all") -> list[dict]:
    """``n_seq`` records of ``pack`` (MR, reference) examples; ``part`` picks which responses carry loss:
    ``all``, ``first`` (the first example's only) or ``later`` (all but the first)."""
    tok = get_tokenizer("bytes")
    rng = random.Random(seed)
    pairs = [(mr, ref) for mr, refs in groups.items() for ref in refs]
    out = []
    for _ in range(n_seq):
        ids, mask = [], []
        for j, (mr, ref) in enumerate(rng.sample(pairs, pack)):
            on = part == "all" or (part == "first") == (j == 0)
            prompt, answer = tok.encode(f"Input: {mr}\n\nResponse:"), tok.encode(f" {ref}") + [0]
            ids += prompt + answer
            mask += [0] * len(prompt) + [int(on)] * len(answer)
        out.append({"text": ids, "mask": mask})
    return out


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    return path


def mean_std(xs: list[float], digits: int = 3) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "statetune/assets/tiny-rwkv7/model.pth")
    ap.add_argument("--data", type=Path, default=REPO / "statetune/assets/e2e/e2e_subset.csv")
    ap.add_argument("--pack", type=int, default=8, help="examples per sequence")
    ap.add_argument("--ctx-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=10.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-seqs", type=int, default=400)
    ap.add_argument("--val-seqs", type=int, default=8)
    ap.add_argument("--test-seqs", type=int, default=24)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=REPO / "runs/quality_long")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/quality_long.json")
    ap.add_argument("--report", type=Path, default=REPO / "benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()

    split = split_by_mr(read_csv(args.data))
    args.work.mkdir(parents=True, exist_ok=True)
    train_path = write(args.work / "train.jsonl", packed(split.train, args.train_seqs, args.pack, 1))
    val_path = write(args.work / "val.jsonl", packed(split.val, args.val_seqs, args.pack, 2))
    tests = {part: write(args.work / f"test_{part}.jsonl", packed(split.test, args.test_seqs, args.pack, 3, part))
             for part in ("first", "later")}
    model = load_model(args.model)
    lengths = TokenDataset(train_path).lengths
    loss_share = _later_share(train_path, args.ctx_len)

    def score(state) -> dict[str, float]:
        return {part: dataset_loss(model, TokenDataset(p), state, args.batch_size, args.ctx_len).loss
                for part, p in tests.items()}

    results = {"zero state": [score(None)]}
    runs = []
    for bptt in ("full", "truncated"):
        for seed in range(args.seeds):
            out = args.work / f"{bptt}-{seed}"
            opts = TrainOptions(model=str(args.model), train_data=str(train_path), val_data=str(val_path),
                                out=str(out), max_steps=args.steps, batch_size=args.batch_size,
                                ctx_len=args.ctx_len, bptt=bptt, lr=args.lr, lr_final=args.lr / 100,
                                warmup_steps=3, eval_every=args.eval_every, save_every=10 ** 6, samples=0,
                                seed=seed, progress=False)
            t0 = time.perf_counter()
            if out.exists():
                shutil.rmtree(out)  # a fresh run, not a resume of an earlier one
            assert train(opts) == 0
            secs = time.perf_counter() - t0
            best = load_state(out / "state-best.safetensors", model).state
            val = min(e["loss"] for e in read_metrics(out / "metrics.jsonl") if e["type"] == "val"
                      and e["step"] > 0)
            row = {"bptt": bptt, "seed": seed, "seconds": secs, "best_val": val, **score(best)}
            runs.append(row)
            results.setdefault(bptt, []).append(row)
            print(json.dumps(row, allow_nan=False), flush=True)

    table = [("mode", "seeds | val loss (all examples) | test loss, first example | test loss, later examples |"
              " train s")]
    md = ["| mode | seeds | val loss (all examples) | test loss, first example | test loss, later examples | "
          "train time (s) |", "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        cells = [str(len(rows)),
                 mean_std([r["best_val"] for r in rows]) if "best_val" in rows[0] else "–",
                 mean_std([r["first"] for r in rows]), mean_std([r["later"] for r in rows]),
                 mean_std([r["seconds"] for r in rows], 0) if "seconds" in rows[0] else "0"]
        table.append((name, " | ".join(cells)))
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    print_rows(table)
    cmd = "python benchmarks/" + Path(__file__).name + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                                        if (argv or sys.argv[1:]) else "")
    info = {"command": cmd, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "minutes": (time.time() - started) / 60, "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": args.threads, "pack": args.pack, "ctx_len": args.ctx_len,
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds,
            "train_seqs": args.train_seqs, "mean_train_len": float(lengths.mean()),
            "loss_tokens_after_first_segment": loss_share, "split": split.summary(), "runs": runs,
            "zero_state": results["zero state"][0]}
    write_json(info, args.out)
    _write_section(args.report, info, md)


def _later_share(path: Path, ctx_len: int) -> float:
    """Fraction of the training set's loss tokens that are targets beyond the first segment."""
    data = TokenDataset(path)
    later = total = 0
    for i in range(len(data)):
        m = data[i].mask
        total += sum(m[1:])
        later += sum(m[ctx_len + 1:])
    return later / max(total, 1)


def _write_section(path: Path, info: dict, md: list[str]) -> None:
    body = [BEGIN, "## Long sequences: full vs truncated backpropagation through time", "",
            "Written by `benchmarks/quality_long.py`; raw numbers in `benchmarks/results/quality_long.json`.", "",
            f"- command: `{info['command']}`; {info['date']}, {info['minutes']:.1f} min, "
            f"{info['threads']} torch thread(s), torch {info['torch']} (a shared machine: times are indicative)",
            f"- model: the shipped tiny RWKV-7 (`statetune/assets/tiny-rwkv7`); data: the shipped E2E subset split "
            f"by MR ({info['split']['train']['mrs']}/{info['split']['val']['mrs']}/{info['split']['test']['mrs']} "
            f"MRs), {info['pack']} examples packed per sequence (mean {info['mean_train_len']:.0f} byte tokens), "
            f"loss on the responses",
            f"- `--ctx-len {info['ctx_len']}`: {100 * info['loss_tokens_after_first_segment']:.0f}% of the loss "
            f"tokens are targets after the first segment",
            f"- budget, equal for both: {info['steps']} steps x batch {info['batch_size']} (the same batches per "
            f"seed), direct WKV state, LR {info['lr']:g} cosine to LR/100, warmup 3, clip 1.0; best validation "
            f"state kept; mean ± sample std over {info['seeds']} seeds (the data order)", "",
            *md, "",
            "Test losses are nats per response byte on held-out MRs, from the zero state or the tuned state: "
            "*first example* is each test sequence's first response (inside the first segment), *later "
            "examples* the rest (read after the earlier examples, through the carried state).", END]
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + "\n".join(body) + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
