"""Greedy continuation of a prompt from a given state (sample generations during training)."""

from __future__ import annotations

import torch

from statetune.model.state import RWKVState


@torch.no_grad()
def greedy_continue(model, prompt: list[int], state: RWKVState | None, max_tokens: int,
                    stop_ids: tuple[int, ...] = (0,), vocab_limit: int | None = None) -> list[int]:
    """Token ids generated greedily after ``prompt``, stopping at any of ``stop_ids`` (not included).

    ``vocab_limit`` keeps ids the tokenizer can decode (models may pad their vocabulary).
    """
    logits, s = model(torch.tensor([prompt], device=model.device), state, last_only=True)
    out: list[int] = []
    for _ in range(max_tokens):
        nxt = int(logits[0, -1, :vocab_limit].argmax())
        if nxt in stop_ids:
            break
        out.append(nxt)
        logits, s = model(torch.tensor([[nxt]], device=model.device), s)
    return out
