"""Throughput of ``statetune prepare`` on generated mixed text (English, Chinese, code).

    python benchmarks/bench_prepare.py [--mb 24] [--threads N] [--out benchmarks/results/prepare.json]

Two data sets are generated deterministically in a temporary directory, each of about ``--mb`` MB: mixed
text (JSONL in the text and instruction formats, records of a few KB) and short E2E-like records (about
250 bytes, through ``--prompt-template``/``--completion-template``), where per-record overhead dominates.
Each runs ``prepare`` end to end (read, tokenize, write) with one worker process and with ``--threads``
workers; the World tokenizer alone is timed for reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from benchio import write_json

from statetune.commands.prepare import PrepareOptions, prepare
from statetune.tokenizer import get_tokenizer

WORDS = ("the of and to in is was for on that with as by it from at an be this which or are have has not but "
         "state model token recurrent language training data weight layer time mixing channel value key "
         "receptance output gradient learning rate batch sequence length memory context prompt answer "
         "question example result because however therefore although simple quickly carefully").split()
HANZI = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出"
         "就分对成会可主发年动同工也能下过子说产种面而方后")
CODE = [
    "def {name}(x, y):\n    \"\"\"Return the {word} of x and y.\"\"\"\n    return x * {n} + y\n",
    "for i in range({n}):\n    if i % 3 == 0:\n        print(f\"{word} {{i}}\")\n",
    "class {Name}:\n    def __init__(self, {name}={n}):\n        self.{name} = {name}\n",
    "int {name}(int n) {{\n    return n < {n} ? n : {name}(n - 1) + {n};\n}}\n",
]


SYLLABLES = "ka ter mon is al ve ri dor pha sen qu ox ly tion ment ble un re pre str".split()


def word(rng: random.Random) -> str:
    """Mostly common words, one in five a made-up one (names, rare words) that splits into several tokens."""
    if rng.random() < 0.8:
        return rng.choice(WORDS)
    return "".join(rng.choices(SYLLABLES, k=rng.randint(2, 4)))


def english(rng: random.Random, n_words: int) -> str:
    out = []
    for _ in range(max(1, n_words // 12)):
        words = [word(rng) for _ in range(rng.randint(6, 18))]
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", "!"]))
    return " ".join(out)


def chinese(rng: random.Random, n_chars: int) -> str:
    return "".join(rng.choice(HANZI) for _ in range(n_chars)) + "。"


def code(rng: random.Random) -> str:
    name = rng.choice(WORDS) + "_" + rng.choice(WORDS)
    return rng.choice(CODE).format(name=name, Name=name.title().replace("_", ""), word=rng.choice(WORDS),
                                   n=rng.randint(1, 999))


def mixed_text(rng: random.Random) -> str:
    parts = [english(rng, rng.randint(20, 300))]
    if rng.random() < 0.4:
        parts.append(chinese(rng, rng.randint(10, 200)))
    if rng.random() < 0.4:
        parts.append(code(rng))
    rng.shuffle(parts)
    return "\n\n".join(parts)


def generate(directory: Path, megabytes: float, seed: int = 0) -> list[Path]:
    """Write about ``megabytes`` MB of JSONL: 3/4 text records, 1/4 instruction records."""
    rng = random.Random(seed)
    files = [directory / "text.jsonl", directory / "instruction.jsonl"]
    targets = [megabytes * 0.75e6, megabytes * 0.25e6]
    for path, target in zip(files, targets, strict=True):
        size = 0
        with path.open("w", encoding="utf-8") as fh:
            while size < target:
                if path.name == "text.jsonl":
                    record = {"text": mixed_text(rng)}
                else:
                    record = {"instruction": english(rng, 20), "input": rng.choice(["", english(rng, 40)]),
                              "output": mixed_text(rng)}
                line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
                fh.write(line)
                size += len(line.encode("utf-8"))
    return files


def generate_short(directory: Path, megabytes: float, seed: int = 1) -> list[Path]:
    """Write about ``megabytes`` MB of short E2E-like records (about 250 bytes) for ``--prompt-template``."""
    rng = random.Random(seed)
    path = directory / "short.jsonl"
    size = 0
    with path.open("w", encoding="utf-8") as fh:
        while size < megabytes * 1e6:
            mr = ", ".join(f"{word(rng)}[{word(rng)} {word(rng)}]" for _ in range(rng.randint(3, 6)))
            line = json.dumps({"mr": mr, "ref": english(rng, rng.randint(12, 30))}, ensure_ascii=False,
                              allow_nan=False) + "\n"
            fh.write(line)
            size += len(line.encode("utf-8"))
    return [path]


def run_prepare(files: list[Path], out: Path, workers: int, **options: str) -> dict[str, float]:
    nbytes = sum(p.stat().st_size for p in files)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # keep the table readable
        start = time.perf_counter()
        prepare(PrepareOptions(inputs=[str(p) for p in files], out=str(out), workers=workers, **options))
        seconds = time.perf_counter() - start
    counts = json.loads(out.with_suffix(".meta.json").read_text())["counts"]
    return {"workers": workers, "seconds": seconds, "mb": nbytes / 1e6, "mb_per_s": nbytes / 1e6 / seconds,
            "records_per_s": counts["records"] / seconds, "tokens_per_s": counts["tokens"] / seconds,
            "records": counts["records"], "tokens": counts["tokens"]}


def run_tokenizer_only(files: list[Path]) -> dict[str, float]:
    texts = []
    for path in files:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                texts.append(rec.get("text") or rec["output"])
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    tok = get_tokenizer("world")
    start = time.perf_counter()
    tokens = sum(len(tok.encode(t)) for t in texts)
    seconds = time.perf_counter() - start
    return {"workers": 1, "seconds": seconds, "mb": nbytes / 1e6, "mb_per_s": nbytes / 1e6 / seconds,
            "records_per_s": len(texts) / seconds, "tokens_per_s": tokens / seconds, "records": len(texts),
            "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=24.0, help="Megabytes of JSONL to generate (default 24).")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="Worker processes for the parallel run (default: CPU count).")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prepare.json"),
                        help="Where to write the JSON results.")
    args = parser.parse_args(argv)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        files = generate(Path(tmp), args.mb)
        print(f"generated {sum(p.stat().st_size for p in files) / 1e6:.1f} MB in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        get_tokenizer("world").encode("warm up")
        short = generate_short(Path(tmp), args.mb)
        templates = {"prompt_template": r"Input: {mr}\n\nResponse:", "completion_template": " {ref}"}
        rows["tokenizer encode only"] = run_tokenizer_only(files)
        for n in sorted({1, args.threads}):
            label = f"{n} worker{'s' if n > 1 else ''}"
            rows[f"mixed text, {label}"] = run_prepare(files, Path(tmp) / f"mixed{n}", n)
            rows[f"short records, {label}"] = run_prepare(short, Path(tmp) / f"short{n}", n, **templates)
    print(f"{'configuration':<28} {'MB':>7} {'s':>7} {'MB/s':>7} {'records/s':>10} {'tokens/s':>11}")
    for name, r in rows.items():
        print(f"{name:<28} {r['mb']:7.1f} {r['seconds']:7.2f} {r['mb_per_s']:7.1f} "
              f"{r['records_per_s']:10,.0f} {r['tokens_per_s']:11,.0f}")
    out = Path(args.out)
    result = {"benchmark": "prepare", "mb": args.mb, "threads": args.threads, "cpu_count": os.cpu_count(),
              "python": platform.python_version(), "machine": platform.machine(), "results": rows}
    write_json(result, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
