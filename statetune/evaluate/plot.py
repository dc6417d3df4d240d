"""A PNG of a run's training and validation loss curves, from ``RUN_DIR/metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path

from statetune.errors import StatetuneError
from statetune.fileio import atomic_write
from statetune.train.metrics import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw train loss (and validation loss with the zero-state baseline) against steps."""
    run = Path(run_dir)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise StatetuneError(f"RUN_DIR: {run} has no metrics.jsonl (is it a `statetune train` run directory?)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StatetuneError("plotting needs matplotlib: pip install 'statetune[eval]'") from None
    events = read_metrics(path)
    train = [(e["step"], e["loss"]) for e in events if e["type"] == "train"]
    val = [(e["step"], e["loss"]) for e in events if e["type"] == "val"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", alpha=0.6)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
        base = next((e["baseline_loss"] for e in events if e["type"] == "val" and e.get("baseline_loss")), None)
        if base is not None:
            ax.axhline(base, color="grey", linestyle="--", label="zero state (untuned)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run.name)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out) if out else run / "curves.png"
    # through a temporary file: an interrupted draw never leaves a truncated image under the real name
    fmt = out_path.suffix.lstrip(".").lower() or "png"
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, dpi=120, format=fmt))
    plt.close(fig)
    return out_path
