"""The two Hugging Face layouts of RWKV-7 that statetune reads and writes, and how to tell them apart.

- ``fla``: flash-linear-attention's ``RWKV7ForCausalLM`` (fla-hub models, the ``rwkv7-hf`` converter):
  renamed tensors (``model.layers.{i}.attn.r_proj.weight``), low-rank pairs as ``nn.Linear``.
- ``transformers``: the transformers-native ``Rwkv7ForCausalLM`` the RWKV org publishes (defined by a pull
  request to huggingface/transformers, rwkv-rs/transformers-rwkv): BlinkDL's official names and shapes under
  ``model.`` (``model.blocks.{i}.att.r_k``), ``head.weight`` outside it, block 0's ``v0/v1/v2`` dropped.

Both say ``"model_type": "rwkv7"``, so a directory's layout is read from ``architectures`` (the class
names differ only in case), else from the fields only one of them has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from statetune.errors import CheckpointError
from statetune.model.config import V7, RWKVConfig
from statetune.model.hf_names import hf_to_official, official_to_hf, official_to_transformers, transformers_to_official

NORM_EPS = 1e-5  # the official LayerNorm eps (the GroupNorm's is head_size * 1e-5 in both layouts)
_END = {"eos_token_id": 0, "pad_token_id": 0, "bos_token_id": None}  # id 0 ends a text; RWKV uses no bos


@dataclass(frozen=True)
class Layout:
    """How one HF layout names tensors and writes ``config.json``."""

    name: str
    architecture: str
    embedding: str  # the embedding's tensor name (its rows are the vocabulary)
    to_hf: Callable[[dict[str, Tensor], str], dict[str, Tensor]]
    to_official: Callable[[dict[str, Tensor], str], dict[str, Tensor]]
    sizes: dict[str, Callable[[RWKVConfig], Any]]  # config.json field -> its value, from the tensor shapes
    only_here: tuple[str, ...]  # config.json fields that only this layout writes (for directories without
    # ``architectures``)

    def config(self, cfg: RWKVConfig, dtype: torch.dtype) -> dict[str, Any]:
        """The ``config.json`` of a model in this layout."""
        sizes = {k: get(cfg) for k, get in self.sizes.items()}
        common = {"architectures": [self.architecture], "model_type": V7, **sizes, **_END,
                  "tie_word_embeddings": False, "use_cache": True}
        dtype_name = str(dtype).removeprefix("torch.")
        if self.name == "fla":
            return {**common, "torch_dtype": dtype_name, "attn_mode": "chunk", "hidden_ratio": cfg.dim_ffn / cfg.n_embd,
                    "value_dim": [cfg.n_embd] * cfg.n_layer, "norm_eps": NORM_EPS, "norm_bias": True,
                    "norm_first": True, "fuse_norm": False}
        return {**common, "layer_norm_epsilon": NORM_EPS, "deep_embedding_size": 0, "wkv_mode": "fp32io16",
                "initializer_range": 0.02, "dtype": dtype_name}

    def check(self, config: dict[str, Any], cfg: RWKVConfig) -> list[str]:
        """What in ``config`` disagrees with the sizes read from the tensors, or with what statetune
        computes (one message per field)."""
        sizes = dict(self.sizes)
        if cfg.n_layer == 1:  # block 0 has no value-residual weights, so one layer does not show this width
            sizes.pop("v_low_rank_dim" if self.name == "fla" else "value_low_rank_dim")
        wrong = [f"{k} is {config[k]!r} but the tensors say {get(cfg)}" for k, get in sizes.items()
                 if config.get(k) is not None and config[k] != get(cfg)]
        eps = "norm_eps" if self.name == "fla" else "layer_norm_epsilon"
        if config.get(eps, NORM_EPS) != NORM_EPS:
            wrong.append(f"{eps} is {config[eps]!r}; statetune computes the official {NORM_EPS}")
        if self.name == "fla" and config.get("norm_first") is False:
            wrong.append("norm_first is false; the official model normalises the embeddings (pre_norm)")
        if self.name == "transformers" and config.get("deep_embedding_size", 0):
            wrong.append(f"deep_embedding_size is {config['deep_embedding_size']!r}; statetune runs RWKV-7 "
                         f"without DeepEmbed only")
        return wrong


_COMMON_SIZES: dict[str, Callable[[RWKVConfig], Any]] = {
    "hidden_size": lambda c: c.n_embd, "num_hidden_layers": lambda c: c.n_layer,
    "vocab_size": lambda c: c.vocab_size, "head_dim": lambda c: c.head_size,
    "intermediate_size": lambda c: c.dim_ffn, "attention_hidden_size": lambda c: c.n_embd,
    "decay_low_rank_dim": lambda c: c.lora["w"], "a_low_rank_dim": lambda c: c.lora["a"],
    "gate_low_rank_dim": lambda c: c.lora["g"],
}

FLA = Layout("fla", "RWKV7ForCausalLM", "model.embeddings.weight", official_to_hf, hf_to_official,
             {**_COMMON_SIZES, "num_heads": lambda c: c.n_head, "v_low_rank_dim": lambda c: c.lora["v"]},
             ("attn_mode", "value_dim", "norm_first", "fuse_norm", "v_low_rank_dim", "norm_eps"))
TRANSFORMERS = Layout("transformers", "Rwkv7ForCausalLM", "model.emb.weight", official_to_transformers,
                      transformers_to_official,
                      {**_COMMON_SIZES, "num_attention_heads": lambda c: c.n_head,
                       "value_low_rank_dim": lambda c: c.lora["v"]},
                      ("value_low_rank_dim", "wkv_mode", "layer_norm_epsilon", "deep_embedding_size"))
LAYOUTS = {layout.name: layout for layout in (FLA, TRANSFORMERS)}
DEFAULT_LAYOUT = "fla"


def detect_layout(config: dict[str, Any], where: str) -> Layout:
    """The layout a ``config.json`` describes: by ``architectures``, else by the fields only one layout
    writes; an error naming the file when neither tells."""
    archs = config.get("architectures") or []
    by_arch = [layout for layout in LAYOUTS.values() if layout.architecture in archs]
    if len(by_arch) == 1:
        return by_arch[0]
    if archs:
        known = " or ".join(layout.architecture for layout in LAYOUTS.values())
        raise CheckpointError(f"{where}: architectures is {archs!r}; statetune reads {known}")
    by_fields = [layout for layout in LAYOUTS.values() if any(k in config for k in layout.only_here)]
    if len(by_fields) == 1:
        return by_fields[0]
    raise CheckpointError(f"{where}: cannot tell the layout (no 'architectures', and the fields fit "
                          f"{'both' if by_fields else 'neither'} of {', '.join(LAYOUTS)}); add "
                          f"\"architectures\": [\"RWKV7ForCausalLM\"] (fla) or [\"Rwkv7ForCausalLM\"] (transformers)")
