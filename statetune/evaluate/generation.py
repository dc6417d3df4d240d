"""Greedy generation for many prompts at once (eval, demo): the batched engine in a loop."""

from __future__ import annotations

from statetune.infer.engine import Engine
from statetune.infer.sampling import SamplingParams
from statetune.model.state import RWKVState


def greedy_batch(model, tokenizer, prompts: list[list[int]], state: RWKVState | None, max_tokens: int,
                 stop_ids: list[int], stop_text: list[str] | None = None, batch_size: int = 32,
                 progress=None) -> list[str]:
    """The greedy continuation of each prompt from ``state``, decoded and stripped, in input order."""
    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=list(stop_ids),
                            stop=list(stop_text or []))
    ids = [engine.add(p, state, params) for p in prompts]
    done: dict[int, str] = {}
    while len(done) < len(ids):
        for delta in engine.step():
            if delta.finished:
                done[delta.seq_id] = delta.completion.text.strip()
                if progress is not None:
                    progress.update(1)
    return [done[i] for i in ids]
