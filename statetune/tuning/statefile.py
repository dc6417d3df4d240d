"""State files: ``blocks.{i}.att.time_state`` ``[H, N, N]`` fp32 [value, key] in safetensors.

The key and layout are those of RWKV-PEFT and RWKV-LM, so RWKV-Runner and the ``rwkv`` package read the
file; statetune adds optional token-shift tensors and metadata (see DESIGN.md). :func:`load_state` is the
one reader every command uses: it reads every format ``state convert`` writes (see ``tuning/reading.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from statetune._version import __version__
from statetune.errors import OptionError, StateFileError
from statetune.fileio import atomic_write
from statetune.model.state import RWKVState
from statetune.tuning.keys import (
    AI00_FORMAT,
    ATT_SHIFT_KEY,
    FFN_SHIFT_KEY,
    FORMAT,
    WKV_KEY,
    StateFile,
)
from statetune.tuning.reading import from_tensors, is_ai00, read_file

__all__ = ["AI00_FORMAT", "ATT_SHIFT_KEY", "FFN_SHIFT_KEY", "FORMAT", "WKV_KEY", "StateFile", "check_fits",
           "check_metadata", "from_tensors", "is_ai00", "load_state", "model_metadata", "save_state"]


def model_metadata(model) -> dict[str, Any]:
    """The metadata fields that tie a state to its base model."""
    cfg = model.config
    return {"model_version": cfg.version, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
            "head_size": cfg.head_size, "vocab_size": cfg.vocab_size, "model_fingerprint": model.fingerprint()}


def save_state(path: str | Path, state: RWKVState, model=None, metadata: dict[str, Any] | None = None,
               with_shift: bool = False) -> None:
    """Write row 0 of ``state`` as a state file (atomically); shift vectors only when ``with_shift``."""
    from safetensors.torch import save_file

    tensors = {}
    for i in range(state.n_layer):
        tensors[WKV_KEY.format(i=i)] = state.wkv[i, 0].detach().float().cpu().contiguous()
        if with_shift:
            tensors[ATT_SHIFT_KEY.format(i=i)] = state.att_shift[i, 0].detach().float().cpu().contiguous()
            tensors[FFN_SHIFT_KEY.format(i=i)] = state.ffn_shift[i, 0].detach().float().cpu().contiguous()
    for k, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise StateFileError(f"{path}: not written: {k} holds NaN or infinite values")
    meta: dict[str, Any] = {"format": FORMAT, "statetune_version": __version__}
    if model is not None:
        meta.update(model_metadata(model))
    meta.update({k: v for k, v in (metadata or {}).items() if k not in ("format", "statetune_version")})
    try:
        str_meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, allow_nan=False)
                    for k, v in meta.items()}
    except ValueError:  # NaN or infinity somewhere in the metadata: JSON has no such numbers
        raise StateFileError(f"{path}: not written: its metadata holds NaN or infinity") from None
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=str_meta))


def load_state(path: str | Path, model=None, check_fingerprint: bool = True) -> StateFile:
    """Read a state file of any supported format, checked completely (see ``tuning/reading.py``).

    With ``model``, the state must fit it (:func:`check_fits`) and is moved to its device and dtype.
    """
    sf = read_file(path)
    if model is not None:
        check_fits(sf, model, path, check_fingerprint)
        sf.state = sf.state.to(device=model.device, dtype=model.dtype)
    return sf


def check_fits(sf: StateFile, model, where: str | Path, check_fingerprint: bool = True) -> None:
    """Raise :class:`StateFileError` unless the state can be used with ``model`` as it is.

    The same check ``generate``, ``chat``, ``eval``, ``train --init``, ``serve`` and ``state info`` run:
    the number of layers, each tensor's shape (the message names the key, the expected and found shape),
    values the model's dtype can hold, the base model's fingerprint when the file records one, and the
    metadata those commands act on (:func:`check_metadata`).
    """
    cfg = model.config
    L = sf.state.wkv.shape[0]
    want = [cfg.n_head, cfg.head_size, cfg.head_size]
    path, where = where, f"{where}: does not fit the model"
    model_desc = f"the model has {cfg.n_layer} layers of {cfg.n_head} heads x {cfg.head_size}"
    if L < cfg.n_layer:
        raise StateFileError(f"{where}: missing {WKV_KEY.format(i=L)}: expected shape {want}, found nothing "
                             f"(the state has {L} layers; {model_desc})")
    if L > cfg.n_layer:
        raise StateFileError(f"{where}: {WKV_KEY.format(i=cfg.n_layer)}: a layer the model does not have "
                             f"(the state has {L} layers; {model_desc})")
    have = list(sf.state.wkv.shape[2:])
    if have != want:
        raise StateFileError(f"{where}: {WKV_KEY.format(i=0)}: expected shape {want}, found {have} ({model_desc})")
    if sf.has_shift and sf.state.att_shift.shape[-1] != cfg.n_embd:
        raise StateFileError(f"{where}: {ATT_SHIFT_KEY.format(i=0)}: expected shape [{cfg.n_embd}], found "
                             f"[{sf.state.att_shift.shape[-1]}]")
    if model.dtype == torch.float16:  # the shift vectors take the model's dtype (WKV stays fp32)
        big = max(float(t.abs().max()) for t in (sf.state.att_shift, sf.state.ffn_shift))
        if big >= torch.finfo(torch.float16).max:
            raise StateFileError(f"{where}: token-shift values up to {big:.4g}, beyond float16's range: load "
                                 "the model in fp32 or bf16 (--dtype)")
    fp = sf.metadata.get("model_fingerprint")
    if check_fingerprint and fp is not None and fp != model.fingerprint():
        raise StateFileError(f"{where}: the state was trained on a different base model (fingerprint {fp}, "
                             f"this model's is {model.fingerprint()})")
    check_metadata(sf.metadata, path, cfg.vocab_size)


def check_metadata(meta: dict[str, Any], path: str | Path, vocab_size: int) -> None:
    """Raise :class:`StateFileError` naming the file and the key unless the metadata that commands act on
    can be used as it is: the prompt templates (``generate``, ``chat``, ``serve`` wrap prompts in them), the
    tokenizer (it must be one statetune has, with no more ids than the model's ``vocab_size``) and the
    ``stop`` and ``eos`` markers."""
    from statetune.prompts import parse_template
    from statetune.tokenizer import TOKENIZER_NAMES, get_tokenizer, named_tokenizer

    for key in ("prompt_template", "prompt_template_no_input"):
        source = meta.get(key)
        if source is None or source == "":
            continue
        if not isinstance(source, str):
            raise StateFileError(f"{path}: metadata {key}: expected a template string, found {source!r}")
        try:
            parse_template(source, f"metadata {key}")
        except OptionError as e:
            raise StateFileError(f"{path}: {e}") from None
    name = named_tokenizer(meta)
    if name is not None:
        if name not in TOKENIZER_NAMES:
            raise StateFileError(f"{path}: metadata tokenizer: unknown tokenizer {name!r} (statetune has "
                                 f"{', '.join(TOKENIZER_NAMES)})")
        if get_tokenizer(name).vocab_size > vocab_size:
            raise StateFileError(f"{path}: metadata tokenizer: {name} has {get_tokenizer(name).vocab_size} ids "
                                 f"but the model's vocabulary has only {vocab_size}")
    for key in ("stop", "eos"):
        marker = meta.get(key)
        if marker is None:
            continue
        ids = marker.get("ids") if isinstance(marker, dict) else None
        if (not isinstance(marker, dict) or not isinstance(marker.get("text"), str | None)
                or not isinstance(ids, list | None) or not all(type(i) is int and 0 <= i < vocab_size
                                                               for i in ids or [])):
            raise StateFileError(f"{path}: metadata {key}: expected {{\"text\": string or null, \"ids\": "
                                 f"[token ids below {vocab_size}]}}, found {str(marker)[:80]}")
