"""Convert a model between the official layout (one ``.pth`` / ``.safetensors`` file) and a Hugging Face
directory, in both directions: the public converters only go from official to Hugging Face."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from statetune.errors import CheckpointError
from statetune.fileio import atomic_write
from statetune.model.checkpoint import TIME_STATE, read_weights

LAYOUTS = ("pth", "hf")


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, dtype: torch.dtype | None = None,
                       max_shard_bytes: int | None = None) -> Path:
    """Read ``src`` (either layout) and write it to ``dst`` in layout ``to`` ("pth" or "hf").

    ``dtype`` casts the floating-point weights (default: keep them). ``to="pth"`` writes a ``.safetensors``
    file when ``dst`` ends so, else a ``torch.save`` dict of tensors; ``to="hf"`` writes a new directory,
    sharded above ``max_shard_bytes``. Returns ``dst``.
    """
    if to not in LAYOUTS:
        raise ValueError(f"unknown layout {to!r}; choose from {', '.join(LAYOUTS)}")
    sd: dict[str, Tensor] = read_weights(src)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    dst = Path(dst)
    if to == "hf":
        merged = [k for k in sd if k.endswith(TIME_STATE)]
        if merged:
            raise CheckpointError(f"{src}: holds a merged state ({merged[0]} ...), which the Hugging Face layout "
                                  f"has no place for; convert the checkpoint without it")
        from statetune.model.hf import write_hf_dir

        return write_hf_dir(sd, dst, max_shard_bytes)
    if dst.is_dir():
        raise CheckpointError(f"{dst}: is a directory; --to pth writes one .pth or .safetensors file")
    sd = {k: v.contiguous().clone() if v.storage_offset() or not v.is_contiguous() else v for k, v in sd.items()}
    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(dst, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    else:
        atomic_write(dst, lambda tmp: torch.save(sd, tmp))
    return dst
