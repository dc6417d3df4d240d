"""The comparison ``statetune eval`` reports: masked loss and perplexity of the base model and each state on
one dataset, and optionally greedy generations for the dataset's distinct prompts scored against every
reference that follows them."""

from __future__ import annotations

import logging
from typing import Any

from statetune.data.loader import TokenDataset
from statetune.errors import DataError
from statetune.evaluate.faithfulness import distinct_outputs, find_mr, record_fields, slot_errors
from statetune.evaluate.generation import greedy_batch
from statetune.evaluate.metrics import generation_scores
from statetune.model.state import RWKVState
from statetune.objective import dataset_loss

log = logging.getLogger("statetune.eval")
References = list[tuple[list[int], list[list[int]]]]


def prompts_and_references(data: TokenDataset, stop_ids: set[int]) -> References:
    """Distinct prompts (the ids before the first loss token) with every reference completion that follows
    them, in first-seen order; end markers are removed from references."""
    groups: dict[tuple[int, ...], list[list[int]]] = {}
    for i in range(len(data)):
        ex = data[i]
        cut = next((j for j, m in enumerate(ex.mask) if m), None)
        if cut is None or cut == 0:
            continue
        ref = [t for t in ex.ids[cut:] if t not in stop_ids]
        groups.setdefault(tuple(ex.ids[:cut]), []).append(ref)
    return [(list(p), refs) for p, refs in groups.items()]


def compare_states(model, tokenizer, data: TokenDataset, candidates: list[tuple[str, RWKVState | None, str]],
                   stop: set[int], *, generate: bool = False, max_prompts: int | None = None,
                   max_tokens: int = 96, examples: int = 3, batch_size: int = 8,
                   ctx_len: int = 1024, penalties: dict[str, float] | None = None) -> dict[str, Any]:
    """One row per candidate ``(name, state, source)`` (state None: zeros; ``source`` names the state file and
    its scale in errors) with loss, perplexity and, with
    ``generate``, BLEU/chrF/ROUGE-L/exact match (greedy with ``penalties``, see
    :func:`~statetune.evaluate.generation.greedy_batch`), the share of distinct outputs and, for prompts
    with fields (see :func:`prompt_fields`), the slot error rate; plus up to ``examples`` prompts with every
    output.
    A candidate whose loss or logits are not finite raises :class:`~statetune.errors.NonFiniteError`: a report
    holds numbers only."""
    if data.loss_tokens == 0:
        raise DataError(f"--data {data.path}: no record has a loss token (every mask is 0 after the first "
                        f"token), so there is no loss or perplexity to measure")
    groups = prompts_and_references(data, stop)[:max_prompts] if generate else []
    if generate and not groups:
        raise DataError(f"--generate: no record of {data.path} has a prompt (tokens with mask 0 before its "
                        f"first loss token), so there is nothing to generate from")
    refs = [[tokenizer.decode(r).strip() for r in rs] for _, rs in groups]
    fields = prompt_fields(data, tokenizer, [p for p, _ in groups]) if generate else []
    rows, outputs = [], {}
    for name, state, source in candidates:
        res = dataset_loss(model, data, state, batch_size, ctx_len).checked(source)
        row = {"name": name, "loss": res.loss, "ppl": res.ppl, "loss_tokens": res.loss_tokens}
        if generate:
            hyps = greedy_batch(model, tokenizer, [p for p, _ in groups], state, max_tokens, sorted(stop),
                                batch_size=batch_size, penalties=penalties, source=source)
            row.update(generation_scores(hyps, refs), prompts=len(groups),
                       distinct_outputs=distinct_outputs(hyps, len(groups)))
            if any(fields):
                ser = slot_errors(fields, hyps)
                row.update(slot_error_rate=ser.rate, slot_errors=ser.as_dict())
            outputs[name] = hyps
        rows.append(row)
        log.info("%s: loss %.4f", name, res.loss)
    shown = [{"prompt": tokenizer.decode(p), "references": [tokenizer.decode(r) for r in rs],
              "outputs": {n: outputs[n][i] for n in outputs}} for i, (p, rs) in enumerate(groups[:examples])]
    return {"rows": rows, "examples": shown}


def prompt_fields(data: TokenDataset, tokenizer, prompts: list[list[int]]) -> list[dict[str, str] | None]:
    """Each prompt's fields: a ``fields`` object or ``mr`` string its record carries beside ``text``/``mask``,
    else the ``slot[value]`` items of its text (an E2E meaning representation in the prompt), else None."""
    carried = record_fields(data.path)
    return [carried.get(tuple(p)) or find_mr(tokenizer.decode(p)) or None for p in prompts]
