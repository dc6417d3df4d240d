"""Convert a model between the official layout (one ``.pth`` / ``.safetensors`` file) and a Hugging Face
directory (either HF layout), in both directions: the public converters only go from official to Hugging
Face. An HF directory gets tokenizer files too, so that Hugging Face tools load its tokenizer offline."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from statetune.errors import CheckpointError
from statetune.fileio import atomic_write
from statetune.model.checkpoint import TIME_STATE, read_weights

LAYOUTS = ("pth", "hf")
TOKENIZER_CHOICES = ("auto", "world", "bytes", "none")


def hf_tokenizer_files(name: str, vocab_size: int, where: str) -> dict[str, str]:
    """The tokenizer files for an HF directory: ``name`` ("auto" picks by the vocabulary size and writes
    none when no statetune tokenizer fits it; "none" writes none)."""
    from statetune.tokenizer import BYTES_VOCAB_RANGE, WORLD_VOCAB_SIZE, get_tokenizer, tokenizer_name_for_vocab

    if name == "none":
        return {}
    if name == "auto":
        if vocab_size != WORLD_VOCAB_SIZE and vocab_size not in BYTES_VOCAB_RANGE:
            return {}
        name = tokenizer_name_for_vocab(vocab_size)
    tokenizer = get_tokenizer(name)
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(f"{where}: the {name} tokenizer has {tokenizer.vocab_size} ids but the model's "
                              f"vocabulary has only {vocab_size}")
    from statetune.model.hf_tokenizer import tokenizer_files

    return tokenizer_files(tokenizer)


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, dtype: torch.dtype | None = None,
                       max_shard_bytes: int | None = None, layout: str = "fla", tokenizer: str = "auto") -> Path:
    """Read ``src`` (any layout) and write it to ``dst`` in layout ``to`` ("pth" or "hf").

    ``dtype`` casts the floating-point weights (default: keep them). ``to="pth"`` writes a ``.safetensors``
    file when ``dst`` ends so, else a ``torch.save`` dict of tensors; ``to="hf"`` writes a new directory in
    the HF ``layout`` ("fla" or "transformers"), sharded above ``max_shard_bytes``, with the files of
    ``tokenizer`` (one of :data:`TOKENIZER_CHOICES`). Returns ``dst``.
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

        vocab = sd["emb.weight"].shape[0] if "emb.weight" in sd else 0
        files = hf_tokenizer_files(tokenizer, vocab, str(src))
        return write_hf_dir(sd, dst, max_shard_bytes, layout, files)
    if dst.is_dir():
        raise CheckpointError(f"{dst}: is a directory; --to pth writes one .pth or .safetensors file")
    sd = {k: v.contiguous().clone() if v.storage_offset() or not v.is_contiguous() else v for k, v in sd.items()}
    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(dst, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    else:
        atomic_write(dst, lambda tmp: torch.save(sd, tmp))
    return dst
