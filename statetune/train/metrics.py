"""Run logs: ``RUN_DIR/metrics.jsonl`` (one JSON object per event) and TensorBoard event files.

Schema of ``metrics.jsonl`` (every line has ``type`` and ``step``):

- ``train``: ``loss`` (the objective's; for sft the mean over the step's loss tokens), ``lr``, ``grad_norm``,
  ``loss_tokens``, ``tokens`` (all tokens processed so far), ``tokens_per_s``, ``elapsed_s``;
- ``val``: ``loss``, ``ppl``, ``loss_tokens``, ``baseline_loss`` (the untuned zero state), ``best``;
- with ``--objective dpo|orpo``, ``train`` and ``val`` also have ``chosen_loss``, ``accuracy``, ``margin`` and
  ``pairs`` (``val``: ``chosen_ppl`` in place of ``ppl``); with ``distill``, ``kl`` and ``ce``;
- ``sample``: ``prompt``, ``output``, ``reference``.

A process killed while appending can leave a torn last line; readers skip it (resume removes it, and says
so). Damage anywhere else is an error naming the line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from statetune.errors import DataError
from statetune.fileio import atomic_write

log = logging.getLogger("statetune.train")


class MetricsLog:
    """Appends events to ``metrics.jsonl`` and scalars to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        """``resume_step``: the step a resumed run continues from (events after it are dropped; -1 drops
        all, for a run restarted from the beginning); None for a fresh run."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        try:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else max(resume_step, 0)
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)
        except ImportError:  # TensorBoard files are optional; metrics.jsonl is always written
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        """Drop events newer than the checkpoint a run resumes from, so none is logged twice."""
        lines, torn = _read_lines(self.path)
        if torn:
            log.warning("%s: removed a torn last line (the run was killed while writing it)", self.path)
        text = "".join(raw + "\n" for raw, event in lines if event["step"] <= step)
        if text.encode() != self.path.read_bytes():  # also ends a last line that lacks its newline
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({"type": kind, "step": step, **values}, ensure_ascii=False, allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
            if kind == "sample":
                self._tb.add_text("sample", f"{values.get('prompt', '')} → {values.get('output', '')}", step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All events of a ``metrics.jsonl`` (a torn last line, from a killed run, is skipped)."""
    return [event for _, event in _read_lines(Path(path))[0]]


def _read_lines(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """``([(line, event)...], torn)``: every event with its text, and whether a torn last line was skipped."""
    try:
        rows = path.read_bytes().split(b"\n")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    while rows and not rows[-1].strip():
        rows.pop()
    out = []
    for lineno, raw in enumerate(rows, 1):
        if not raw.strip():
            continue
        try:
            event = json.loads(raw)
            if not isinstance(event, dict) or not isinstance(event.get("step"), int) or "type" not in event:
                raise ValueError("not an event with 'type' and an integer 'step'")
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            if lineno == len(rows):
                return out, True
            raise DataError(f"{path}:{lineno}: damaged log line ({e}); only a torn last line is repaired "
                            f"automatically: remove or fix this line") from None
        out.append((raw.decode(), event))
    return out, False
