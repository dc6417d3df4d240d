"""The compared methods, one function each: five kinds of state tuning (through ``statetune.train``), LoRA
(``peft`` on statetune's own modules) and full fine-tuning.

Every method sees the same data in the same order (``global_batches`` with the run's seed), the same number
of optimizer steps at the same batch size, the same warmup + cosine schedule down to ``lr / 100``, AdamW
(betas 0.9/0.99, no weight decay), gradient clipping at 1.0, and validation on the same records every
``eval_every`` steps, keeping the best checkpoint. Only what is trained, and its learning rate, differ.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from statetune.commands.train import TrainOptions, train
from statetune.data.loader import TokenDataset, collate, global_batches, micro_batches
from statetune.model.checkpoint import load_model
from statetune.model.state import RWKVState
from statetune.objective import dataset_loss, masked_lm_loss
from statetune.train.metrics import read_metrics
from statetune.train.schedule import lr_at
from statetune.tuning.config import StateTuningConfig
from statetune.tuning.statefile import load_state
from statetune.tuning.tunable import TunableState

#: peft's ``target_modules`` as a regular expression (matched against full module names): the attention
#: projections and both FFN matrices of every block.
LORA_TARGETS = r"blocks\.\d+\.(att\.(receptance|key|value|output)|ffn\.(key|value))"
LR_FINAL_RATIO = 0.01  # lr_final = lr * 0.01 for every method (statetune's defaults have this ratio)


@dataclass
class Budget:
    """The training budget every method gets (tokens seen are equal: same steps x batch, same batches)."""

    steps: int
    batch_size: int
    eval_every: int
    warmup: int


@dataclass
class Context:
    """What the methods share: the base model (frozen, also used to score state methods) and the data."""

    model_path: Path
    model: torch.nn.Module
    train_path: Path
    val_path: Path
    few_shot: str
    work: Path
    base_val: float            # validation loss of the base model from the zero state (step 0 of every curve)
    few_shot_val: float        # ... from the few-shot prompt's state (step 0 of the prompt-init curve)
    lora_rank: int = 1
    shift_lr_scale: float = 1.0  # token-shift states' LR as a fraction of the WKV state's (state_shift only)
    lr_search: tuple[int, list[float]] = (24, [0.1, 1.0, 10.0, 100.0])  # train --lr auto: steps, rates


@dataclass
class Trained:
    """One finished training run, ready to be scored."""

    trainable: int
    stored_bytes: int
    stored_what: str
    train_s: float
    curve: list[tuple[int, float]]
    best_val: float
    model: torch.nn.Module
    state: RWKVState | None
    weights_changed: bool
    extra: dict = field(default_factory=dict)


# -- state tuning -----------------------------------------------------------------------------------------

def _state_run(ctx: Context, b: Budget, lr: float | str, seed: int, tag: str, **opts) -> Trained:
    """One ``statetune train`` run; the state that scored best on validation is the result. With ``lr`` "auto"
    the run is ``train --lr auto`` (``ctx.lr_search``'s steps and rates; the final rate is train's default
    0.01 rather than LR/100, as the rate is not known in advance) and ``extra["lr_search"]`` is its log."""
    run = ctx.work / f"{tag}-lr{lr if lr == 'auto' else format(lr, 'g')}-b{b.batch_size}-s{seed}"
    shutil.rmtree(run, ignore_errors=True)
    logging.getLogger("statetune").setLevel(logging.WARNING)
    if lr == "auto":
        opts.update(lr_search_steps=ctx.lr_search[0], lr_search_rates=list(ctx.lr_search[1]))
    else:
        opts.update(lr_final=lr * LR_FINAL_RATIO)
    train(TrainOptions(model=str(ctx.model_path), train_data=str(ctx.train_path), val_data=str(ctx.val_path),
                       out=str(run), max_steps=b.steps, batch_size=b.batch_size, lr=lr,
                       warmup_steps=b.warmup, eval_every=b.eval_every, save_every=b.steps, keep_checkpoints=1,
                       samples=0, seed=seed, progress=False, **opts))
    extra = {"lr_search": json.loads((run / "lr_search.json").read_text())} if lr == "auto" else {}
    events = read_metrics(run / "metrics.jsonl")
    curve = [(e["step"], e["loss"]) for e in events if e["type"] == "val"]
    if opts.get("init") == "prompt":  # step 0 of train's log is the zero state; this run starts elsewhere
        curve[0] = (0, ctx.few_shot_val)
    best_file = run / "state-best.safetensors"
    state = load_state(best_file, ctx.model).state
    method = {k: v for k, v in opts.items() if k in ("param", "tune_shift", "encoder_scope")}
    probe = TunableState(ctx.model.zero_state(1), StateTuningConfig(**method))
    train_s = [e["elapsed_s"] for e in events if e["type"] == "train"][-1]  # training steps only, as below
    trained = Trained(trainable=probe.n_trainable(), stored_bytes=best_file.stat().st_size, stored_what="state file",
                      train_s=train_s, curve=curve, best_val=min(v for s, v in curve if s > 0), model=ctx.model,
                      state=state, weights_changed=False, extra=extra)
    shutil.rmtree(run, ignore_errors=True)  # checkpoints hold optimizer state (large for encoders)
    return trained


def state_direct(ctx: Context, b: Budget, lr: float, seed: int) -> Trained:
    """The WKV state tensors themselves, from zeros."""
    return _state_run(ctx, b, lr, seed, "direct", param="direct")


def state_shift(ctx: Context, b: Budget, lr: float, seed: int) -> Trained:
    """WKV states plus the two token-shift vectors per layer."""
    return _state_run(ctx, b, lr, seed, "shift", param="direct", tune_shift=True, shift_lr_scale=ctx.shift_lr_scale)


def state_encoder(ctx: Context, b: Budget, lr: float, seed: int) -> Trained:
    """The WKV states produced by one MLP encoder per layer."""
    return _state_run(ctx, b, lr, seed, "encoder", param="encoder", encoder_scope="layer")


def state_encoder_global(ctx: Context, b: Budget, lr: float, seed: int) -> Trained:
    """The WKV states produced by one MLP encoder shared by all layers."""
    return _state_run(ctx, b, lr, seed, "encoder-global", param="encoder", encoder_scope="global")


def state_shift_slow(ctx: Context, b: Budget, lr: float, seed: int) -> Trained:
    """WKV states plus the token-shift vectors at a tenth of the WKV state's rate."""
    return _state_run(ctx, b, lr, seed, "shift-slow", param="direct", tune_shift=True, shift_lr_scale=0.1)


def state_l2(weight: float) -> Method:
    """Direct WKV tuning with ``train --state-l2 weight`` (the pull toward the initial state)."""

    def run(ctx: Context, b: Budget, lr: float, seed: int) -> Trained:
        return _state_run(ctx, b, lr, seed, f"l2-{weight:g}", param="direct", state_l2=weight)

    return run


def state_ema(decay: float) -> Method:
    """Direct WKV tuning with ``train --ema decay``: validated and saved as a moving average."""

    def run(ctx: Context, b: Budget, lr: float, seed: int) -> Trained:
        return _state_run(ctx, b, lr, seed, f"ema-{decay:g}", param="direct", ema=decay)

    return run


def state_prompt_init(ctx: Context, b: Budget, lr: float, seed: int) -> Trained:
    """Direct WKV tuning starting from the state after the few-shot prompt (instead of zeros)."""
    return _state_run(ctx, b, lr, seed, "prompt-init", param="direct", init="prompt", init_prompt=ctx.few_shot)


# -- weight tuning ----------------------------------------------------------------------------------------

def lora_rank_for(model, n_params: int) -> int:
    """The smallest LoRA rank on ``LORA_TARGETS`` with at least ``n_params`` trainable parameters."""
    import re

    per_rank = sum(m.in_features + m.out_features for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and re.fullmatch(LORA_TARGETS, name))
    return max(1, math.ceil(n_params / per_rank))


def _weight_loop(ctx: Context, b: Budget, lr: float, seed: int, model, params: list[torch.nn.Parameter]
                 ) -> tuple[list[tuple[int, float]], float]:
    """Train ``params`` of ``model`` with the same data order, loss, schedule and validation as
    ``statetune train``; the best-on-validation values are restored at the end. Returns the curve and the
    seconds spent in training steps (validation excluded, as in train's ``elapsed_s``)."""
    data = TokenDataset(ctx.train_path, model.config.vocab_size)
    val = TokenDataset(ctx.val_path, model.config.vocab_size)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    curve, best, best_values, elapsed = [(0, ctx.base_val)], math.inf, None, 0.0
    epoch, batches, pos = 0, global_batches(data.lengths, b.batch_size, seed, 0), 0
    for step in range(b.steps):
        if pos >= len(batches):
            epoch, pos = epoch + 1, 0
            batches = global_batches(data.lengths, b.batch_size, seed, epoch)
        t0 = time.perf_counter()
        model.train()
        opt.zero_grad(set_to_none=True)
        for group in micro_batches(batches[pos], data.lengths, b.batch_size, 1, 0):
            tokens, mask = collate([data[i] for i in group], model.device)
            loss, n, _ = masked_lm_loss(model, tokens, mask, None)
            (loss / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, b.steps, lr, lr * LR_FINAL_RATIO, b.warmup)
        opt.step()
        elapsed += time.perf_counter() - t0
        pos += 1
        if (step + 1) % b.eval_every == 0 or step + 1 == b.steps:
            model.eval()
            v = dataset_loss(model, val, None, b.batch_size).loss
            curve.append((step + 1, v))
            if v < best:
                best, best_values = v, [p.detach().clone() for p in params]
    model.eval()
    with torch.no_grad():
        for p, keep in zip(params, best_values or [], strict=False):
            p.copy_(keep)
    model.requires_grad_(False)
    return curve, elapsed


def lora(ctx: Context, b: Budget, lr: float, seed: int) -> Trained:
    """peft LoRA (rank ``ctx.lora_rank``, alpha = 2 x rank, no dropout) on the attention projections and FFN
    matrices of a fresh copy of the base model; the adapter weights are what must be stored."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)  # LoRA A matrices are initialised randomly
    model = load_model(ctx.model_path, device=ctx.model.device)
    cfg = LoraConfig(r=ctx.lora_rank, lora_alpha=2 * ctx.lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = inject_adapter_in_model(cfg, model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    curve, train_s = _weight_loop(ctx, b, lr, seed, model, params)
    path = ctx.work / "adapter.safetensors"
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}, str(path))
    size = path.stat().st_size
    path.unlink()
    return Trained(trainable=sum(p.numel() for p in params), stored_bytes=size,
                   stored_what=f"adapter (r={ctx.lora_rank})", train_s=train_s, curve=curve,
                   best_val=min(v for s, v in curve if s > 0), model=model, state=None, weights_changed=True)


def full_finetune(ctx: Context, b: Budget, lr: float, seed: int) -> Trained:
    """Every weight of a fresh copy of the base model; the whole checkpoint is what must be stored."""
    model = load_model(ctx.model_path, device=ctx.model.device)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    curve, train_s = _weight_loop(ctx, b, lr, seed, model, params)
    path = ctx.work / "full.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    size = path.stat().st_size
    path.unlink()
    return Trained(trainable=sum(p.numel() for p in params), stored_bytes=size,
                   stored_what="checkpoint", train_s=train_s, curve=curve,
                   best_val=min(v for s, v in curve if s > 0), model=model, state=None, weights_changed=True)


Method = Callable[[Context, Budget, float, int], Trained]

#: name → (function, description, is a state method)
METHODS: dict[str, tuple[Method, str, bool]] = {
    "state_direct": (state_direct, "state tuning, direct, WKV only", True),
    "state_shift": (state_shift, "state tuning, direct, WKV + token-shift", True),
    "state_encoder": (state_encoder, "state tuning through a per-layer encoder", True),
    "state_encoder_global": (state_encoder_global, "state tuning through one global encoder", True),
    "state_prompt_init": (state_prompt_init, "state tuning, direct, initialised from the few-shot prompt", True),
    "state_shift_slow": (state_shift_slow, "state tuning, direct, WKV + token-shift at 0.1x LR", True),
    "lora": (lora, "LoRA (peft) on att + FFN projections", False),
    "full": (full_finetune, "full fine-tuning of all weights", False),
}
@dataclass(frozen=True)
class Parameterised:
    """A family of methods named ``<prefix><value>``: ``state_l2_1e-05`` is ``train --state-l2 1e-05``."""

    make: Callable[[float], Method]  # the method of a value
    describe: str                    # its table label, formatted with the value
    allowed: Callable[[float], bool]
    placeholder: str                 # how the value is written in usage errors


#: The parameterised families (placed after state_direct in tables and plots), by prefix.
PARAMETERISED: dict[str, Parameterised] = {
    "state_l2_": Parameterised(state_l2, "state tuning, direct, --state-l2 {:g}",
                               lambda w: w > 0 and math.isfinite(w), "WEIGHT"),
    "state_ema_": Parameterised(state_ema, "state tuning, direct, --ema {:g}", lambda d: 0 < d < 1, "DECAY"),
}
#: How the parameterised names are written, for usage errors.
PARAMETERISED_USAGE = ", ".join(prefix + f.placeholder for prefix, f in PARAMETERISED.items())


def parameterised(name: str) -> tuple[str, float] | None:
    """``(prefix, value)`` of a parameterised method name with an allowed value, else None."""
    for prefix, family in PARAMETERISED.items():
        if name.startswith(prefix):
            try:
                value = float(name[len(prefix):])
            except ValueError:
                return None
            return (prefix, value) if family.allowed(value) else None
    return None


def get(name: str) -> tuple[Method, str, bool]:
    """``(function, description, is a state method)`` of a method name, including the parameterised ones;
    KeyError for an unknown name."""
    if name in METHODS:
        return METHODS[name]
    found = parameterised(name)
    if found is None:
        raise KeyError(name)
    prefix, value = found
    family = PARAMETERISED[prefix]
    return family.make(value), family.describe.format(value), True


def known(name: str) -> bool:
    try:
        get(name)
    except KeyError:
        return False
    return True


def order(name: str) -> tuple[float, float]:
    """Where a method sits in tables and plots (a sort key): the built-in order, parameterised ones after
    state_direct, grouped by prefix and by value within a group."""
    names = list(METHODS)
    if name in names:
        return names.index(name), 0.0
    found = parameterised(name)
    if found is not None:
        prefix, value = found
        return names.index("state_direct") + 0.5 + list(PARAMETERISED).index(prefix) * 0.1, value
    return len(names), 0.0
