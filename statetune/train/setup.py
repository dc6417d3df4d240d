"""Everything a run needs before its first step: options (fresh or resumed), model, data, tokenizer,
the initial state."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import torch

from statetune.errors import OptionError, StatetuneError
from statetune.model.state import RWKVState
from statetune.options import build
from statetune.train.options import TrainOptions


def resumed_options(opts: TrainOptions) -> TrainOptions:
    """The options a run was started with, read from ``RUN_DIR/config.toml``."""
    run = Path(opts.resume)
    cfg = run / "config.toml"
    if not cfg.is_file():
        raise OptionError(f"--resume: {run} is not a run directory (no config.toml)")
    with cfg.open("rb") as fh:
        values = tomllib.load(fh)
    values["out"] = str(run)
    values.setdefault("bptt", "truncated")  # runs from before --bptt existed keep the objective they began with
    values.pop("resume", None)
    return build(TrainOptions, values)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dataset_meta(path: str | Path) -> dict[str, Any]:
    """The ``.meta.json`` that ``prepare`` writes beside its output (empty when absent)."""
    p = Path(path)
    meta = p.with_name(p.name.removesuffix(".jsonl") + ".meta.json")
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise StatetuneError(f"{meta}: invalid JSON: {e}") from None


def pick_tokenizer(name: str, meta: dict[str, Any], vocab_size: int):
    """The tokenizer named by the flag, else by the dataset's meta.json, else by the vocabulary size."""
    from statetune.tokenizer import get_tokenizer, tokenizer_for_vocab

    if name != "auto":
        return get_tokenizer(name)
    named = meta.get("tokenizer")
    if isinstance(named, dict):
        named = named.get("name")
    if named:
        return get_tokenizer(named)
    return tokenizer_for_vocab(vocab_size)


def initial_state(opts: TrainOptions, model, tokenizer) -> RWKVState:
    """The state training starts from: zeros, a prompt's final state, or a state file."""
    if opts.init == "zeros":
        return model.zero_state(1)
    if opts.init == "prompt":
        ids = tokenizer.encode(opts.init_prompt)
        if not ids:
            raise OptionError("--init-prompt: the prompt tokenizes to nothing")
        with torch.no_grad():
            _, state = model(torch.tensor([ids], device=model.device), None, last_only=True)
        return state
    if Path(opts.init).is_file():
        from statetune.tuning.statefile import load_state

        return load_state(opts.init, model).state
    raise OptionError(f"--init: expected zeros, prompt, or an existing state file; got {opts.init!r} "
                      f"(no such file)")
