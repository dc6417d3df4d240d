"""Generation for many prompts at once (eval, demo, benchmarks): the batched engine in a loop."""

from __future__ import annotations

from statetune.infer.engine import Engine
from statetune.infer.sampling import SamplingParams
from statetune.model.state import RWKVState


def decode_batch(model, tokenizer, prompts: list[list[int]], state: RWKVState | None, params: SamplingParams,
                 batch_size: int = 32, progress=None) -> list[str]:
    """The continuation of each prompt from ``state`` under ``params``, decoded and stripped, in input order."""
    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    ids = [engine.add(p, state, params) for p in prompts]
    done: dict[int, str] = {}
    while len(done) < len(ids):
        for delta in engine.step():
            if delta.finished:
                done[delta.seq_id] = delta.completion.text.strip()
                if progress is not None:
                    progress.update(1)
    return [done[i] for i in ids]


def greedy_batch(model, tokenizer, prompts: list[list[int]], state: RWKVState | None, max_tokens: int,
                 stop_ids: list[int], stop_text: list[str] | None = None, batch_size: int = 32,
                 progress=None) -> list[str]:
    """The greedy continuation of each prompt from ``state``, stopping at ``stop_ids`` / ``stop_text``."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=list(stop_ids),
                            stop=list(stop_text or []))
    return decode_batch(model, tokenizer, prompts, state, params, batch_size, progress)
