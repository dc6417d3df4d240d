"""The training objectives compared by ``benchmarks/quality_objectives.py``: preference pairs that break
faithfulness, teachers saved as checkpoints, one ``statetune train`` run per objective, and the scores that
say whether a state follows its input (slot error rate and distinct outputs beside loss, BLEU and chrF).

A pair's chosen side is a reference written for its MR; the rejected side is a reference written for
another MR that contradicts this one by the slot error rate's own check (at least one slot missing or
wrong), so preferring the chosen side can only be learned by reading the MR.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from statetune.commands.prepare import PrepareOptions, prepare
from statetune.commands.train import TrainOptions, train
from statetune.data.loader import TokenDataset
from statetune.evaluate.faithfulness import distinct_outputs, parse_mr, slot_errors
from statetune.evaluate.generation import DEFAULT_PENALTIES, greedy_batch
from statetune.evaluate.metrics import generation_scores
from statetune.fileio import atomic_write
from statetune.model.checkpoint import load_model
from statetune.model.state import RWKVState
from statetune.objective import dataset_loss
from statetune.train.metrics import read_metrics
from statetune.tuning.statefile import load_state

from . import measure, methods
from .split import COMPLETION, PROMPT

#: Tries per pair to find a contradicting reference of another MR (one is almost always found at once).
REJECT_TRIES = 50


# -- data ----------------------------------------------------------------------------------------------------

def contradicts(mr: str, text: str) -> bool:
    """Whether ``text`` misses or contradicts at least one slot of ``mr`` (the slot error rate's check)."""
    return slot_errors([parse_mr(mr)], [text]).rate > 0


def pair_rows(side: dict[str, list[str]], rows: list[tuple[str, str]], seed: int = 0) -> list[dict[str, str]]:
    """One ``{"mr", "chosen", "rejected"}`` per (MR, reference) row: the rejected side is a reference of
    another MR of ``side`` that contradicts this MR (a fixed random pick per row, ``seed``)."""
    rng = random.Random(seed)
    others = [(mr, ref) for mr, refs in side.items() for ref in refs]
    out = []
    for mr, ref in rows:
        for _ in range(REJECT_TRIES):
            other_mr, other = others[rng.randrange(len(others))]
            if other_mr != mr and other.strip() != ref.strip() and contradicts(mr, other):
                break
        else:
            raise SystemExit(f"no reference of another MR contradicts {mr!r} in {REJECT_TRIES} tries")
        out.append({"mr": mr, "chosen": ref, "rejected": other})
    return out


def prepare_pairs(pairs: list[dict[str, str]], out: Path, model_path: Path) -> Path:
    """Tokenize pairs with statetune's ``prepare`` (the study's prompt and completion templates)."""
    src = out.with_suffix(".src.jsonl")
    src.write_text("".join(json.dumps(p, ensure_ascii=False, allow_nan=False) + "\n" for p in pairs), encoding="utf-8")
    prepare(PrepareOptions(inputs=[str(src)], out=str(out), model=str(model_path), format="preference",
                           prompt_template=PROMPT, completion_template=COMPLETION.replace("{ref}", "{completion}")))
    return out.with_suffix(".jsonl")


# -- teachers ------------------------------------------------------------------------------------------------

def save_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """The model's weights under official names as a ``.pth`` tensor dict (what ``load_model`` reads)."""
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(sd, tmp))


def merged_lora(peft_model: torch.nn.Module, model_path: Path) -> torch.nn.Module:
    """A fresh copy of the base model with every LoRA layer's delta (``B A * alpha / r``) added to its weight."""
    base = load_model(model_path, device=peft_model.device if hasattr(peft_model, "device") else "cpu")
    merged = 0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                base.get_submodule(name).weight.add_(module.get_delta_weight("default"))
                merged += 1
    if not merged:
        raise SystemExit("merged_lora: the model has no LoRA layers")
    return base


def make_teacher(kind: str, ctx: methods.Context, budget: methods.Budget, lr: float, path: Path
                 ) -> tuple[torch.nn.Module, dict]:
    """Train the ``full`` or ``lora`` teacher with the study's method and save it (LoRA merged) as ``path``."""
    trained = (methods.full_finetune if kind == "full" else methods.lora)(ctx, budget, lr, 0)
    model = trained.model if kind == "full" else merged_lora(trained.model, ctx.model_path)
    save_checkpoint(model, path)
    saved = load_model(path)
    # the saved checkpoint must be the trained model: its validation loss is the run's best one
    saved_val = dataset_loss(saved, TokenDataset(ctx.val_path, saved.config.vocab_size), None, budget.batch_size).loss
    return saved, {"trainable": trained.trainable, "train_s": trained.train_s, "best_val": trained.best_val,
                   "saved_val": saved_val, "lr": lr, "seed": 0, "stages": f"{kind} weights {budget.steps}"}


# -- state runs ----------------------------------------------------------------------------------------------

@dataclass
class StateRun:
    """A finished ``statetune train`` run: its best state (kept as a file) and its validation log."""

    state_file: Path
    best_val: float
    best_event: dict
    curve: list[tuple[int, float]]
    train_s: float


def train_state(ctx: methods.Context, budget: methods.Budget, lr: float, seed: int, keep: Path,
                train_data: Path, val_data: Path, **opts) -> StateRun:
    """One direct-state ``statetune train`` run at the study's schedule (warmup, cosine to LR/100, AdamW,
    clip 1.0, best on validation kept); ``opts`` are further train options (objective, layers, init ...).
    The best state is copied to ``keep`` and the run folder removed."""
    run = keep.with_suffix(".run")
    shutil.rmtree(run, ignore_errors=True)
    logging.getLogger("statetune").setLevel(logging.WARNING)
    train(TrainOptions(model=str(ctx.model_path), train_data=str(train_data), val_data=str(val_data),
                       out=str(run), max_steps=budget.steps, batch_size=budget.batch_size, lr=lr,
                       lr_final=lr * methods.LR_FINAL_RATIO, warmup_steps=budget.warmup,
                       eval_every=budget.eval_every, save_every=budget.steps, keep_checkpoints=1, samples=0,
                       seed=seed, progress=False, param="direct", **opts))
    events = read_metrics(run / "metrics.jsonl")
    vals = [e for e in events if e["type"] == "val"]
    best = min((e for e in vals if e["step"] > 0), key=lambda e: e["loss"])
    shutil.copyfile(run / "state-best.safetensors", keep)
    train_s = [e["elapsed_s"] for e in events if e["type"] == "train"][-1]
    shutil.rmtree(run, ignore_errors=True)
    return StateRun(keep, best["loss"], {k: v for k, v in best.items() if k != "type"},
                    [(e["step"], e["loss"]) for e in vals], train_s)


def read_state(path: Path, model) -> RWKVState:
    return load_state(path, model).state


# -- scoring -------------------------------------------------------------------------------------------------

def score(model, tok, probe: measure.Probe, state: RWKVState | None) -> dict:
    """Test loss, and for every test MR the penalised greedy output of ``statetune eval --generate``
    (presence and frequency 0.2, decay 0.996; stop at a newline or end of text) scored by BLEU, chrF, slot
    error rate and the share of distinct outputs."""
    loss, n_tokens = measure.test_loss(model, probe, state)
    prompts = [tok.encode(PROMPT.format(mr=mr)) for mr, _ in probe.groups]
    hyps = greedy_batch(model, tok, prompts, state, probe.max_new_tokens, [tok.eot_id], ["\n"],
                        batch_size=probe.batch_size, penalties=DEFAULT_PENALTIES)
    return {"test_loss": loss, "test_loss_tokens": n_tokens, **faithfulness(probe, hyps),
            **generation_scores(hyps, [refs for _, refs in probe.groups]), "samples": hyps[:4]}


def faithfulness(probe: measure.Probe, outputs: list[str]) -> dict:
    """Slot error rate (with its counts) and distinct-output share of ``outputs`` for the test MRs."""
    ser = slot_errors([parse_mr(mr) for mr, _ in probe.groups], outputs)
    return {"ser": ser.rate, "slot_errors": ser.as_dict(),
            "distinct": distinct_outputs(outputs, len(probe.groups)), "prompts": len(probe.groups)}
