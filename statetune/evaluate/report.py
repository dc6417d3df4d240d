"""The Markdown form of an evaluation report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

COLUMNS = [("loss", "loss", "{:.4f}"), ("ppl", "ppl", "{:.2f}"), ("bleu", "BLEU", "{:.2f}"),
           ("chrf", "chrF", "{:.2f}"), ("rouge_l", "ROUGE-L", "{:.2f}"), ("exact_match", "exact %", "{:.1f}"),
           ("slot_error_rate", "SER", "{:.1%}"), ("distinct_outputs", "distinct", "{:.2f}")]


def state_labels(paths: Sequence[str]) -> list[str]:
    """Distinct, recognisable row names for state files: the file's stem, with as many of its folders as it
    takes to tell it from the others (``runs/a/best.safetensors`` and ``runs/b/best.safetensors`` are
    ``a/best`` and ``b/best``); a file given twice is told apart by ``#2``, ``#3``."""
    parts = [_parts(p) for p in paths]
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(pp[-d:]) for pp, d in zip(parts, depth, strict=True)]
        clashing = {lab for lab in labels if labels.count(lab) > 1}
        grow = [i for i, lab in enumerate(labels) if lab in clashing and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab} #{seen[lab]}")
    return out


def _parts(path: str) -> tuple[str, ...]:
    """The path's parts without its root and the file's extension: ``/x/a/best.pth`` -> ``(x, a, best)``."""
    p = PurePath(path)
    parts = p.with_suffix("").parts if p.suffix else p.parts
    return parts[1:] if p.anchor else parts or (path,)


def markdown_report(report: dict[str, Any]) -> str:
    """A table with one row per state (base model first), then side-by-side examples."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in report["rows"])]
    lines = [f"## {report['model']} on {report['data']}", "",
             "| state | " + " | ".join(c[1] for c in cols) + " | loss tokens |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for r in report["rows"]:
        cells = [fmt.format(r[key]) for key, _, fmt in cols]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['loss_tokens']} |")
    if "decoding" in report:
        shown = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in report["decoding"].items() if k != "greedy")
        lines += ["", f"Generation: greedy; {shown}."]
    for i, ex in enumerate(report.get("examples", []), 1):
        lines += ["", f"### Example {i}", "", f"**Prompt:** `{_one_line(ex['prompt'])}`", ""]
        lines.append(f"- *reference*: {_one_line(ex['references'][0])}")
        for name, out in ex["outputs"].items():
            lines.append(f"- *{name}*: {_one_line(out)}")
    return "\n".join(lines) + "\n"


def _one_line(s: str) -> str:
    return s.replace("\n", "\\n").replace("|", "\\|")
