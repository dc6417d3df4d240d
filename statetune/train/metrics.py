"""Run logs: ``RUN_DIR/metrics.jsonl`` (one JSON object per event) and TensorBoard event files.

Schema of ``metrics.jsonl`` (every line has ``type`` and ``step``):

- ``train``: ``loss`` (mean over the step's loss tokens), ``lr``, ``grad_norm``, ``loss_tokens``,
  ``tokens`` (all tokens processed so far), ``tokens_per_s``, ``elapsed_s``;
- ``val``: ``loss``, ``ppl``, ``loss_tokens``, ``baseline_loss`` (the untuned zero state), ``best``;
- ``sample``: ``prompt``, ``output``, ``reference``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from statetune.fileio import atomic_write


class MetricsLog:
    """Appends events to ``metrics.jsonl`` and scalars to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)
        except ImportError:  # TensorBoard files are optional; metrics.jsonl is always written
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        """Drop events newer than the checkpoint a run resumes from, so none is logged twice."""
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(ln + "\n" for ln in keep)))

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({"type": kind, "step": step, **values}, ensure_ascii=False) + "\n")
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
    """All events of a ``metrics.jsonl``."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
