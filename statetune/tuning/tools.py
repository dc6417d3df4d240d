"""What ``statetune state`` does to state files: describe one, merge one into a model checkpoint, and mix
several of the same model (task arithmetic)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from statetune.errors import StateFileError
from statetune.fileio import atomic_write
from statetune.model.state import RWKVState
from statetune.tuning.statefile import StateFile

log = logging.getLogger("statetune.state")


def describe(sf: StateFile, name: str) -> str:
    """A state's shapes, its per-layer norms (a table) and its metadata, as printed by ``state info``."""
    s = sf.state
    L, _, H, N, _ = s.wkv.shape
    lines = [f"{name}: {L} layers, {H} heads of {N} (width {H * N}); token-shift states: "
             f"{'yes' if sf.has_shift else 'no'}; {s.wkv.numel() * 4 / 1e6:.2f} MB of WKV state in fp32",
             "layer  wkv_norm  wkv_absmax  att_shift_norm  ffn_shift_norm"]
    for i in range(L):
        lines.append(f"{i:5d}  {s.wkv[i].norm():8.3f}  {s.wkv[i].abs().max():10.3f}  {s.att_shift[i].norm():14.3f}  "
                     f"{s.ffn_shift[i].norm():14.3f}")
    lines += [f"{k}: {v}" for k, v in sorted(sf.metadata.items())]
    return "\n".join(lines)


def merge_into_checkpoint(model, model_path: str, sf: StateFile, out: str, state_path: str = "STATE") -> None:
    """Write a copy of the checkpoint at ``model_path`` with ``sf``'s WKV states as ``blocks.N.att.time_state``
    keys (in the checkpoint's dtype) to ``out`` (.safetensors, else a torch .pth), atomically."""
    from statetune.model.checkpoint import TIME_STATE, read_state_dict

    sd = {k: v for k, v in read_state_dict(model_path).items() if not k.endswith(TIME_STATE)}
    dtype = sd["emb.weight"].dtype
    for i in range(sf.state.n_layer):
        sd[f"blocks.{i}{TIME_STATE}"] = sf.state.wkv[i, 0].float().cpu().to(dtype).contiguous()
    if sf.has_shift:
        log.warning("a merged checkpoint holds only the WKV states: the token-shift states are dropped")
    if model.config.version == "rwkv7":
        log.warning("the rwkv package's RWKV-7 class ignores time_state keys in a model file; for RWKV-Runner "
                    "export the state instead: statetune state convert %s STATE.pth --to pth", state_path)
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        atomic_write(out, lambda tmp: save_file({k: v.contiguous() for k, v in sd.items()}, tmp))
    else:
        atomic_write(out, lambda tmp: torch.save(sd, tmp))


def average_states(files: list[StateFile], names: list[str], weights: list[float] | None = None) -> StateFile:
    """``sum(weight_i * state_i)`` (default: equal weights summing to 1) of states of one shape and base model;
    ``names`` (the files' paths) appear in errors and in the ``averaged`` metadata."""
    first = files[0]
    fp = first.metadata.get("model_fingerprint")
    for path, sf in zip(names[1:], files[1:], strict=True):
        if sf.state.wkv.shape != first.state.wkv.shape:
            raise StateFileError(f"{path}: shape {tuple(sf.state.wkv.shape[2:])} x {sf.state.n_layer} layers differs "
                                 f"from {names[0]}")
        other = sf.metadata.get("model_fingerprint")
        if fp is not None and other is not None and other != fp:
            raise StateFileError(f"{path}: trained on a different base model (fingerprint {other}) than "
                                 f"{names[0]} ({fp})")
    weights = weights or [1.0 / len(files)] * len(files)
    mixed = RWKVState(*(sum(w * t for w, t in zip(weights, ts, strict=True))
                        for ts in zip(*(f.state.tensors() for f in files), strict=True)))
    meta = {k: v for k, v in first.metadata.items() if k not in ("format", "statetune_version", "trained")}
    meta["averaged"] = {"states": [Path(p).name for p in names], "weights": weights}
    return StateFile(mixed, meta, any(f.has_shift for f in files))
