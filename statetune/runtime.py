"""Everything a command needs to run a model: dtype and tokenizer choices, the model/state/tokenizer loader,
and the state a prompt leaves behind.

One home for these so that ``generate``, ``chat``, ``eval``, ``serve``, ``train`` and ``state`` resolve a
dtype, pick a tokenizer and check that it fits the model the same way (they used to do it five ways).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from statetune import strict_json
from statetune.device import resolve_device
from statetune.errors import OptionError, StatetuneError, check_finite, state_source
from statetune.model.state import RWKVState
from statetune.options import h
from statetune.tokenizer import Tokenizer

log = logging.getLogger("statetune.runtime")
DTYPES = ("auto", "fp32", "bf16", "fp16")
TOKENIZERS = ("auto", "world", "bytes")


def check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    """A usage error naming ``flag`` and its choices when ``value`` is not one of them."""
    if value not in choices:
        raise OptionError(f"{flag}: expected one of {', '.join(choices)}, got {value!r}")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The compute dtype for ``--dtype NAME`` on ``device``: auto is fp32 on CPU, bf16 on CUDA."""
    check_choice("--dtype", name, DTYPES)
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dataset_meta(path: str | Path) -> dict[str, Any]:
    """The ``.meta.json`` that ``prepare`` writes beside its output (empty when absent)."""
    p = Path(path)
    meta = p.with_name(p.name.removesuffix(".jsonl") + ".meta.json")
    if not meta.is_file():
        return {}
    try:
        value = strict_json.loads(meta.read_bytes())
    except strict_json.StrictJSONError as e:
        raise StatetuneError(f"{meta}: {e.msg}") from None
    if not isinstance(value, dict):
        raise StatetuneError(f"{meta}: expected a JSON object (the metadata prepare writes), got "
                             f"{type(value).__name__}")
    return value


def pick_tokenizer(name: str, meta: dict[str, Any], vocab_size: int) -> Tokenizer:
    """The tokenizer named by the flag, else by the dataset's or state's metadata, else by the vocabulary
    size; refused when it has more ids than the model's vocabulary."""
    from statetune.tokenizer import get_tokenizer, named_tokenizer, tokenizer_for_vocab

    check_choice("--tokenizer", name, TOKENIZERS)
    if name != "auto":
        tokenizer = get_tokenizer(name)
    else:
        named = named_tokenizer(meta)
        tokenizer = get_tokenizer(named) if named else tokenizer_for_vocab(vocab_size)
    if tokenizer.vocab_size > vocab_size:
        raise OptionError(f"--tokenizer: {tokenizer.name} has {tokenizer.vocab_size} ids but the model's "
                          f"vocabulary has only {vocab_size}")
    return tokenizer


def prompt_state(model, ids: list[int], state: RWKVState | None = None, source: str | None = None) -> RWKVState:
    """The state after reading ``ids`` from ``state`` (zeros when None), without gradients; a
    :class:`~statetune.errors.NonFiniteError` (naming ``source``) when the model's output there is not finite,
    so that no state captured from a model out of range is ever written."""
    if not ids:
        raise OptionError("--prompt: the prompt tokenizes to nothing")
    with torch.no_grad():
        logits, out = model(torch.tensor([ids], device=model.device), state, last_only=True)
    check_finite(logits, "the model's output after reading the prompt",
                 source or (state_source(None) if state is None else None), of="logits")
    return out


MODEL_HELP = "Base model checkpoint (.pth or .safetensors, or a Hugging Face directory)."
DEVICE_HELP = "Torch device (cpu, cuda, cuda:1)."
STATE_HELP = "State file to start from (default: the state merged in the checkpoint, if any, else zeros)."


@dataclass(kw_only=True)
class ModelOptions:
    """Where the model and the tokenizer come from and how the model runs (shared by every command that runs
    a model: ``generate``, ``chat``, ``eval``, ``serve``, ``state capture``)."""

    model: str = field(metadata=h(MODEL_HELP))
    tokenizer: str = field(default="auto", metadata=h("world, bytes, or auto (the state's or dataset's metadata "
                                                      "when there is one, else the model's vocabulary size)."))
    device: str = field(default="cpu", metadata=h(DEVICE_HELP))
    dtype: str = field(default="auto", metadata=h("fp32, bf16, fp16, or auto (fp32 on CPU, bf16 on CUDA)."))
    threads: int | None = field(default=None, metadata=h("CPU threads for torch (default: torch's)."))

    def check_model_options(self) -> None:
        """Usage errors naming the flag for a bad tokenizer, dtype or thread count."""
        check_choice("--tokenizer", self.tokenizer, TOKENIZERS)
        check_choice("--dtype", self.dtype, DTYPES)
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"--threads: must be at least 1, got {self.threads}")

    def apply_threads(self) -> None:
        """Set torch's CPU thread count when ``--threads`` was given."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    def load_model(self):
        """The model on ``--device`` in ``--dtype`` (after applying ``--threads``)."""
        from statetune.model.checkpoint import load_model

        self.apply_threads()
        return load_model(self.model, device=resolve_device(self.device), dtype=resolve_dtype(self.dtype, self.device))


STATE_SCALE_HELP = ("Multiply each loaded state file (WKV and token-shift tensors) by this factor: below 1 "
                    "weakens a tuned state toward the zero state, at no inference cost (1 = as trained).")


def check_state_scale(value: float) -> None:
    """Refuse a negative ``--state-scale`` (0 is the zero state; negative flips the state's sign)."""
    if value < 0:
        raise OptionError(f"--state-scale: must be 0 or more, got {value}")


def check_stop_tokens(ids: list[int] | None, vocab_size: int) -> None:
    """Refuse a ``--stop-token`` the model cannot produce, naming the flag (checked once the model is loaded;
    the engine's own check would name its internal field instead)."""
    for t in ids or []:
        if t >= vocab_size:
            raise OptionError(f"--stop-token: token id outside the model's vocabulary (0..{vocab_size - 1}), "
                              f"got {t}")


@dataclass(kw_only=True)
class StateOption:
    """``--state``: the state a model starts from (``generate``, ``chat``), and ``--state-scale``."""

    state: str | None = field(default=None, metadata=h(STATE_HELP))
    state_scale: float = field(default=1.0, metadata=h(STATE_SCALE_HELP))


@dataclass
class Runtime:
    """A loaded model with the tokenizer and batch-1 start state to use, and the state file's metadata;
    ``source`` names the start state and its scale in errors (:func:`~statetune.errors.state_source`)."""

    model: Any
    tokenizer: Tokenizer
    state: RWKVState
    metadata: dict[str, Any]
    source: str | None = None


def load_runtime(opts: ModelOptions, state: str | None = None, scale: float = 1.0) -> Runtime:
    """Load the model, the start state (``state`` file times ``scale``, else the checkpoint's merged state,
    else zeros) and the tokenizer (the flag, else the state's metadata, else the vocabulary size)."""
    from statetune.tuning.statefile import load_state

    model = opts.load_model()
    meta: dict[str, Any] = {}
    if state is not None:
        sf = load_state(state, model)
        start, meta = sf.state.scaled(scale), sf.metadata
    elif model.default_state is not None:
        start = model.default_state
    else:
        start = model.zero_state(1)
    tokenizer = pick_tokenizer(opts.tokenizer, meta, model.config.vocab_size)
    if state:
        source = f"{state} x {scale:g}" if scale != 1.0 else state
    else:
        source = "the checkpoint's merged state" if model.default_state is not None else "zeros"
    log.info("model %s (%s, %d layers), state %s, tokenizer %s", opts.model, model.config.version,
             model.config.n_layer, source, tokenizer.name)
    named = state_source(state, scale) if state else ("the checkpoint's merged state" if model.default_state
                                                      is not None else state_source(None))
    return Runtime(model, tokenizer, start, meta, named)
