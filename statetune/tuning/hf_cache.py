"""A tuned state as the recurrent cache of a Hugging Face RWKV-7 model, so ``model.generate()`` starts from it.

Two Hugging Face implementations keep RWKV-7's state in the cache object passed as ``past_key_values``:

- ``rwkv7-hf`` (the converter's self-contained directories, loaded with ``trust_remote_code=True``, or the
  installed package's ``RWKV7ForCausalLM``): ``RWKV7Cache`` with per layer ``recurrent_state``
  ``[B, H, key, value]`` fp32, ``attention_shift`` and ``ffn_shift`` ``[B, C]`` in the model's dtype.
- flash-linear-attention (``fla.models.RWKV7ForCausalLM``): ``fla.models.cache_utils.Cache`` whose layer
  ``i`` is a dict with ``recurrent_state`` ``[B, H, key, value]``, ``conv_state`` (time-mix shift) and
  ``ffn_state`` (channel-mix shift) ``[B, C]``.

Both store the WKV matrix as [key, value], the transpose of statetune's [value, key]; both shifts are the
previous token's input to the mix after its layer norm, as in :class:`RWKVState`. A cache built here counts
zero tokens seen, so ``generate()`` reads the whole prompt from the state: pass the prompt's tokens as
``input_ids`` (at least one), exactly as without a cache. Generation mutates the cache: build a fresh one
per call. ``transformers``, ``rwkv7-hf`` and ``fla`` are optional and imported only inside the functions.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from statetune.errors import StateFileError
from statetune.model.state import RWKVState
from statetune.tuning.keys import ATT_SHIFT_KEY, WKV_KEY, StateFile

__all__ = ["KINDS", "generate_with_state", "hf_cache_to_state", "hf_kind", "state_to_hf_cache"]

KINDS = ("rwkv7-hf", "fla")


def hf_kind(model_or_config: Any) -> str:
    """Which implementation a Hugging Face model or config belongs to: ``"rwkv7-hf"`` or ``"fla"``.

    Told by the module that defines the class: fla's live under ``fla.``; rwkv7-hf's are the installed
    ``rwkv7_hf`` package or the copies a converted directory carries (remote code, a module named
    ``modeling_rwkv7``/``configuration_rwkv7`` that defines ``RWKV7Cache`` beside the model).
    """
    cfg = getattr(model_or_config, "config", model_or_config)
    if getattr(cfg, "model_type", None) != "rwkv7":
        raise ValueError(f"not an RWKV-7 model or config: model_type {getattr(cfg, 'model_type', None)!r} "
                         "(a state becomes the cache of rwkv7-hf's or fla's RWKV-7 only)")
    module = type(model_or_config).__module__
    if module == "fla" or module.startswith("fla."):
        return "fla"
    if module.startswith("rwkv7_hf") or module.endswith((".modeling_rwkv7", ".configuration_rwkv7")):
        return "rwkv7-hf"
    raise ValueError(f"cannot tell whose RWKV-7 {type(model_or_config).__name__} ({module}) is: expected "
                     "rwkv7-hf's or fla's")


def state_to_hf_cache(state: RWKVState | StateFile | str | Path, model_or_config: Any, batch_size: int = 1,
                      device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """The cache that makes a Hugging Face RWKV-7 model start from ``state`` (its ``past_key_values``).

    ``state``: an :class:`RWKVState` (batch 1, or ``batch_size`` rows), a loaded state file or a path to one
    (any format statetune reads). ``model_or_config``: the model, or for the installed ``rwkv7_hf`` and
    ``fla`` packages its config; pass the model when it was loaded with ``trust_remote_code`` (its own
    ``RWKV7Cache`` class is used, the one its ``forward`` accepts). A batch-1 state is repeated to
    ``batch_size`` rows (one per generated sequence: prompts times ``max(num_beams, num_return_sequences)``).
    ``device`` and ``dtype`` (of the shift vectors; the WKV state stays fp32) default to the model's, or
    CPU and float32 for a config. The cache counts zero tokens seen: give ``generate()`` the whole prompt.
    """
    where, st = _as_state(state)
    cfg = getattr(model_or_config, "config", model_or_config)
    kind = hf_kind(model_or_config)
    _check_fits(st, cfg, where, kind)
    if st.batch_size == 1:
        st = st.expand(batch_size)
    elif st.batch_size != batch_size:
        raise ValueError(f"{where}: the state has {st.batch_size} rows but batch_size is {batch_size} "
                         "(give a batch-1 state to repeat, or one row per sequence)")
    param = next(model_or_config.parameters(), None) if hasattr(model_or_config, "parameters") else None
    device = device if device is not None else (param.device if param is not None else "cpu")
    dtype = dtype if dtype is not None else (param.dtype if param is not None else torch.float32)
    wkv = [w.transpose(-1, -2).contiguous().to(device=device, dtype=torch.float32) for w in st.wkv]
    att = [a.to(device=device, dtype=dtype).contiguous() for a in st.att_shift]
    ffn = [f.to(device=device, dtype=dtype).contiguous() for f in st.ffn_shift]
    if kind == "fla":
        from fla.models.cache_utils import Cache

        layers = tuple({"recurrent_state": w, "attn_state": None, "conv_state": a, "ffn_state": f}
                       for w, a, f in zip(wkv, att, ffn, strict=True))
        return Cache.from_legacy_cache(layers, seen_tokens=0)
    return _generate_ready(_rwkv7_hf_cache_class(model_or_config))(wkv, att, ffn, seen_tokens=0)


def hf_cache_to_state(cache: Any) -> RWKVState:
    """The :class:`RWKVState` a Hugging Face RWKV-7 cache holds (all its rows; fp32, on the cache's device):
    the state after the tokens a model has read, ready for ``save_state`` or statetune's own model."""
    if hasattr(cache, "recurrent_state") and hasattr(cache, "attention_shift"):  # rwkv7-hf
        layers = list(zip(cache.recurrent_state, cache.attention_shift, cache.ffn_shift, strict=True))
    else:  # fla: one dict per layer
        layers = [(s.get("recurrent_state"), s.get("conv_state"), s.get("ffn_state")) for s in cache]
    if not layers:
        raise ValueError("the cache is empty: run the model on at least one token first")
    for i, layer in enumerate(layers):
        if any(t is None for t in layer):
            raise ValueError(f"the cache's layer {i} holds no state yet (has the model read any token?)")
    wkv = torch.stack([w.float().transpose(-1, -2) for w, _, _ in layers])
    att = torch.stack([a.float() for _, a, _ in layers])
    ffn = torch.stack([f.float() for _, _, f in layers])
    return RWKVState(att, wkv, ffn)


def generate_with_state(model: Any, state: RWKVState | StateFile | str | Path, inputs: Any, tokenizer: Any = None,
                        **gen_kwargs: Any) -> Any:
    """``model.generate()`` starting from ``state``, with the cache sized for the call: returns what
    ``generate`` returns (by default the prompt's ids followed by the new ones).

    ``inputs``: a string (encoded with ``tokenizer``, a Hugging Face tokenizer or statetune's), a list of
    token ids, or an ``input_ids`` tensor ``[B, T]`` (pass ``attention_mask=`` for left-padded batches:
    rwkv7-hf leaves the state untouched at padded positions). Other keywords go to ``generate`` unchanged.
    The cache is built for this call only and passed under the name this ``transformers`` uses.
    """
    from transformers import GenerationMixin

    if isinstance(inputs, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (or pass token ids)")
        if callable(tokenizer):  # a Hugging Face tokenizer
            encoded = tokenizer(inputs, return_tensors="pt")
            input_ids = encoded["input_ids"]
            gen_kwargs.setdefault("attention_mask", encoded.get("attention_mask"))
        else:  # statetune's (or anything with ``encode(text) -> ids``)
            input_ids = torch.tensor(tokenizer.encode(inputs), dtype=torch.long)
    else:
        input_ids = torch.as_tensor(inputs, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"the prompt must be at least one token ([batch, tokens]); got shape "
                         f"{list(input_ids.shape)}")
    param = next(model.parameters())
    input_ids = input_ids.to(param.device)
    if gen_kwargs.get("attention_mask") is None:
        gen_kwargs["attention_mask"] = torch.ones_like(input_ids)
    gc = getattr(model, "generation_config", None)
    beams = int(gen_kwargs.get("num_beams") or getattr(gc, "num_beams", 1) or 1)
    returns = int(gen_kwargs.get("num_return_sequences") or getattr(gc, "num_return_sequences", 1) or 1)
    rows = input_ids.shape[0] * max(beams, returns)
    cache = state_to_hf_cache(state, model, batch_size=rows)
    # the name generate() takes the cache by: ``cache`` in recent transformers, ``past_key_values`` before
    name = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
        else "past_key_values"
    with torch.no_grad(), _cache_reaches_forward(model):
        return model.generate(input_ids=input_ids, **{name: cache}, **gen_kwargs)


@contextmanager
def _cache_reaches_forward(model: Any) -> Iterator[None]:
    """While generating, hand ``generate``'s cache to a model whose ``forward`` takes ``past_key_values``.

    Recent ``transformers`` (5.25 among them) rename ``generate``'s ``past_key_values`` to ``cache`` and
    refuse a ``cache`` that the model's ``forward`` does not name; rwkv7-hf 0.9.0 and fla 0.6.0 still take
    ``past_key_values``, so a given cache would be refused (and the one generation makes itself is dropped
    between steps, each step reading the whole sequence again from zeros). For this call only, the model's
    ``prepare_inputs_for_generation`` accepts either name and passes the cache on as ``past_key_values``;
    with a ``transformers`` that still says ``past_key_values`` it changes nothing.
    """
    if "cache" in inspect.signature(model.forward).parameters:
        yield
        return
    original = model.prepare_inputs_for_generation

    def prepare(input_ids: Any, cache: Any = None, past_key_values: Any = None, **kwargs: Any) -> dict:
        inputs = original(input_ids, past_key_values=cache if cache is not None else past_key_values, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    own = vars(model).get("prepare_inputs_for_generation")  # set on the instance by the caller, if at all
    model.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        if own is None:
            del model.prepare_inputs_for_generation  # the class's method shows through again
        else:
            model.prepare_inputs_for_generation = own


def _as_state(state: RWKVState | StateFile | str | Path) -> tuple[str, RWKVState]:
    """The state and a name for it in errors (its path when read from a file)."""
    if isinstance(state, str | Path):
        from statetune.tuning.statefile import load_state

        return str(state), load_state(state).state
    if isinstance(state, StateFile):
        return "the state", state.state
    if isinstance(state, RWKVState):
        return "the state", state
    raise TypeError(f"expected an RWKVState, a StateFile or a path, got {type(state).__name__}")


def _check_fits(st: RWKVState, cfg: Any, where: str, kind: str) -> None:
    """Refuse a state whose layers or shapes differ from the model's, naming the key and both shapes."""
    L, H, N = int(cfg.num_hidden_layers), int(cfg.num_heads), int(cfg.head_dim)
    C = int(cfg.hidden_size)
    desc = f"the model has {L} layers of {H} heads x {N}"
    where = f"{where}: does not fit the model"
    if st.n_layer != L:
        raise StateFileError(f"{where}: the state has {st.n_layer} layers ({desc})")
    have = list(st.wkv.shape[2:])
    if have != [H, N, N]:
        raise StateFileError(f"{where}: {WKV_KEY.format(i=0)}: expected shape {[H, N, N]}, found {have} ({desc})")
    if st.att_shift.shape[-1] != C:
        raise StateFileError(f"{where}: {ATT_SHIFT_KEY.format(i=0)}: expected shape [{C}], found "
                             f"[{st.att_shift.shape[-1]}]")
    value_dims = getattr(cfg, "value_dim", None)
    if value_dims is not None and any(int(v) != H * N for v in (value_dims if isinstance(value_dims, list | tuple)
                                                                 else [value_dims])):
        raise StateFileError(f"{where}: the model's value width {value_dims} differs from its key width {H * N}; "
                             "statetune's states are square [value, key] matrices")
    attn = getattr(cfg, "attn", None) if kind == "fla" else None
    if attn:
        raise StateFileError(f"{where}: the model mixes in attention layers ({attn.get('layers')}), which hold "
                             "no RWKV state")


def _rwkv7_hf_cache_class(model_or_config: Any) -> type:
    """The ``RWKV7Cache`` class the model's ``forward`` accepts: the one its own module imported (a converted
    directory's remote code has its own copy, which the installed package's class is not an instance of)."""
    module = sys.modules.get(type(model_or_config).__module__)
    cls = getattr(module, "RWKV7Cache", None)
    if cls is None and hasattr(model_or_config, "model"):  # RWKV7ForCausalLM's module defines it too
        cls = getattr(sys.modules.get(type(model_or_config.model).__module__), "RWKV7Cache", None)
    if cls is not None:
        return cls
    if type(model_or_config).__module__.startswith("rwkv7_hf"):
        from rwkv7_hf import RWKV7Cache

        return RWKV7Cache
    raise ValueError(f"{type(model_or_config).__name__} comes from a converted directory's own code: pass the "
                     "model (loaded with trust_remote_code=True) rather than its config, so that its own "
                     "RWKV7Cache class is used")


@functools.cache
def _generate_ready(cls: type) -> type:
    """``cls`` (rwkv7-hf's ``RWKV7Cache``) as recent ``generate()`` can use it: the model still accepts it
    (a subclass), and ``is_compileable`` is a plain False. ``transformers``' base ``Cache`` computes that
    property from ``self.layers``, which rwkv7-hf 0.9.0's cache never sets, so ``generate()`` given one
    fails with an AttributeError; a recurrent cache is not one of the static caches compilation wants."""
    return type(cls.__name__, (cls,), {"is_compileable": False, "__module__": cls.__module__,
                                       "__doc__": cls.__doc__})
