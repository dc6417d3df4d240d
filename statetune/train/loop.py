"""The training loop: state tuning of a frozen RWKV model, with validation, checkpoints and exact resume.

:func:`train` runs a :class:`~statetune.train.config.TrainConfig` (fresh, or continued from the run folder's
newest checkpoint); the ``train`` command (:mod:`statetune.commands.train`) turns flags into that config.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from statetune.data.loader import global_batches
from statetune.device import resolve_device
from statetune.errors import CheckpointError, check_finite, state_source
from statetune.model.checkpoint import load_model
from statetune.objectives import Segmenting, make_objective
from statetune.runtime import dataset_meta, pick_tokenizer, resolve_dtype
from statetune.train import guard, rundir, runlock
from statetune.train.checkpoint import load_latest, save_checkpoint
from statetune.train.config import TrainConfig
from statetune.train.distributed import Dist, init_distributed
from statetune.train.ema import ParamEMA
from statetune.train.lr_search import search_lr
from statetune.train.metrics import MetricsLog
from statetune.train.samples import sample_generations
from statetune.train.schedule import lr_at
from statetune.train.setup import initial_state, load_datasets
from statetune.train.step import take_step
from statetune.tuning.statefile import save_state
from statetune.tuning.tunable import TunableState

__all__ = ["TrainConfig", "train"]
log = logging.getLogger("statetune.train")


class Run:
    """One training run: the frozen model, the trainable state, the optimizer and the bookkeeping."""

    def __init__(self, config: TrainConfig, d: Dist):
        self.config, self.d = config, d
        self.run_dir = Path(config.out)
        device = config.device
        if device == "cuda" and d.world > 1:
            device = f"cuda:{d.local_rank}"
        self.model = load_model(config.model, device=device, dtype=resolve_dtype(config.dtype, device))
        vocab = self.model.config.vocab_size
        self.train_data, self.val_data = load_datasets(config, vocab)
        self.fingerprint = rundir.data_fingerprint(config)
        self.meta = dataset_meta(config.train_data)
        self.tokenizer = pick_tokenizer(config.tokenizer, self.meta, vocab)
        self.start = start = initial_state(config.tuning, self.model, self.tokenizer)
        self.tunable = TunableState(start, config.tuning, config.seed)
        self.objective = make_objective(config.objective, self.model, start,
                                        Segmenting(config.ctx_len, config.bptt, config.activation_checkpoint))
        self.tunable.to(self.model.device)
        groups = self.tunable.param_groups()
        self.params = [p for g in groups for p in g["params"]]
        optim = config.optim
        # every step sets its own rate (lr_at); "auto" is settled by search_lr before the first one
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(optim.beta1, optim.beta2),
                                           weight_decay=optim.weight_decay)
        self.ema = ParamEMA(self.params, optim.ema) if optim.ema > 0 else None
        self.global_size = config.batch_size * config.grad_accum * d.world
        steps_per_epoch = math.ceil(len(self.train_data) / self.global_size)
        self.total_steps = config.schedule.max_steps or max(1, math.ceil(config.schedule.epochs * steps_per_epoch))
        self.step, self.epoch, self.batch_in_epoch, self.tokens_seen = 0, 0, 0, 0
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.baseline_val: float | None = None
        self.bad_evals = 0
        self.elapsed = 0.0
        self.lr_search: dict | None = rundir.read_lr_search(self.run_dir)  # a resumed run keeps its record

    # -- persistence ---------------------------------------------------------------------------------------
    def payload(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "tokens_seen": self.tokens_seen, "best_val": self.best_val, "last_val": self.last_val,
                "baseline_val": self.baseline_val,
                "bad_evals": self.bad_evals, "elapsed": self.elapsed, "tunable": self.tunable.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(), "data": self.fingerprint,
                "model_fingerprint": self.model.fingerprint(), "config": rundir.recorded_config(self.config),
                **({"ema": self.ema.state_dict()} if self.ema else {})}

    def restore(self, ck: dict) -> None:
        try:
            self.tunable.load_state_dict(ck["tunable"])
        except RuntimeError as e:  # shapes or names differ: the checkpoint is another run's
            raise CheckpointError(f"{self.run_dir}: the checkpoint's trainable tensors do not fit this run "
                                  f"({str(e).splitlines()[0]}); it belongs to a run with another model or "
                                  f"parameterisation") from None
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
        except ValueError as e:  # e.g. --tune-shift runs from before the shift states had their own group
            raise CheckpointError(f"{self.run_dir}: the checkpoint's optimizer does not match this run's "
                                  f"trainable parameters ({e}); it was written by an older statetune: start "
                                  f"a new run, with --init STATE to continue from its state") from None
        if self.ema is not None:
            if "ema" not in ck:
                raise CheckpointError(f"{self.run_dir}: the checkpoint has no moving average for --ema; it was "
                                      f"written without --ema: resume without it, or start a new run")
            self.ema.load_state_dict(ck["ema"])
        torch.set_rng_state(ck["rng"])
        for k in ("step", "epoch", "batch_in_epoch", "tokens_seen", "best_val", "last_val", "baseline_val",
                  "bad_evals", "elapsed"):
            setattr(self, k, ck[k])

    def checkpoint(self) -> None:
        if self.d.main:
            save_checkpoint(self.run_dir, self.step, self.payload(), self.config.checkpoint.keep_checkpoints)

    def save_state_file(self, name: str, val_loss: float | None) -> None:
        if not self.d.main:
            return
        meta = {"tokenizer": self.tokenizer.name, "trained": self.trained(val_loss)}
        if "format" in self.meta:  # the dataset's format; "format" itself is the state file's version marker
            meta["data_format"] = self.meta["format"]
        for key in ("prompt_template", "prompt_template_no_input", "prompt_fields", "completion_template",
                    "chat", "eos", "stop"):
            if key in self.meta:
                meta[key] = self.meta[key]
        state = self.current_state()
        if not guard.state_is_finite(state):
            raise guard.non_finite(self.run_dir, self.step, "the state to be saved has non-finite values")
        save_state(self.run_dir / name, state, self.model, meta, with_shift=self.tunable.has_shift)

    def trained(self, val_loss: float | None) -> dict:
        """How the state was made, for the state file's ``trained`` metadata (written as sorted JSON): the
        full tuning config, the optimiser and schedule, the batch shape, the data's fingerprint, the steps
        taken and the validation losses."""
        o = self.config
        return {"steps": self.step, "tokens": self.tokens_seen, "data": Path(o.train_data).name,
                "data_fingerprint": self.fingerprint, "tuning": o.tuning.to_dict(), "objective": o.objective.to_dict(),
                "optim": dataclasses.asdict(o.optim), "schedule": dataclasses.asdict(o.schedule),
                "batch_size": o.batch_size, "grad_accum": o.grad_accum, "world_size": self.d.world,
                "ctx_len": o.ctx_len, "bptt": o.bptt.value, "seed": o.seed,
                "val_loss": val_loss, "baseline_val_loss": self.baseline_val,
                **({"lr_search": self.lr_search} if self.lr_search else {})}

    def search_lr(self) -> None:
        """``--lr auto``: search, then train at the pick; the search's log goes to ``lr_search.json``."""
        search = search_lr(self.model, self.train_data, self.val_data, self.start, self.config, self.d, self.objective)
        self.config.optim.lr = search.lr
        self.lr_search = search.as_dict()
        if self.d.main:
            rundir.write_lr_search(self.run_dir, self.lr_search)

    def current_state(self):
        """The state to validate and save: the trained one, or its moving average with ``--ema``."""
        with torch.no_grad(), self.ema.applied() if self.ema else nullcontext():
            return self.tunable().detach()

    # -- one optimizer step --------------------------------------------------------------------------------
    def train_step(self, batches: list[list[int]]) -> dict:
        o = self.config
        lr = lr_at(self.step, self.total_steps, o.optim.lr, o.schedule.lr_final, o.schedule.warmup_steps)
        stats = take_step(self.objective, self.train_data, batches[self.batch_in_epoch], self.tunable,
                          self.optimizer, self.params, o, self.d, lr)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)
        self.batch_in_epoch += 1
        self.tokens_seen += stats.pop("tokens")
        return {**stats, "lr": lr, "tokens": self.tokens_seen}

    # -- validation ----------------------------------------------------------------------------------------
    def validate(self, metrics: MetricsLog) -> bool:
        """Validate, keep the best state, log samples; True when early stopping says stop."""
        o = self.config
        res = self.objective.evaluate(self.val_data, self.current_state(), o.batch_size, o.eval.val_batches)
        if not math.isfinite(res.loss):
            raise guard.non_finite(self.run_dir, self.step, f"the validation loss is {res.loss}")
        improved = self.best_val is None or res.loss < self.best_val
        self.last_val = res.loss
        if improved:
            self.best_val, self.bad_evals = res.loss, 0
            self.save_state_file("state-best.safetensors", res.loss)
        else:
            self.bad_evals += 1
        metrics.log("val", self.step, **res.metrics, baseline_loss=self.baseline_val, best=improved)
        extra = "".join(f", {k} {v:.4g}" for k, v in res.metrics.items() if k != "loss" and isinstance(v, float))
        log.info("step %d: val loss %.4f%s, zero-state baseline %.4f%s", self.step, res.loss, extra,
                 self.baseline_val, " *best*" if improved else "")
        if self.d.main:
            self.log_samples(metrics)
        return o.eval.patience is not None and self.bad_evals >= o.eval.patience

    def log_samples(self, metrics: MetricsLog) -> None:
        records = getattr(self.val_data, "chosen", self.val_data)  # preference pairs: their chosen sides
        for sample in sample_generations(self.model, self.tokenizer, records, self.current_state(),
                                         self.config.eval.samples):
            metrics.log("sample", self.step, **sample)


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> int:
    """Train a state; writes ``state-final.safetensors`` (and ``state-best`` with validation) in ``config.out``.

    With ``resume`` the run continues from the newest intact checkpoint in ``config.out`` (``config`` is
    then the run's own, see :func:`statetune.train.rundir.resumed_config`). A fresh run into a folder holding
    one is refused unless ``overwrite``, and so is a second run into a folder a run is writing to
    (:mod:`statetune.train.runlock`); see docs/training.md. Returns 0 when training finished, 130 when
    interrupted (a checkpoint was saved: resume the run to continue).
    """
    config.check_inputs()
    if config.threads is not None:  # a field, so --config and the Python API can set it too
        torch.set_num_threads(config.threads)
    d = init_distributed(str(resolve_device(config.device)))
    torch.manual_seed(config.seed)
    try:
        with runlock.claimed(config, d, resume, overwrite):  # one run at a time in a folder, start to end
            return _train(config, d, resume, overwrite)
    finally:
        d.close()


def _train(config: TrainConfig, d: Dist, resume: bool, overwrite: bool) -> int:
    run = Run(config, d)
    ck = load_latest(run.run_dir, set_aside=d.main) if resume else None
    if ck is not None:
        rundir.check_same_inputs(ck.payload, run.model.fingerprint(), run.fingerprint, ck.path)
        rundir.check_same_config(ck.payload, config, ck.path)
        run.restore(ck.payload)
        rundir.check_length(run.step, run.total_steps, ck.path)
        log.info("resuming %s at step %d", run.run_dir, run.step)
    elif resume:
        log.warning("%s has no checkpoint: the run starts again from step 0", run.run_dir)
    elif d.main and overwrite:
        rundir.clear_run(run.run_dir)
        run.lr_search = None
    if config.optim.lr == "auto":  # never on resume: config.toml holds the rate the search picked
        run.search_lr()
    if d.main:
        rundir.write_config(run.run_dir, config, run.lr_search)
    resume_step = (run.step if ck is not None else -1) if resume else None
    metrics = MetricsLog(run.run_dir, enabled=d.main, resume_step=resume_step)
    if d.main:
        log.info("training %d parameters (%s) for %d steps; %d records, global batch %d", run.tunable.n_trainable(),
                 config.tuning.param.value, run.total_steps, len(run.train_data), run.global_size)
    if run.val_data is not None and run.baseline_val is None:
        base = run.objective.evaluate(run.val_data, None, config.batch_size, config.eval.val_batches)
        check_finite(base.loss, "the loss", state_source(None))
        run.baseline_val = base.loss
        metrics.log("val", 0, **{**base.metrics, "loss_tokens": 0}, baseline_loss=base.loss, best=False)

    stop = {"flag": False}
    old_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not (config.progress and d.main), unit="step",
               dynamic_ncols=True)
    batches = global_batches(run.train_data.lengths, run.global_size, config.seed, run.epoch)
    early = False
    try:
        while run.step < run.total_steps and not early:
            if run.batch_in_epoch >= len(batches):
                run.epoch, run.batch_in_epoch = run.epoch + 1, 0
                batches = global_batches(run.train_data.lengths, run.global_size, config.seed, run.epoch)
            t0 = time.perf_counter()
            hooks = guard.poison(run.params, run.step + 1)
            stats = run.train_step(batches)
            for h in hooks:
                h.remove()
            guard.check_step(run.run_dir, run.step, stats["loss"], stats["grad_norm"], run.params)
            dt = time.perf_counter() - t0
            run.elapsed += dt
            metrics.log("train", run.step, **stats, tokens_per_s=stats["tokens"] / max(run.elapsed, 1e-9),
                        elapsed_s=run.elapsed)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{stats['tokens'] / max(run.elapsed, 1e-9):.0f}")
            done = run.step >= run.total_steps
            if run.val_data is not None and (run.step % config.eval.eval_every == 0 or done):
                early = run.validate(metrics)
            if run.step % config.checkpoint.save_every == 0 or done or early:
                run.checkpoint()
            guard.inject_signal(run.step)
            if stop["flag"]:
                run.checkpoint()
                log.warning("interrupted at step %d; checkpoint saved, continue with --resume %s", run.step,
                            run.run_dir)
                return 130
    finally:
        signal.signal(signal.SIGINT, old_handler)
        bar.close()
        metrics.close()
    run.save_state_file("state-final.safetensors", run.last_val)
    if d.main:
        log.info("wrote %s", run.run_dir / "state-final.safetensors")
    return 0
