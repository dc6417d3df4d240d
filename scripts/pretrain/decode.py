"""Continuations of a prompt, decoded by statetune's engine (the one decoder the commands use too)."""

from __future__ import annotations

from statetune.infer.engine import decode_all
from statetune.infer.sampling import SamplingParams
from statetune.model.base import RWKVBase
from statetune.tokenizer import get_tokenizer

from .data import EOT


def continue_text(model: RWKVBase, prompt: str, params: SamplingParams) -> str:
    """The text ``model`` writes after ``prompt`` (byte tokens) with ``params``; the end-of-text id ends it."""
    tok = get_tokenizer("bytes")
    was_training = model.training
    model.eval()
    text = decode_all(model, tok, [tok.encode(prompt)], None, params, batch_size=1)[0]
    model.train(was_training)
    return text


def greedy(model: RWKVBase, prompt: str, n: int = 200) -> str:
    """Greedy continuation of ``prompt`` for up to ``n`` bytes (stops at end of text)."""
    return continue_text(model, prompt, SamplingParams(temperature=0.0, max_tokens=n, stop_token_ids=[EOT]))


def sample(model: RWKVBase, prompt: str, n: int = 200, temperature: float = 0.8, top_p: float = 0.9,
           seed: int = 0) -> str:
    """A sampled continuation (temperature, then nucleus ``top_p``), reproducible through ``seed``."""
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=n, seed=seed, stop_token_ids=[EOT])
    return continue_text(model, prompt, params)
