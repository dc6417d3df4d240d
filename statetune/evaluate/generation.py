"""Greedy generation for many prompts at once (eval, demo, benchmarks), through the batched engine."""

from __future__ import annotations

from statetune.infer.engine import decode_all
from statetune.infer.sampling import SamplingParams
from statetune.model.state import RWKVState


def greedy_batch(model, tokenizer, prompts: list[list[int]], state: RWKVState | None, max_tokens: int,
                 stop_ids: list[int], stop_text: list[str] | None = None, batch_size: int = 32,
                 progress=None) -> list[str]:
    """The greedy continuation of each prompt from ``state``, decoded and stripped, in input order."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=list(stop_ids),
                            stop=list(stop_text or []))
    return [t.strip() for t in decode_all(model, tokenizer, prompts, state, params, batch_size, progress)]
