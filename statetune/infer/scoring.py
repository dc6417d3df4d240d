"""Log-probabilities of tokens: of a prompt's own tokens (scoring, ``echo``) and of sampled tokens.

The numbers are the model's own next-token distribution, ``log_softmax`` of the logits in float32, before
any sampling setting (temperature, penalties, top-p) reshapes it: the quantity the masked loss of
``statetune eval`` sums, so that summing a continuation's log-probabilities gives minus its loss. A prompt is
scored in chunks of positions, so ``[T, V]`` logits never exist at once for a long prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from statetune.errors import check_finite
from statetune.model.state import RWKVState

#: Positions whose full logits are held at once while scoring a prompt (256 x 65,536 fp32 = 64 MiB).
SCORE_CHUNK = 256


@dataclass
class TokenScore:
    """One token's log-probability and the ``top`` most likely tokens at its position, best first.

    ``logprob`` is None for a prompt's first token: nothing before it predicts it (a state carries no
    logits of a previous token).
    """

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def scores_at(logits: Tensor, tokens: list[int], top: int, vocab_size: int | None = None) -> list[TokenScore]:
    """The scores of ``tokens[i]`` under row ``i`` of ``logits [N, V]``, with the ``top`` best of each row.

    The distribution is over all ``V`` outputs (as the loss's is); the ``top`` lists only ids below
    ``vocab_size`` (a model's output may be padded past its tokenizer's vocabulary).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    if top > 0:
        values, ids = logp[:, :vocab_size].topk(min(top, logp[:, :vocab_size].shape[-1]), dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in tokens]
    return [TokenScore(t, lp, tp) for t, lp, tp in zip(tokens, chosen, tops, strict=True)]


@torch.no_grad()
def score_prompt(model, prompt: list[int], state: RWKVState | None, top: int = 0, chunk: int = SCORE_CHUNK,
                 vocab_size: int | None = None, source: str | None = None) -> tuple[list[TokenScore], Tensor,
                                                                                   RWKVState]:
    """Read ``prompt`` (batch 1) from ``state``, scoring every token after the first.

    Returns the scores (one per prompt token, the first with ``logprob`` None), the logits after the last
    token ``[1, V]`` (what the next, sampled token is drawn from) and the state after the whole prompt.
    Non-finite logits are a :class:`~statetune.errors.NonFiniteError` naming ``source`` (the start state).
    """
    if not prompt:
        raise ValueError("cannot score an empty prompt")
    tokens = torch.tensor([prompt], device=model.device)
    scores = [TokenScore(prompt[0], None)]
    last = None
    for start in range(0, len(prompt), chunk):
        logits, state = model(tokens[:, start:start + chunk], state)
        check_finite(logits.sum(), "the model's output while scoring the prompt", source, "logits")
        rows = logits[0]
        targets = prompt[start + 1:start + 1 + rows.shape[0]]
        if targets:
            scores += scores_at(rows[:len(targets)], targets, top, vocab_size)
        last = rows[-1:]
    if top > 0:  # the first token has no distribution; its top list stays empty, as OpenAI's null
        scores[0].top = []
    return scores, last, state
