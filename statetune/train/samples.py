"""Sample generations during training: validation prompts continued greedily from the current state.

They decode through the inference engine (greedy parameters), the one decoder of the package, so what a run
logs is what ``generate`` would print for the same prompt and state.
"""

from __future__ import annotations

from statetune.data.loader import TokenDataset
from statetune.infer.engine import decode_all
from statetune.infer.sampling import SamplingParams
from statetune.model.state import RWKVState
from statetune.tokenizer import Tokenizer


def split_prompt(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """A record cut where its loss tokens start: ``(prompt, reference)``; the prompt keeps at least a token."""
    cut = max(1, next((j for j, m in enumerate(mask) if m), len(ids)))
    return ids[:cut], ids[cut:]


def sample_generations(model, tokenizer: Tokenizer, data: TokenDataset, state: RWKVState, n: int,
                       max_tokens: int = 96) -> list[dict[str, str]]:
    """Greedy continuations of the first ``n`` records' prompts from ``state``, each up to its reference's
    length plus 16 tokens (at most ``max_tokens``), stopping at end-of-text: ``prompt``/``output``/``reference``."""
    records = [split_prompt(data[i].ids, data[i].mask) for i in range(min(n, len(data)))]
    if not records:
        return []
    # seed fixed: greedy decoding draws nothing, and the run's random state must not move
    params = [SamplingParams(temperature=0.0, max_tokens=min(len(ref) + 16, max_tokens), seed=0,
                             stop_token_ids=[tokenizer.eot_id]) for _, ref in records]
    outputs = decode_all(model, tokenizer, [p for p, _ in records], state, params, batch_size=len(records),
                         source="the state being trained")
    return [{"prompt": tokenizer.decode(p), "output": out, "reference": tokenizer.decode(r)}
            for out, (p, r) in zip(outputs, records, strict=True)]
