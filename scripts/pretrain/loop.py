"""The training loop: AdamW on random byte windows, a schedule that ends with the wall-clock budget, resumable.

The budget (``--minutes``) drives the schedule: the first steps measure the seconds per step, the number of
steps is planned so that the cosine ends when the budget does, and the plan is revised every few steps
from the recent speed (the machine may be shared). The cosine runs on a progress variable that each step
advances by its share of what is left (``(1 - p) / steps left``), so a revised plan changes the pace of
the decay without making the learning rate jump. A resumable training state is written every few
minutes and on SIGTERM/SIGINT; ``--resume`` continues a killed run.
"""

from __future__ import annotations

import argparse
import math
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from statetune.fileio import atomic_write
from statetune.model.base import RWKVBase
from statetune.train.metrics import MetricsLog
from statetune.train.schedule import lr_at

from .data import batches, lm_loss, load_tokens, window_loss
from .decode import greedy
from .model import make_config, new_model

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"  # written by statetune's MetricsLog in the work directory
_RESOLUTION = 1_000_000         # progress steps of the cosine (see budget_lr)


def param_groups(model: RWKVBase, weight_decay: float) -> list[dict]:
    """As the official trainer: decay on 2-D ``*.weight`` matrices, ``w0`` (decay speeds) at twice the LR."""
    decay, double, plain = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("att.w0"):
            double.append(p)
        elif p.dim() >= 2 and name.endswith(".weight") and weight_decay > 0:
            decay.append(p)
        else:
            plain.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": plain, "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": double, "weight_decay": 0.0, "lr_scale": 2.0}]


def budget_lr(step: int, progress: float, peak: float, final: float, warmup: int) -> float:
    """statetune's schedule (:func:`statetune.train.schedule.lr_at`: linear warmup, then cosine from ``peak``
    to ``final``) with the cosine driven by the budget's ``progress`` (0 to 1) instead of a fixed number of
    steps, which the budget does not know in advance."""
    if step < warmup:
        return lr_at(step, warmup, peak, final, warmup)
    return lr_at(warmup + round(min(1.0, progress) * _RESOLUTION), warmup + _RESOLUTION, peak, final, warmup)


def save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` through :func:`statetune.fileio.atomic_write`: a reader never sees half a file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


@dataclass
class Pace:
    """Where a run stands against its budget; saved in the training state so that a resumed run keeps pace.

    ``sec_per_step`` is measured after ``--measure-steps`` steps and again every ``--replan-every``;
    ``planned`` is the step the budget is expected to end at; ``progress`` drives the cosine (0 to 1).
    """

    step: int = 0
    elapsed: float = 0.0
    planned: int | None = None
    sec_per_step: float | None = None
    progress: float = 0.0

    def advance(self, recent: list[float], left: float, args: argparse.Namespace) -> None:
        """After a step: remeasure the speed when due (median of ``recent`` step times, plus eval/save
        overhead), plan the steps that fit in the ``left`` seconds, and move the cosine by this step's share
        of what is left, so a revised plan changes the pace of the decay without making the LR jump."""
        if self.step == args.measure_steps or (self.step > args.measure_steps
                                               and self.step % args.replan_every == 0):
            self.sec_per_step = sorted(recent)[len(recent) // 2] * 1.03 + 0.02
        if self.sec_per_step is None:
            return
        steps_left = left / self.sec_per_step
        self.planned = self.step + max(0, round(steps_left))
        if self.step >= args.warmup:
            self.progress = 1.0 if steps_left <= 1 else self.progress + (1.0 - self.progress) / steps_left


def _restore(state_path: Path, args: argparse.Namespace, model: RWKVBase, opt: torch.optim.Optimizer,
             gen: torch.Generator) -> tuple[Pace, bool]:
    """Load a training state into ``model``, ``opt`` and ``gen``; return its pace and whether it had finished.
    A state trained at another model size is refused, naming the field."""
    ck = torch.load(state_path, map_location=args.device, weights_only=True)
    saved = ck["args"]
    for key in ("n_layer", "n_embd", "head_size", "vocab_size", "ffn_mult"):
        if saved[key] != getattr(args, key):
            raise SystemExit(f"--resume: {state_path} was trained with {key}={saved[key]}, "
                             f"not {getattr(args, key)}")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    gen.set_state(ck["rng"])
    pace = Pace(**{f.name: ck[f.name] for f in fields(Pace)})
    return pace, bool(ck.get("done"))


def _train_step(model: RWKVBase, opt: torch.optim.Optimizer, batch: tuple[Tensor, Tensor], lr: float,
                args: argparse.Namespace) -> float:
    """One AdamW step at ``lr`` (times each group's scale) with gradient clipping; returns the batch's CE."""
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_scale"]
    x, y = batch
    logits, _ = model(x.to(args.device))
    loss, ce = lm_loss(logits, y.to(args.device), args.max_logit_penalty)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    return ce.item()


def train(args: argparse.Namespace) -> Path:
    """Run (or resume) training; return the path of the final training state."""
    work = Path(args.work_dir)
    state_path = work / STATE_FILE
    torch.manual_seed(args.seed)
    cfg = make_config(args.n_layer, args.n_embd, args.head_size, args.vocab_size, args.ffn_mult)
    model = new_model(cfg, args.seed, args.device)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.99), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    pace = Pace()
    resumed = args.resume and state_path.is_file()
    if resumed:
        pace, done = _restore(state_path, args, model, opt, gen)
        if done:
            print(f"{state_path}: training already finished at step {pace.step}", flush=True)
            return state_path
        print(f"resumed from {state_path}: step {pace.step}, {pace.elapsed / 60:.1f} min done", flush=True)
    metrics = MetricsLog(work, resume_step=pace.step if resumed else -1)  # a fresh run starts a fresh log
    train_tokens = load_tokens(Path(args.corpus) / "train.txt")
    val_tokens = load_tokens(Path(args.corpus) / "val.txt")
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = args.batch * args.ctx
    budget = args.minutes * 60.0
    print(f"model {cfg.n_layer}x{cfg.n_embd} ffn {cfg.dim_ffn} lora {cfg.lora}: {n_params / 1e6:.2f}M params; "
          f"train {train_tokens.numel() / 1e6:.1f}M tokens, val {val_tokens.numel() / 1e6:.2f}M; "
          f"{tokens_per_step} tokens/step; budget {args.minutes} min", flush=True)

    stop = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def save(done: bool = False) -> None:
        save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "rng": gen.get_state(),
                     **asdict(pace), "done": done, "args": vars(args), "n_params": n_params}, state_path)

    data = batches(train_tokens, args.batch, args.ctx, gen)
    recent: list[float] = []        # seconds of the latest steps
    losses: list[float] = []
    last_save = last_eval = time.monotonic()
    run_start = time.monotonic() - pace.elapsed
    while True:
        pace.elapsed = time.monotonic() - run_start
        if pace.progress >= 1.0:
            break
        if pace.elapsed >= budget:
            print(f"budget reached at step {pace.step}", flush=True)
            break
        if stop["signal"] is not None:
            save()
            print(f"signal {stop['signal']}: saved {state_path} at step {pace.step}; rerun with --resume",
                  flush=True)
            raise SystemExit(128 + stop["signal"])
        lr = budget_lr(pace.step, pace.progress, args.lr, args.lr * args.final_lr_frac, args.warmup)
        t0 = time.monotonic()
        losses.append(_train_step(model, opt, next(data), lr, args))
        pace.step += 1
        recent = (recent + [time.monotonic() - t0])[-args.plan_window:]
        first_plan = pace.sec_per_step is None
        pace.advance(recent, budget - (time.monotonic() - run_start), args)
        if first_plan and pace.sec_per_step is not None:
            print(f"measured {pace.sec_per_step:.2f} s/step ({tokens_per_step / pace.sec_per_step:.0f} "
                  f"tokens/s): planning {pace.planned} steps = {pace.planned * tokens_per_step / 1e6:.1f}M "
                  "tokens", flush=True)
        if pace.step % args.log_every == 0:
            mean = sum(losses) / len(losses)
            losses = []
            now = time.monotonic() - run_start
            metrics.log("train", pace.step, tokens=pace.step * tokens_per_step, elapsed_s=round(now, 1), lr=lr,
                        loss=round(mean, 5), planned=pace.planned,
                        tokens_per_s=round(tokens_per_step / (sum(recent) / len(recent)), 1))
            print(f"step {pace.step}/{pace.planned} {now / 60:.1f} min lr {lr:.2e} loss {mean:.4f} "
                  f"({mean / math.log(2):.3f} bits) {tokens_per_step * len(recent) / sum(recent):.0f} tok/s",
                  flush=True)
        if time.monotonic() - last_eval >= args.eval_every_min * 60:
            evaluate_and_log(model, val_tokens, metrics, pace.step, tokens_per_step, run_start, args)
            last_eval = time.monotonic()
        if time.monotonic() - last_save >= args.save_every_min * 60:
            pace.elapsed = time.monotonic() - run_start
            save()
            last_save = time.monotonic()
    pace.elapsed = time.monotonic() - run_start
    evaluate_and_log(model, val_tokens, metrics, pace.step, tokens_per_step, run_start, args)
    save(done=True)
    print(f"training done: {pace.step} steps, {pace.step * tokens_per_step / 1e6:.1f}M tokens, "
          f"{pace.elapsed / 60:.1f} min", flush=True)
    return state_path


def evaluate_and_log(model: RWKVBase, val_tokens: Tensor, metrics: MetricsLog, step: int, tokens_per_step: int,
                     run_start: float, args: argparse.Namespace) -> None:
    """Val loss on fixed windows, logged, with a short greedy sample to the console."""
    val = window_loss(model, val_tokens, args.val_windows, args.ctx, args.batch)
    metrics.log("val", step, tokens=step * tokens_per_step, elapsed_s=round(time.monotonic() - run_start, 1),
                loss=round(val, 5))
    sample = greedy(model, "The ", 80).replace("\n", "\\n")
    model.train()
    print(f"  val loss {val:.4f} ({val / math.log(2):.3f} bits/token) | The {sample}", flush=True)
