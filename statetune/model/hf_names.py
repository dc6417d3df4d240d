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


def official_to_hf(sd: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """Rename (and reshape) an official RWKV-7 state dict into the HF layout; unknown keys are an error."""
    out: dict[str, Tensor] = {}
    unknown = []
    for name, t in sd.items():
        if name in TOP:
            out[TOP[name]] = t
            continue
        m = _OFFICIAL_BLOCK.fullmatch(name)
        if m and m.group(1) == "0" and m.group(2) in UNUSED_IN_BLOCK0:
            continue
        if not m or m.group(2) not in TO_HF:
            unknown.append(name)
            continue
        hf, how = TO_HF[m.group(2)]
        if how == "T":
            t = t.t()
        elif how == "flat":
            t = t.reshape(-1)
        out[f"model.layers.{m.group(1)}.{hf}"] = t.contiguous()
    if unknown:
        raise CheckpointError(f"{where}: no Hugging Face name for {len(unknown)} key(s): "
                              f"{', '.join(sorted(unknown)[:10])}")
    return out


def hf_to_official(sd: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """Rename (and reshape) an HF-layout RWKV-7 state dict into official names; unknown keys are an error."""
    from_top = {h: o for o, h in TOP.items()}
    out: dict[str, Tensor] = {}
    unknown = []
    for name, t in sd.items():
        if name in from_top:
            out[from_top[name]] = t
            continue
        m = _HF_BLOCK.fullmatch(name)
        if m and m.group(2) == PACKED_MIX:
            if t.dim() != 2 or t.shape[0] != len(PACKED_ORDER):
                raise CheckpointError(f"{where}: {name} has shape {tuple(t.shape)}, expected [6, C] "
                                      f"(the x_r, x_w, x_k, x_v, x_a, x_g coefficients packed)")
            for row, c in enumerate(PACKED_ORDER):
                out[f"blocks.{m.group(1)}.att.x_{c}"] = t[row].reshape(1, 1, -1).clone()
            continue
        if not m or m.group(2) not in TO_OFFICIAL:
            unknown.append(name)
            continue
        official, how = TO_OFFICIAL[m.group(2)]
        if how == "T":
            t = t.t()
        elif (how == "flat" or official.startswith("att.x_")) and t.dim() == 1:  # some store x_* flat too
            t = t.reshape(1, 1, -1)
        out[f"blocks.{m.group(1)}.{official}"] = t.contiguous()
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} key(s) that are not part of an RWKV-7 model in the "
                              f"Hugging Face layout: {', '.join(sorted(unknown)[:10])}")
    return out
