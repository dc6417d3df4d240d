"""What a run folder holds, and what may change when a run is continued.

A run folder means one run: a fresh ``train`` into a folder that already holds one is refused (``--resume``
continues it, ``--overwrite`` starts over), and ``--resume`` keeps the options in ``config.toml`` (read by
the same loader as ``--config``) except the few in ``MAY_CHANGE``, which only say how long to train and how
often to look. The data files may move but
not change: their size and SHA-256 are recorded in every checkpoint and compared on resume.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from statetune.errors import DataError, OptionError, StatetuneError
from statetune.fileio import atomic_write
from statetune.options import build, flag, flatten, load_toml, to_toml
from statetune.train.config import TrainConfig

# Options that may differ from the run's config.toml on --resume (documented in docs/training.md).
MAY_CHANGE = ("max_steps", "epochs", "eval_every", "save_every", "keep_checkpoints", "patience", "samples",
              "progress", "device", "activation_checkpoint", "threads")
# May point elsewhere on --resume, as long as the content is the same (checked against the checkpoint).
MAY_MOVE = ("model", "train_data", "val_data")
# What a run writes into its folder; --overwrite removes exactly these, nothing else.
LR_SEARCH = "lr_search.json"
RUN_FILES = ("config.toml", "metrics.jsonl", "state-best.safetensors", "state-final.safetensors", "curves.png",
             LR_SEARCH)
RUN_DIRS = ("checkpoints", "tensorboard")


def holds_run(run_dir: Path) -> list[str]:
    """The names of run artefacts in ``run_dir`` that mark it as holding a run (empty: free to use)."""
    found = [n for n in ("config.toml", "metrics.jsonl") if (run_dir / n).exists()]
    ck = run_dir / "checkpoints"
    if ck.is_dir() and any(ck.iterdir()):
        found.append("checkpoints/")
    return found


def check_fresh(config: TrainConfig, overwrite: bool) -> None:
    """Refuse a fresh run into a folder that holds one, unless ``overwrite``."""
    run = Path(config.out)
    if run.exists() and not run.is_dir():
        raise OptionError(f"--out: {run} exists and is not a directory")
    found = holds_run(run) if run.is_dir() else []
    if found and not overwrite:
        raise OptionError(f"--out: {run} already holds a training run ({', '.join(found)}); continue it with "
                          f"--resume {run}, or start it over with --overwrite (deletes its checkpoints, logs "
                          f"and states)")


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's files (for ``--overwrite``); other files in the folder are left alone."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def resumed_config(run_dir: str | Path, given: dict[str, Any]) -> TrainConfig:
    """The config of the run in ``run_dir`` (its config.toml, read as ``--config`` reads a file), with the
    changes in ``MAY_CHANGE``/``MAY_MOVE`` taken from ``given`` (flat option values, see :func:`explicit`);
    any other difference is refused."""
    run = Path(run_dir)
    cfg = run / "config.toml"
    if not cfg.is_file():
        raise OptionError(f"--resume: {run} is not a run directory (no config.toml)")
    try:
        values = load_toml(cfg, TrainConfig, obsolete=("overwrite",))
    except OptionError as e:
        raise _damaged(str(e).removeprefix("--config: ")) from None
    except UnicodeDecodeError as e:
        raise _damaged(f"{cfg}: not UTF-8 text (byte {e.start})") from None
    values["out"] = str(run)
    values.setdefault("bptt", "truncated")  # runs from before --bptt existed keep the objective they began with
    try:
        saved = build(TrainConfig, values)
    except OptionError as e:
        raise StatetuneError(f"--resume: {cfg} holds an invalid option: {e}") from None
    saved_values = flatten(saved)
    clash = [f"{flag(k)} {_show(v)} differs from the run's {k} = {_show(saved_values[k])}"
             for k, v in given.items() if k not in MAY_CHANGE + MAY_MOVE + ("out",) and v != saved_values[k]
             and not (k == "lr" and v == "auto" and (run / LR_SEARCH).is_file())]  # the rate it searched
    if "out" in given and Path(given["out"]).resolve() != run.resolve():
        clash.insert(0, f"--out {given['out']} (a resumed run stays in {run})")
    if clash:
        may = ", ".join(flag(k) for k in MAY_CHANGE)
        raise OptionError(f"--resume {run}: {'; '.join(clash)}: only {may} may change when resuming (and the "
                          f"model and data files may move); start a new run to change the others, e.g. with "
                          f"--init {run / 'state-best.safetensors'}")
    changes = {k: v for k, v in given.items() if k in MAY_CHANGE + MAY_MOVE}
    return build(TrainConfig, {**saved_values, **changes})


def _damaged(detail: str) -> StatetuneError:
    return StatetuneError(f"--resume: the run's config.toml is damaged: {detail}; restore it (it holds the "
                          f"options the run was started with) or start a new run")


def explicit(config: TrainConfig) -> dict[str, Any]:
    """The options set to something other than their default (those given on the command line or config),
    flat, as :func:`resumed_config` takes them."""
    default = flatten(TrainConfig())
    return {k: v for k, v in flatten(config).items() if v != default[k]}


def _show(v: Any) -> str:
    return str(getattr(v, "value", v))


def write_config(run_dir: Path, config: TrainConfig, lr_search: dict[str, Any] | None = None) -> None:
    """Write ``config.toml``: the run's config (the switches that only say how it was launched, such as
    ``--overwrite``, are not part of it), headed by a comment when ``--lr auto`` picked its rate. An unchanged
    file is left untouched (a resume that changes nothing rewrites nothing)."""
    text = to_toml(config)
    if lr_search:
        text = (f"# lr = {lr_search['lr']!r} was picked by --lr auto ({lr_search['rule']}); the trials are in "
                f"{LR_SEARCH}\n") + text
    path = run_dir / "config.toml"
    if path.is_file() and path.read_bytes() == text.encode():
        return
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_lr_search(run_dir: Path, search: dict[str, Any]) -> None:
    """Write ``lr_search.json``: what ``--lr auto`` tried and picked."""
    text = json.dumps(search, indent=2, allow_nan=False) + "\n"
    atomic_write(run_dir / LR_SEARCH, lambda tmp: Path(tmp).write_text(text))


def read_lr_search(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``lr_search.json`` (None when its rate was given, or the file is unreadable)."""
    try:
        data = json.loads((run_dir / LR_SEARCH).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_length(step: int, total_steps: int, where: Path) -> None:
    """Refuse a resumed run whose (new) length ends before the step its checkpoint is at."""
    if step > total_steps:
        raise OptionError(f"--max-steps/--epochs: the run would end at step {total_steps}, but {where} is "
                          f"already at step {step}; give a longer run (or use its state files as they are)")


# -- the config a checkpoint was trained with ----------------------------------------------------------------
def recorded_config(config: TrainConfig) -> dict[str, Any]:
    """The run's options as plain values (choices as their text, paths as text), kept in every checkpoint so
    that a resume can tell a hand-edited ``config.toml`` from the run's own."""
    return {k: str(v) if isinstance(v, Path) else getattr(v, "value", v) for k, v in flatten(config).items()}


def check_same_config(payload: dict[str, Any], config: TrainConfig, where: Path) -> None:
    """Refuse to resume with options that differ from those the checkpoint ``where`` recorded, except the
    ones that may change (``MAY_CHANGE``, ``MAY_MOVE``); checkpoints from before options were recorded have
    nothing to compare."""
    recorded = payload.get("config")
    if not isinstance(recorded, dict):
        return
    current = recorded_config(config)
    fixed = MAY_CHANGE + MAY_MOVE + ("out",)
    clash = [f"{k} = {_show(current[k])} differs from {_show(v)}" for k, v in recorded.items()
             if k in current and k not in fixed and current[k] != v]
    if clash:
        cfg = Path(config.out) / "config.toml"
        raise StatetuneError(f"--resume: {cfg}: {'; '.join(clash)}, the value {where} was trained with; only "
                             f"{', '.join(MAY_CHANGE)} may change when resuming: restore the file, or start a new "
                             f"run to change the others")


# -- data fingerprints ----------------------------------------------------------------------------------------
def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Name, size and SHA-256 of a file, read in 1 MiB blocks."""
    p = Path(path)
    h = hashlib.sha256()
    with p.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return {"file": p.name, "size": p.stat().st_size, "sha256": h.hexdigest()}


def data_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """Fingerprints of the training (and validation) data, recorded in every checkpoint and state file."""
    return {"train": file_fingerprint(config.train_data),
            "val": file_fingerprint(config.val_data) if config.val_data else None}


def check_same_inputs(payload: dict[str, Any], model_fingerprint: str, data: dict[str, Any], where: Path) -> None:
    """Refuse to resume when the base model or the data differ from what the checkpoint was trained with
    (checkpoints from before fingerprints were recorded have nothing to compare)."""
    recorded_model = payload.get("model_fingerprint")
    if recorded_model is not None and recorded_model != model_fingerprint:
        raise StatetuneError(f"--resume: --model is not the base model {where} was trained on (fingerprint "
                             f"{model_fingerprint}, the checkpoint's {recorded_model}); resume with that model")
    if payload.get("data") is not None:
        _check_same_data(payload["data"], data, where)


def _check_same_data(recorded: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    for role, flag_name in (("train", "--train-data"), ("val", "--val-data")):
        old, new = recorded.get(role), current.get(role)
        if old is None and new is None:
            continue
        if old is None or new is None:
            raise DataError(f"--resume: {where} was written {'without' if old is None else 'with'} "
                            f"{flag_name}; the run's data cannot change on resume")
        if (old["size"], old["sha256"]) != (new["size"], new["sha256"]):
            raise DataError(f"--resume: {flag_name} {new['file']} changed since {where} was written "
                            f"(size {old['size']} -> {new['size']} bytes, SHA-256 {old['sha256'][:12]}... -> "
                            f"{new['sha256'][:12]}...); the run cannot continue on other data: restore the "
                            f"file, or start a new run (--init with one of this run's states)")
