"""The fixed E2E split by meaning representation, and the tokenized files every method trains and is scored on.

Records sharing a meaning representation (MR) always land on the same side, so test MRs are never seen in
training (E2E has ~8.5 references per MR; a split by row would leak them). The split is a pure function of
the MR strings: MRs are ordered by the SHA-256 of their UTF-8 text, the first 80% go to train, the next
10% to validation, the last 10% to test (each side at least one MR). No seed, no dependence on row order.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from statetune.commands.prepare import PrepareOptions, prepare

PROMPT = "Input: {mr}\n\nResponse:"
COMPLETION = " {ref}"
#: How one in-context example reads in the few-shot prompt (and in the prompt that initialises a state).
SHOT = "Input: {mr}\n\nResponse: {ref}\n\n"


def mr_hash(mr: str) -> str:
    """The split key of a meaning representation."""
    return hashlib.sha256(mr.encode("utf-8")).hexdigest()


@dataclass
class Split:
    """MR → references for each side, in split (hash) order."""

    train: dict[str, list[str]]
    val: dict[str, list[str]]
    test: dict[str, list[str]]

    def summary(self) -> dict[str, dict[str, int]]:
        return {name: {"mrs": len(side), "rows": sum(len(r) for r in side.values())}
                for name, side in (("train", self.train), ("val", self.val), ("test", self.test))}


def read_csv(path: Path) -> dict[str, list[str]]:
    """``mr,ref`` rows grouped by MR (first-seen order), references stripped."""
    groups: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            groups.setdefault(row["mr"].strip(), []).append(row["ref"].strip())
    return groups


def split_by_mr(groups: dict[str, list[str]], val: float = 0.1, test: float = 0.1) -> Split:
    """80/10/10 (by default) of the MRs in SHA-256 order; see the module docstring."""
    order = sorted(groups, key=mr_hash)
    n = len(order)
    if n < 3:
        raise SystemExit(f"need at least 3 distinct MRs to split, got {n}")
    n_val, n_test = max(1, round(n * val)), max(1, round(n * test))
    n_train = n - n_val - n_test
    pick = lambda keys: {k: groups[k] for k in keys}  # noqa: E731
    return Split(pick(order[:n_train]), pick(order[n_train:n_train + n_val]), pick(order[n_train + n_val:]))


def round_robin(side: dict[str, list[str]], limit: int | None, per_mr: int | None = None) -> list[tuple[str, str]]:
    """(MR, ref) rows taking the 1st reference of every MR, then the 2nd, ...: a subset that covers as many
    MRs as possible; at most ``per_mr`` references per MR and ``limit`` rows."""
    rows: list[tuple[str, str]] = []
    depth = max((len(r) for r in side.values()), default=0)
    for j in range(min(depth, per_mr or depth)):
        rows += [(mr, refs[j]) for mr, refs in side.items() if j < len(refs)]
    return rows[:limit] if limit is not None else rows


@dataclass
class Data:
    """Files and texts of one benchmark run."""

    split: Split
    train: Path                      # every training row
    val: Path                        # the validation subset used for curves, best-checkpoint and LR choice
    test: Path                       # the test rows whose masked loss is reported
    test_groups: list[tuple[str, list[str]]]  # test MRs with all their references (BLEU/chrF)
    few_shot: str                    # the k in-context examples (train MRs), ending in a blank line
    counts: dict[str, int] = field(default_factory=dict)


def build(csv_path: Path, work: Path, model_path: Path, *, val_records: int, test_refs: int | None,
          test_prompts: int | None, shots: int) -> Data:
    """Split ``csv_path``, write the three CSVs and tokenize them with statetune's ``prepare``."""
    split = split_by_mr(read_csv(csv_path))
    work.mkdir(parents=True, exist_ok=True)
    sides = {"train": round_robin(split.train, None), "val": round_robin(split.val, val_records),
             "test": round_robin(split.test, None, test_refs)}
    paths: dict[str, Path] = {}
    for name, rows in sides.items():
        src = work / f"{name}.csv"
        with src.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["mr", "ref"])
            w.writerows(rows)
        prepare(PrepareOptions(inputs=[str(src)], out=str(work / name), model=str(model_path),
                               prompt_template=PROMPT, completion_template=COMPLETION))
        paths[name] = work / f"{name}.jsonl"
    shots_text = "".join(SHOT.format(mr=mr, ref=refs[0]) for mr, refs in list(split.train.items())[:shots])
    groups = list(split.test.items())[:test_prompts]
    counts = {f"{k}_rows_used": len(v) for k, v in sides.items()}
    counts["test_prompts"] = len(groups)
    return Data(split, paths["train"], paths["val"], paths["test"], groups, shots_text, counts)
