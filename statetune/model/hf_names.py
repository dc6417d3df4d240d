"""Tensor names of RWKV-7 in the Hugging Face layout (flash-linear-attention's ``RWKV7ForCausalLM``) and
in the official one, both ways.

The official names are what statetune's modules use; an HF checkpoint is renamed on the way in and out,
so that one set of model code serves both. The table follows the converters that produce the HF files
(``rwkv7-hf``'s ``translate_name`` and fla's ``convert_from_rwkv7``): low-rank pairs become ``nn.Linear``
layers (hence the transposes), the three low-rank biases become the second layer's bias, and ``k_k``,
``k_a``, the biases and the channel-mix ``x_k`` are stored flat (``[C]``) instead of ``[1, 1, C]``.
Block 0's value-residual weights (``att.v0/v1/v2``) are never used by the math and have no HF name: they
are dropped on the way out, as the public converters drop them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import Tensor

from statetune.errors import CheckpointError

# official name -> HF name for the tensors outside the blocks
TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
       "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}

# How a tensor changes between the layouts: "" same shape, "T" transposed, "flat" [1, 1, C] <-> [C].
_BLOCK_ROWS: list[tuple[str, str, str]] = [
    *((f"{o}.{p}", f"{h}.{p}", "") for o, h in (("ln0", "pre_norm"), ("ln1", "attn_norm"), ("ln2", "ffn_norm"))
      for p in ("weight", "bias")),
    *((f"att.x_{c}", f"attn.x_{c}", "") for c in "rwkvag"),
    *((f"att.{n}1", f"attn.{n}_lora.lora.0.weight", "T") for n in "wavg"),
    *((f"att.{n}2", f"attn.{n}_lora.lora.2.weight", "T") for n in "wavg"),
    *((f"att.{n}0", f"attn.{n}_lora.lora.2.bias", "flat") for n in "wav"),
    ("att.k_k", "attn.k_k", "flat"), ("att.k_a", "attn.k_a", "flat"), ("att.r_k", "attn.r_k", ""),
    *((f"att.{o}.weight", f"attn.{h}_proj.weight", "") for o, h in
      (("receptance", "r"), ("key", "k"), ("value", "v"), ("output", "o"))),
    ("att.ln_x.weight", "attn.g_norm.weight", ""), ("att.ln_x.bias", "attn.g_norm.bias", ""),
    ("ffn.x_k", "ffn.x_k", "flat"), ("ffn.key.weight", "ffn.key.weight", ""),
    ("ffn.value.weight", "ffn.value.weight", ""),
]
TO_HF = {o: (h, how) for o, h, how in _BLOCK_ROWS}
TO_OFFICIAL = {h: (o, how) for o, h, how in _BLOCK_ROWS}
UNUSED_IN_BLOCK0 = ("att.v0", "att.v1", "att.v2")
# older fla uploads pack the six token-mix coefficients into one [6, C] tensor, in this order
PACKED_MIX = "attn.x_x"
PACKED_ORDER = "rwkvag"

_OFFICIAL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")


# (block index, name inside the block, tensor, where) -> the renamed tensor(s), or None for an unknown name
BlockRenamer = Callable[[str, str, Tensor, str], "dict[str, Tensor] | None"]


def _rename(sd: dict[str, Tensor], top: dict[str, str], block: re.Pattern[str], rename_block: BlockRenamer,
            where: str, unknown_what: str) -> dict[str, Tensor]:
    """Rename a state dict one key at a time: names in ``top`` map directly, block names (``block`` captures
    the index and the rest) go through ``rename_block``; every key neither knows is collected into one
    error (``unknown_what`` describes them, with ``{n}`` for their count)."""
    out: dict[str, Tensor] = {}
    unknown = []
    for name, t in sd.items():
        if name in top:
            out[top[name]] = t
            continue
        m = block.fullmatch(name)
        renamed = rename_block(m.group(1), m.group(2), t, where) if m else None
        if renamed is None:
            unknown.append(name)
        else:
            out.update(renamed)
    if unknown:
        raise CheckpointError(f"{where}: {unknown_what.format(n=len(unknown))}: {', '.join(sorted(unknown)[:10])}")
    return out


def _block_to_hf(i: str, rest: str, t: Tensor, where: str) -> dict[str, Tensor] | None:
    if i == "0" and rest in UNUSED_IN_BLOCK0:
        return {}
    if rest not in TO_HF:
        return None
    hf, how = TO_HF[rest]
    if how == "T":
        t = t.t()
    elif how == "flat":
        t = t.reshape(-1)
    return {f"model.layers.{i}.{hf}": t.contiguous()}


def _block_to_official(i: str, rest: str, t: Tensor, where: str) -> dict[str, Tensor] | None:
    if rest == PACKED_MIX:
        if t.dim() != 2 or t.shape[0] != len(PACKED_ORDER):
            raise CheckpointError(f"{where}: model.layers.{i}.{rest} has shape {tuple(t.shape)}, expected [6, C] "
                                  f"(the x_r, x_w, x_k, x_v, x_a, x_g coefficients packed)")
        return {f"blocks.{i}.att.x_{c}": t[row].reshape(1, 1, -1).clone() for row, c in enumerate(PACKED_ORDER)}
    if rest not in TO_OFFICIAL:
        return None
    official, how = TO_OFFICIAL[rest]
    if how == "T":
        t = t.t()
    elif (how == "flat" or official.startswith("att.x_")) and t.dim() == 1:  # some store x_* flat too
        t = t.reshape(1, 1, -1)
    return {f"blocks.{i}.{official}": t.contiguous()}


def official_to_hf(sd: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """Rename (and reshape) an official RWKV-7 state dict into the HF layout; unknown keys are an error."""
    return _rename(sd, TOP, _OFFICIAL_BLOCK, _block_to_hf, where, "no Hugging Face name for {n} key(s)")


def hf_to_official(sd: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """Rename (and reshape) an HF-layout RWKV-7 state dict into official names; unknown keys are an error."""
    return _rename(sd, {h: o for o, h in TOP.items()}, _HF_BLOCK, _block_to_official, where,
                   "{n} key(s) that are not part of an RWKV-7 model in the Hugging Face layout")


# -- the transformers-native layout (``Rwkv7ForCausalLM``): official names under ``model.``, ``head`` outside --
TF_PREFIX = "model."
TF_HEAD = "head.weight"


def official_to_transformers(sd: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """Official names -> the transformers-native layout: every tensor but ``head.weight`` gains ``model.``;
    block 0's unused value-residual weights are dropped (the layout has no place for them). Shapes are the
    official ones, so nothing is transposed or reshaped."""
    out = {}
    for name, t in sd.items():
        if name in {f"blocks.0.{n}" for n in UNUSED_IN_BLOCK0}:
            continue
        if name != TF_HEAD and name not in TOP and not _OFFICIAL_BLOCK.fullmatch(name):
            raise CheckpointError(f"{where}: no transformers-layout name for key {name}")
        out[name if name == TF_HEAD else TF_PREFIX + name] = t.contiguous()
    return out


def transformers_to_official(sd: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """The transformers-native layout -> official names (drop the ``model.`` prefix); a key outside
    ``model.`` other than ``head.weight`` is an error naming it."""
    out, unknown = {}, []
    for name, t in sd.items():
        if name == TF_HEAD:
            out[name] = t
        elif name.startswith(TF_PREFIX):
            out[name.removeprefix(TF_PREFIX)] = t
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} key(s) outside 'model.' in a transformers-layout "
                              f"directory: {', '.join(sorted(unknown)[:10])}")
    return out
