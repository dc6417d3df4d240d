"""Read RWKV checkpoints into models: official ``.pth`` (without unpickling code) or ``.safetensors``
files, and Hugging Face model directories of RWKV-7 (renamed to the official names on the way in)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from statetune.device import resolve_device
from statetune.errors import CheckpointError
from statetune.model.base import RWKVBase
from statetune.model.config import V7, RWKVConfig, infer_config
from statetune.model.state import RWKVState

TIME_STATE = ".att.time_state"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint file, memory-mapped where possible. Never unpickles arbitrary objects."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p}: not a readable safetensors file: {e}") from None
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{p}: not a PyTorch tensor checkpoint (read with weights_only=True, which refuses arbitrary "
                f"Python objects): {first}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{p}: expected a dict of named tensors, found {type(sd).__name__}")
    return sd


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file or Hugging Face directory, under official names, all real floating
    point (see :func:`check_weight_dtypes`)."""
    if Path(path).is_dir():
        from statetune.model.hf import read_hf_dir

        sd = read_hf_dir(path)
    else:
        sd = dict(read_state_dict(path))
    check_weight_dtypes(sd, path)
    return sd


def check_weight_dtypes(sd: dict[str, Tensor], where: str | Path) -> None:
    """Refuse any tensor that is not real floating point, naming the file and the first such tensor.

    Integer-quantised weights (int8/uint8 and the scales beside them) would be read as plain numbers, a
    complex tensor would lose its imaginary part in the cast and a boolean one would become 0/1: each gives
    a silently wrong model, so they are refused rather than converted.
    """
    bad = sorted(k for k, v in sd.items() if not v.is_floating_point())
    if not bad:
        return
    first = sd[bad[0]]
    kind = ("complex" if first.is_complex() else "boolean" if first.dtype == torch.bool
            else "integer (quantised)")
    raise CheckpointError(f"{where}: {len(bad)} tensor(s) hold {kind} weights, e.g. {bad[0]} ({first.dtype}); "
                          f"statetune needs fp32/bf16/fp16 weights: use the unquantised checkpoint")


def read_vocab_size(path: str | Path) -> int:
    """The vocabulary size of a checkpoint (rows of ``emb.weight``), without building the model."""
    p = Path(path)
    if p.is_dir():
        from statetune.model.hf import hf_vocab_size

        return hf_vocab_size(p)
    if p.suffix == ".safetensors" and p.is_file():
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            if "emb.weight" not in f.keys():
                raise CheckpointError(f"{p}: missing key 'emb.weight'")
            return f.get_slice("emb.weight").get_shape()[0]
    sd = read_state_dict(p)
    if "emb.weight" not in sd:
        raise CheckpointError(f"{p}: missing key 'emb.weight'")
    return sd["emb.weight"].shape[0]


def build_model(cfg: RWKVConfig) -> RWKVBase:
    """An RWKV model of the given sizes with zero weights (frozen)."""
    if cfg.version == V7:
        from statetune.model.rwkv7 import RWKV7

        return RWKV7(cfg)
    from statetune.model.rwkv6 import RWKV6

    return RWKV6(cfg)


def split_time_state(sd: dict[str, Tensor], cfg: RWKVConfig, where: str) -> RWKVState | None:
    """Remove ``blocks.{i}.att.time_state`` keys (a state merged into the model) and return them as a
    batch-1 state, or None when the checkpoint has none."""
    keys = [k for k in sd if k.endswith(TIME_STATE)]
    if not keys:
        return None
    H, N = cfg.n_head, cfg.head_size
    wkv = torch.zeros(cfg.n_layer, 1, H, N, N)
    for i in range(cfg.n_layer):
        key = f"blocks.{i}{TIME_STATE}"
        if key not in sd:
            raise CheckpointError(f"{where}: has time_state for some layers but not {key!r}")
        t = sd.pop(key)
        if tuple(t.shape) != (H, N, N):
            raise CheckpointError(f"{where}: {key} has shape {tuple(t.shape)}, expected {(H, N, N)}")
        wkv[i, 0] = t.float()
    C = cfg.n_embd
    return RWKVState(torch.zeros(cfg.n_layer, 1, C), wkv, torch.zeros(cfg.n_layer, 1, C))


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> RWKVBase:
    """Load an RWKV-7 (x070) or RWKV-6 (x060) model, frozen, in ``dtype`` on ``device``.

    ``path`` is an official checkpoint file (``.pth`` or ``.safetensors``) or a Hugging Face model
    directory of RWKV-7 (``config.json`` with ``model.safetensors`` or sharded safetensors). Sizes come
    from tensor shapes. Keys are matched exactly: a missing, unexpected or misshapen key is a
    :class:`CheckpointError` naming the file and the keys.
    """
    where = str(path)
    device = resolve_device(device, flag="load_model(device=...)")
    sd = read_weights(path)
    cfg = infer_config(sd, where)
    default_state = split_time_state(sd, cfg, where)
    model = build_model(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:10])}"
                         + (" ..." if len(unexpected) > 10 else ""))
        raise CheckpointError(f"{where}: not a {cfg.version} checkpoint of the sizes read from its shapes; "
                              + "; ".join(parts))
    for k, ref in expected.items():
        if sd[k].shape != ref.shape:
            raise CheckpointError(f"{where}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(ref.shape)} "
                                  f"for a model with {cfg.n_layer} layers, width {cfg.n_embd}, "
                                  f"{cfg.n_head} heads of {cfg.head_size}")
    converted = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    model.requires_grad_(False)
    model.eval()
    if default_state is not None:
        model.default_state = default_state.to(device=device, dtype=dtype)
    return model
