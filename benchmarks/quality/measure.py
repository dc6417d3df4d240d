"""What is measured on every compared model: held-out loss, generation quality, decode speed, forgetting.

Every function takes a model (the frozen base, or a LoRA / fully fine-tuned copy) and an initial state
(``None`` = zeros), so one code path scores all methods.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from statetune.data.loader import Example, TokenDataset, collate
from statetune.evaluate.generation import greedy_batch
from statetune.evaluate.metrics import generation_scores
from statetune.model.state import RWKVState
from statetune.objective import dataset_loss, masked_lm_loss

from .split import PROMPT


@dataclass
class Probe:
    """Fixed inputs shared by all measurements of one benchmark run."""

    test_path: Path
    groups: list[tuple[str, list[str]]]   # test MRs with all references
    general_ids: list[int]                # tokens of the general (pretraining held-out) text
    batch_size: int
    max_new_tokens: int
    decode_tokens: int
    ctx: int = 512                        # general text is scored in independent windows of this length


def test_loss(model, probe: Probe, state: RWKVState | None) -> tuple[float, int]:
    """Mean masked loss (nats per completion token) over the test rows, and the number of loss tokens."""
    res = dataset_loss(model, TokenDataset(probe.test_path, model.config.vocab_size), state, probe.batch_size)
    return res.loss, res.loss_tokens


def generation(model, tok, probe: Probe, state: RWKVState | None) -> tuple[dict[str, float], list[str], float]:
    """Greedy outputs for every test MR (stop at a newline or end of text), their multi-reference scores
    (BLEU, chrF, ROUGE-L, exact match, via statetune's ``generation_scores``) and the wall time."""
    prompts = [tok.encode(PROMPT.format(mr=mr)) for mr, _ in probe.groups]
    t0 = time.perf_counter()
    hyps = greedy_batch(model, tok, prompts, state, probe.max_new_tokens, [tok.eot_id], ["\n"])
    seconds = time.perf_counter() - t0
    return generation_scores(hyps, [refs for _, refs in probe.groups]), hyps, seconds


@torch.no_grad()
def decode_speed(model, tok, probe: Probe, state: RWKVState | None, repeats: int = 3) -> float:
    """Tokens/s of batch-1 greedy decoding after the first test prompt (``decode_tokens`` steps, no stop;
    best of ``repeats`` to damp noise from other processes). Prefill is not timed."""
    prompt = torch.tensor([tok.encode(PROMPT.format(mr=probe.groups[0][0]))], device=model.device)
    best = float("inf")
    for _ in range(repeats):
        logits, s = model(prompt, state, last_only=True)
        t0 = time.perf_counter()
        for _ in range(probe.decode_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits, s = model(nxt, s)
        best = min(best, time.perf_counter() - t0)
    return probe.decode_tokens / best


@torch.no_grad()
def general_loss(model, probe: Probe, state: RWKVState | None) -> float:
    """Mean next-token loss on the general text, in independent ``ctx``-token windows each read from
    ``state``: the forgetting measure (how much tuning hurt language modelling outside the task)."""
    ids = probe.general_ids
    windows = [Example(ids[i:i + probe.ctx], [1] * len(ids[i:i + probe.ctx]))
               for i in range(0, len(ids), probe.ctx) if len(ids[i:i + probe.ctx]) > 1]
    total, count = 0.0, 0
    for i in range(0, len(windows), probe.batch_size):
        tokens, mask = collate(windows[i:i + probe.batch_size], model.device)
        loss, n, _ = masked_lm_loss(model, tokens, mask, state)
        total, count = total + float(loss), count + n
    return total / max(count, 1)


def score(model, tok, probe: Probe, state: RWKVState | None, weights_changed: bool,
          base_general: float | None) -> dict:
    """Everything reported for one model: test loss, generation scores, decode speed and forgetting.

    ``general_loss`` is the number a user of the method pays on other text: with untouched weights (state
    methods, prompting) that is the base model from the zero state (``base_general``), since the state is
    only loaded for the task; ``general_loss_with_state`` additionally shows the tuned state left in place.
    """
    loss, n_tokens = test_loss(model, probe, state)
    scores, hyps, gen_s = generation(model, tok, probe, state)
    row = {"test_loss": loss, "test_loss_tokens": n_tokens, **scores, "generation_s": gen_s,
           "decode_tokens_per_s": decode_speed(model, tok, probe, state), "samples": hyps[:3]}
    if probe.general_ids:
        if weights_changed or base_general is None:
            row["general_loss"] = general_loss(model, probe, None)
            row["general_loss_measured_on"] = "the tuned weights, zero state"
        else:
            row["general_loss"] = base_general
            row["general_loss_measured_on"] = "the base weights, zero state (untouched by this method)"
        if state is not None:
            row["general_loss_with_state"] = general_loss(model, probe, state)
    return row
