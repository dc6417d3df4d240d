"""What ``prepare`` tells afterwards: running totals, the end-of-run summary, and ``OUT.meta.json``.

The meta file is how later commands learn how the data was made: ``train`` copies it into the state's
metadata, and ``generate`` reads ``prompt_template`` to wrap a new input the way training prompts looked and
``stop`` to know where an answer ends.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from statetune.data.formats import Format
from statetune.data.pipeline import EXAMPLES, ChunkResult
from statetune.errors import DataError
from statetune.prompts import chat_stop, templates_for
from statetune.tokenizer import Tokenizer

META_SCHEMA = "statetune.prepare/1"


@dataclass
class InputReport:
    """One input file: the format used for it, its end-of-completion marker, and its counts."""

    path: str
    format: Format | None = None
    style: str | None = None  # preference pairs: "text" or "chat"
    eos: list[int] = field(default_factory=list)
    eos_text: str | None = None
    records: int = 0
    skipped: int = 0


@dataclass
class Totals:
    """Counts over all inputs, kept in bounded memory (lengths as a histogram)."""

    train_records: int = 0
    val_records: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    loss_tokens: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    over_max_len: int = 0
    over_examples: list[str] = field(default_factory=list)
    lengths: Counter[int] = field(default_factory=Counter)

    def add(self, path: str, result: ChunkResult, report: InputReport) -> None:
        """Count a chunk's written records (its errors are counted by ``skip``)."""
        self.train_records += len(result.train)
        self.val_records += len(result.val)
        self.train_tokens += result.train_tokens
        self.val_tokens += result.val_tokens
        self.loss_tokens += result.loss_tokens
        self.lengths.update(result.lengths)
        self.over_max_len += result.n_too_long
        for line, n in result.too_long:
            if len(self.over_examples) < EXAMPLES:
                self.over_examples.append(f"{path}:{line}: {n} tokens")
        report.records += len(result.train) + len(result.val)

    def skip(self, message: str, report: InputReport) -> None:
        """Count a skipped record (``--skip-invalid``), keeping the first few messages."""
        self.skipped += 1
        report.skipped += 1
        if len(self.skipped_examples) < EXAMPLES:
            self.skipped_examples.append(message)

    @property
    def records(self) -> int:
        return self.train_records + self.val_records

    @property
    def tokens(self) -> int:
        return self.train_tokens + self.val_tokens


def percentile(hist: Counter[int], q: float) -> int:
    """The nearest-rank ``q``-th percentile (0..100) of the values counted in ``hist``; 0 when empty."""
    total = sum(hist.values())
    if not total:
        return 0
    rank = max(1, -(-q * total // 100))  # ceil(q/100 * total)
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= rank:
            return value
    return max(hist)


def length_stats(hist: Counter[int]) -> dict[str, int]:
    """p50/p90/p99/max of record lengths in tokens."""
    return {"p50": percentile(hist, 50), "p90": percentile(hist, 90), "p99": percentile(hist, 99),
            "max": max(hist, default=0)}


def build_meta(*, tokenizer: Tokenizer, inputs: list[InputReport], totals: Totals,
               outputs: dict[str, str | None], prompt_template: str | None, completion_template: str | None,
               eos_option: str | None, val_fraction: float, split_by: str | None, seed: int,
               max_len: int | None) -> dict[str, Any]:
    """The content of ``OUT.meta.json`` (schema ``statetune.prepare/1``, documented in docs/prepare.md)."""
    formats = {r.format for r in inputs if r.format is not None}
    fmt = next(iter(formats)) if len(formats) == 1 else None
    styles = {r.style for r in inputs if r.format is Format.PREFERENCE}
    style = (next(iter(styles)) if len(styles) == 1 else "mixed") if styles else None
    eos_sets = {(tuple(r.eos), r.eos_text) for r in inputs if r.format is not None}
    eos_ids, eos_text = eos_sets.pop() if len(eos_sets) == 1 else ((), None)
    eos = {"ids": list(eos_ids), "text": eos_text} if eos_ids else None
    shape = _prompt_shape(fmt, style, prompt_template, completion_template)
    if eos is not None:
        stop = eos
    elif shape == "chat":
        stop = chat_stop(tokenizer)
    else:
        stop = {"ids": [tokenizer.eot_id], "text": None}
    return {
        "schema": META_SCHEMA,
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id},
        "kind": "preference" if fmt is Format.PREFERENCE else "sft",
        "format": fmt.value if fmt else ("mixed" if formats else None),
        **({"preference_style": style} if fmt is Format.PREFERENCE else {}),
        **templates_for(shape, prompt_template, completion_template),
        "eos": eos,
        "eos_option": eos_option,
        "stop": stop,
        "inputs": [{"path": r.path, "format": r.format.value if r.format else None,
                    "eos": r.eos, "records": r.records, "skipped": r.skipped} for r in inputs],
        "outputs": outputs,
        "split": {"val_fraction": val_fraction, "split_by": split_by, "seed": seed} if val_fraction else None,
        "max_len": max_len,
        "counts": {"records": totals.records, **({"pairs": totals.records} if fmt is Format.PREFERENCE else {}),
                   "train_records": totals.train_records,
                   "val_records": totals.val_records, "tokens": totals.tokens,
                   "train_tokens": totals.train_tokens, "val_tokens": totals.val_tokens,
                   "loss_tokens": totals.loss_tokens, "skipped": totals.skipped,
                   "over_max_len": totals.over_max_len},
        "lengths": length_stats(totals.lengths),
    }


def _prompt_shape(fmt: Format | None, style: str | None, prompt_template: str | None,
                  completion_template: str | None) -> str | None:
    """The format whose prompt templates describe the data: preference pairs prompt like chat (chat pairs),
    like their templates, or like prompt-completion (text pairs)."""
    if fmt is not Format.PREFERENCE:
        return fmt.value if fmt else None
    if style != "text":
        return "chat" if style == "chat" else None
    return "template" if prompt_template is not None or completion_template is not None else "prompt-completion"


def require_records(totals: Totals, paths: list[Path], val_fraction: float, split_by: str | None) -> None:
    """Raise :class:`DataError` unless some valid records reached the training file."""
    if not totals.records:
        first = f"; first: {totals.skipped_examples[0]}" if totals.skipped_examples else ""
        raise DataError(f"no valid records in {', '.join(map(str, paths))} ({totals.skipped} skipped{first})")
    if not totals.train_records:
        by = f" grouped by --split-by {split_by}" if split_by else ""
        raise DataError(f"the split leaves the training set empty: all {totals.val_records} records{by} went to "
                        f"validation with --val-fraction {val_fraction}; lower it or add data")


def summary(totals: Totals, outputs: dict[str, str | None], max_len: int | None, seconds: float,
            nbytes: int, unit: str = "records") -> str:
    """The end-of-run report printed to stderr; ``unit`` names what a record is (``pairs`` for preference data,
    whose tokens count both sides and whose length is the longer side's)."""
    lines = [f"prepared {totals.records:,} {unit}, {totals.tokens:,} tokens "
             f"({nbytes / 1e6:.1f} MB in {seconds:.1f} s, {nbytes / 1e6 / max(seconds, 1e-9):.1f} MB/s)"]
    lines.append(f"  train: {totals.train_records:,} {unit}, {totals.train_tokens:,} tokens "
                 f"-> {outputs['train']}")
    if outputs.get("val"):
        lines.append(f"  val:   {totals.val_records:,} {unit}, {totals.val_tokens:,} tokens "
                     f"-> {outputs['val']}")
        if not totals.val_records:
            lines.append("  warning: the validation split is empty; raise --val-fraction or add data")
    share = totals.loss_tokens / totals.tokens if totals.tokens else 0.0
    lines.append(f"  loss tokens: {totals.loss_tokens:,} ({share:.1%} of tokens)")
    s = length_stats(totals.lengths)
    lines.append(f"  length (tokens): p50 {s['p50']:,}  p90 {s['p90']:,}  p99 {s['p99']:,}  max {s['max']:,}")
    if max_len is not None:
        lines.append(f"  longer than --max-len {max_len:,}: {totals.over_max_len:,} records (kept whole, not "
                     "truncated)" if totals.over_max_len else f"  none longer than --max-len {max_len:,}")
        lines += [f"    {e}" for e in totals.over_examples]
    lines.append(f"  skipped: {totals.skipped:,} invalid records")
    lines += [f"    {e}" for e in totals.skipped_examples]
    if totals.skipped > len(totals.skipped_examples):
        lines.append(f"    ... and {totals.skipped - len(totals.skipped_examples):,} more")
    lines.append(f"  meta: {outputs['meta']}")
    return "\n".join(lines)
