"""Greedy generation for many prompts at once (eval, demo, benchmarks), through the batched engine, with
the decoding penalties ``eval --generate`` and the demo use (:data:`DEFAULT_PENALTIES`)."""

from __future__ import annotations

from typing import Any

from statetune.infer.engine import decode_all
from statetune.infer.sampling import SamplingParams
from statetune.model.state import RWKVState

#: Penalties of greedy decoding in ``eval --generate`` and the demo (the ``SamplingParams`` fields): presence
#: and frequency 0.2 with RWKV's count decay 0.996, the best of the settings compared on E2E validation MRs
#: (BLEU 17.2 / chrF 28.3 against plain greedy's 9.1 / 22.5; the RWKV chat defaults of 0.5 / 0.5 gave 5.1 /
#: 21.2), see the decoding section of benchmarks/RESULTS.md.
DEFAULT_PENALTIES: dict[str, float] = {"repetition_penalty": 1.0, "presence_penalty": 0.2,
                                       "frequency_penalty": 0.2, "penalty_decay": 0.996}


def greedy_batch(model, tokenizer, prompts: list[list[int]], state: RWKVState | None, max_tokens: int,
                 stop_ids: list[int], stop_text: list[str] | None = None, batch_size: int = 32,
                 progress=None, penalties: dict[str, Any] | None = None, source: str | None = None) -> list[str]:
    """The greedy continuation of each prompt from ``state``, decoded and stripped, in input order;
    ``penalties`` are ``SamplingParams`` penalty fields (none by default); ``source`` names the state in a
    :class:`~statetune.errors.NonFiniteError`."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=list(stop_ids),
                            stop=list(stop_text or []), **(penalties or {}))
    return [t.strip() for t in decode_all(model, tokenizer, prompts, state, params, batch_size, progress,
                                               source)]
