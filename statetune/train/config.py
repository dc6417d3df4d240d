"""What a training run is: ``TrainConfig``, the inputs and batch shape, with one dataclass per concern.

The groups (``objective``, ``tuning``, ``optim``, ``schedule``, ``eval``, ``checkpoint``) are nested dataclasses; on the
command line their fields are flat flags (``--lr``, not ``--optim.lr``) and a TOML config may set them flat
or in tables (``[optim] lr = 0.5``), see :mod:`statetune.options`. ``TrainConfig(lr=0.5, param="encoder")``
is accepted too: a flat keyword is routed to the group that owns it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from statetune.errors import OptionError
from statetune.objective import Bptt
from statetune.objectives.config import ObjectiveConfig
from statetune.options import accepts_flat, flag, h
from statetune.runtime import DTYPES, TOKENIZERS, check_choice
from statetune.tuning.config import StateTuningConfig


def _at_least(owner: object, names: tuple[str, ...], low: int) -> None:
    for name in names:
        v = getattr(owner, name)
        if v is not None and v < low:
            raise OptionError(f"{flag(name)}: must be at least {low}, got {v}")


def _lr(value: object) -> float | str:
    try:
        return lr_value(value)
    except (TypeError, ValueError) as e:
        raise OptionError(f"--lr: invalid value {value!r}: {e}") from None


def _not_negative(owner: object, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(owner, name) < 0:
            raise OptionError(f"{flag(name)}: must not be negative, got {getattr(owner, name)}")


def lr_value(value: object) -> float | str:
    """A ``--lr`` value: a finite number, or ``"auto"`` (search before training)."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"expected a number or auto, got {type(value).__name__}")
    try:
        lr = float(value)
    except ValueError:
        raise ValueError("expected a number or auto") from None
    if not math.isfinite(lr):
        raise ValueError("must be a finite number")
    return lr


@dataclass
class OptimConfig:
    """AdamW, gradient clipping, the state's L2 pull, and the learning-rate search of ``--lr auto``."""

    lr: float | str = field(default=1.0, metadata=h(
        "Peak learning rate (the state and the encoder alike), or auto: try --lr-search-rates for "
        "--lr-search-steps steps each before training and keep the best on validation (see docs/training.md).",
        parse=lr_value, metavar="LR|auto"))
    weight_decay: float = field(default=0.0, metadata=h("AdamW weight decay."))
    beta1: float = field(default=0.9, metadata=h("AdamW beta1."))
    beta2: float = field(default=0.99, metadata=h("AdamW beta2."))
    grad_clip: float = field(default=1.0, metadata=h("Clip the global gradient norm (0 disables)."))
    state_l2: float = field(default=0.0, metadata=h("Add STATE_L2 * sum((state - initial state)^2) to the loss: "
                                                    "keeps the tuned state near where it started (0 = off)."))
    ema: float = field(default=0.0, metadata=h(
        "Validate and save an exponential moving average of the trained parameters with this decay (e.g. "
        "0.99; warmed up over the first steps; 0 = off). The optimizer still steps the raw parameters.",
        metavar="DECAY"))
    lr_search_steps: int = field(default=24, metadata=h("With --lr auto: optimizer steps per tried rate."))
    lr_search_rates: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0, 100.0], metadata=h(
        "With --lr auto: the rates tried first (then the midpoints around the best)."))

    def __post_init__(self) -> None:
        self.lr = _lr(self.lr)
        _not_negative(self, (*(("lr",) if self.lr != "auto" else ()), "weight_decay", "grad_clip", "state_l2"))
        _at_least(self, ("lr_search_steps",), 1)
        if not self.lr_search_rates or any(r <= 0 for r in self.lr_search_rates):
            raise OptionError(f"--lr-search-rates: need positive rates, got {self.lr_search_rates}")
        if not 0.0 <= self.ema < 1.0:
            raise OptionError(f"--ema: the average's decay must be in [0, 1), got {self.ema}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise OptionError(f"--{name}: AdamW needs a value in [0, 1), got {getattr(self, name)}")


@dataclass
class ScheduleConfig:
    """How long to train, and the learning rate over time: linear warmup, then cosine decay."""

    max_steps: int | None = field(default=None, metadata=h("Optimizer steps (default: --epochs worth)."))
    epochs: float = field(default=1.0, metadata=h("Passes over the training data when --max-steps is unset."))
    warmup_steps: int = field(default=10, metadata=h("Linear warmup steps."))
    lr_final: float = field(default=0.01, metadata=h("Learning rate at the end of the cosine decay."))

    def __post_init__(self) -> None:
        _at_least(self, ("max_steps",), 1)
        if self.epochs <= 0:
            raise OptionError(f"--epochs: must be positive, got {self.epochs}")
        _not_negative(self, ("warmup_steps", "lr_final"))


@dataclass
class EvalConfig:
    """Validation during training: how often, how much, when to stop early, and sample generations."""

    eval_every: int = field(default=50, metadata=h("Validate every N steps (and at the end)."))
    val_batches: int | None = field(default=None, metadata=h("Validate on at most N batches."))
    patience: int | None = field(default=None, metadata=h("Stop after N evaluations without improvement."))
    samples: int = field(default=2, metadata=h("Sample generations from validation prompts per evaluation."))

    def __post_init__(self) -> None:
        _at_least(self, ("eval_every", "val_batches", "patience"), 1)


@dataclass
class CheckpointConfig:
    """Training checkpoints (what ``--resume`` continues from)."""

    save_every: int = field(default=50, metadata=h("Write a training checkpoint every N steps."))
    keep_checkpoints: int = field(default=2, metadata=h("How many recent checkpoints to keep."))

    def __post_init__(self) -> None:
        _at_least(self, ("save_every", "keep_checkpoints"), 1)


@accepts_flat
@dataclass
class TrainConfig:
    """One training run: the base model and data, where it goes, the batch shape and the option groups."""

    model: str | None = field(default=None, metadata=h("Base model checkpoint (.pth or .safetensors); "
                                                        "required, except with --resume."))
    train_data: str | None = field(default=None, metadata=h("Tokenized training JSONL (from `statetune "
                                                             "prepare`); required, except with --resume."))
    out: str | None = field(default=None, metadata={**h("Run directory of a new run, for its states, "
                                                          "checkpoints and logs."), "exclusive": "run"})
    val_data: str | None = field(default=None, metadata=h("Tokenized validation JSONL (optional)."))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    tuning: StateTuningConfig = field(default_factory=StateTuningConfig)
    tokenizer: str = field(default="auto", metadata=h("Tokenizer for --init-prompt and samples: world, "
                                                       "bytes, or auto (from the dataset's meta.json or the "
                                                       "model's vocabulary)."))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch_size: int = field(default=8, metadata=h("Sequences per micro-batch per process."))
    grad_accum: int = field(default=1, metadata=h("Micro-batches per optimizer step."))
    ctx_len: int = field(default=1024, metadata=h("Longest segment run at once; longer sequences are cut "
                                                   "into segments with the state carried over. With "
                                                   "--bptt full a memory knob only: the gradient is the "
                                                   "same for any value."))
    bptt: Bptt = field(default=Bptt.full, metadata=h("Backpropagation through the segments of a long "
                                                      "sequence: full (every segment's loss reaches the "
                                                      "state, exactly) or truncated (the first segment's "
                                                      "only; faster, and later loss tokens teach nothing)."))
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    activation_checkpoint: bool = field(default=False, metadata=h("Recompute each layer in the backward "
                                                                   "pass (less memory for long contexts)."))
    seed: int = field(default=0, metadata=h("Seed for data order and encoder initialisation."))
    device: str = field(default="cpu", metadata=h("Torch device (cpu, cuda, cuda:1)."))
    dtype: str = field(default="auto", metadata=h("Compute dtype: fp32, bf16, or auto (fp32 on CPU, "
                                                   "bf16 on CUDA)."))
    threads: int | None = field(default=None, metadata=h("CPU threads for torch (default: torch's)."))
    progress: bool = field(default=True, metadata=h("Show a progress bar."))

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"--threads: must be at least 1, got {self.threads}")
        try:
            self.bptt = Bptt(self.bptt)
        except ValueError:
            raise OptionError(f"--bptt: invalid value {self.bptt!r} (choose from full, truncated)") from None
        _at_least(self, ("batch_size", "grad_accum", "ctx_len"), 1)
        if not 0 <= self.seed < 2**63:
            raise OptionError(f"--seed: must be in 0..{2**63 - 1}, got {self.seed}")
        check_choice("--dtype", self.dtype, DTYPES)
        check_choice("--tokenizer", self.tokenizer, TOKENIZERS)

    def check_inputs(self) -> None:
        """Refuse a run without its model, data or run folder (all three have defaults only so that a
        resumed run can take them from its ``config.toml``)."""
        for name in ("model", "train_data", "out"):
            if getattr(self, name) is None:
                raise OptionError(f"{flag(name)} is required (or --resume RUN_DIR)")
