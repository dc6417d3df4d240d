"""``TrainOptions``: every flag of ``statetune train``, with its help text and validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from statetune.errors import OptionError
from statetune.objective import Bptt
from statetune.tuning.tunable import Param, Scope


def _h(text: str, **kw) -> dict:
    return {"help": text, **kw}


# Defaults per parameterisation (see README, "Choosing hyper-parameters").
DEFAULT_LR = {Param.direct: (1.0, 0.01), Param.encoder: (1.0, 0.01)}


@dataclass
class TrainOptions:
    """Train the initial state of a frozen RWKV model on a tokenized dataset (the output of prepare)."""

    model: str | None = field(default=None, metadata=_h("Base model checkpoint (.pth or .safetensors)."))
    train_data: str | None = field(default=None, metadata=_h("Tokenized training JSONL (from `statetune prepare`)."))
    out: str | None = field(default=None, metadata=_h("Run directory for states, checkpoints and logs."))
    val_data: str | None = field(default=None, metadata=_h("Tokenized validation JSONL (optional)."))
    resume: str | None = field(default=None, metadata=_h("Continue the run in this directory from its newest "
                                                         "intact checkpoint; its options come from its "
                                                         "config.toml (only --max-steps, --epochs, --eval-every, "
                                                         "--save-every and a few more may change)."))
    overwrite: bool = field(default=False, metadata=_h("Start over in an --out folder that already holds a "
                                                       "run: its checkpoints, logs and states are deleted."))
    param: Param = field(default=Param.direct, metadata=_h("What is trained: the state tensors themselves, "
                                                          "or a per-layer state encoder that produces them."))
    encoder_scope: Scope = field(default=Scope.layer, metadata=_h("One encoder per layer, or one shared."))
    encoder_in: int = field(default=64, metadata=_h("Encoder: size of the learned input per head."))
    encoder_hidden: int = field(default=256, metadata=_h("Encoder: hidden width."))
    tune_shift: bool = field(default=False, metadata=_h("Also train the two token-shift states per layer."))
    shift_lr_scale: float = field(default=1.0, metadata=_h("With --tune-shift: the token-shift states' learning "
                                                           "rate as a fraction of the state's (they live at "
                                                           "the scale of normalised activations, ~1)."))
    init: str = field(default="zeros", metadata=_h("Initial state: zeros, prompt (see --init-prompt), or a "
                                                   "state file to continue from."))
    init_prompt: str | None = field(default=None, metadata=_h("Text whose final state initialises training "
                                                              "(with --init prompt)."))
    tokenizer: str = field(default="auto", metadata=_h("Tokenizer for --init-prompt and samples: world, "
                                                       "bytes, or auto (from the dataset's meta.json or the "
                                                       "model's vocabulary)."))
    max_steps: int | None = field(default=None, metadata=_h("Optimizer steps (default: --epochs worth)."))
    epochs: float = field(default=1.0, metadata=_h("Passes over the training data when --max-steps is unset."))
    batch_size: int = field(default=8, metadata=_h("Sequences per micro-batch per process."))
    grad_accum: int = field(default=1, metadata=_h("Micro-batches per optimizer step."))
    ctx_len: int = field(default=1024, metadata=_h("Longest segment run at once; longer sequences are cut "
                                                   "into segments with the state carried over. With "
                                                   "--bptt full a memory knob only: the gradient is the "
                                                   "same for any value."))
    bptt: Bptt = field(default=Bptt.full, metadata=_h("Backpropagation through the segments of a long "
                                                      "sequence: full (every segment's loss reaches the "
                                                      "state, exactly) or truncated (the first segment's "
                                                      "only; faster, and later loss tokens teach nothing)."))
    lr: float | None = field(default=None, metadata=_h("Peak learning rate (default: 1.0 for both "
                                                       "parameterisations)."))
    lr_final: float | None = field(default=None, metadata=_h("Learning rate at the end of the cosine "
                                                             "decay (default: 0.01)."))
    warmup_steps: int = field(default=10, metadata=_h("Linear warmup steps."))
    weight_decay: float = field(default=0.0, metadata=_h("AdamW weight decay."))
    beta1: float = field(default=0.9, metadata=_h("AdamW beta1."))
    beta2: float = field(default=0.99, metadata=_h("AdamW beta2."))
    grad_clip: float = field(default=1.0, metadata=_h("Clip the global gradient norm (0 disables)."))
    eval_every: int = field(default=50, metadata=_h("Validate every N steps (and at the end)."))
    val_batches: int | None = field(default=None, metadata=_h("Validate on at most N batches."))
    patience: int | None = field(default=None, metadata=_h("Stop after N evaluations without improvement."))
    save_every: int = field(default=50, metadata=_h("Write a training checkpoint every N steps."))
    keep_checkpoints: int = field(default=2, metadata=_h("How many recent checkpoints to keep."))
    samples: int = field(default=2, metadata=_h("Sample generations from validation prompts per evaluation."))
    activation_checkpoint: bool = field(default=False, metadata=_h("Recompute each layer in the backward "
                                                                   "pass (less memory for long contexts)."))
    seed: int = field(default=0, metadata=_h("Seed for data order and encoder initialisation."))
    device: str = field(default="cpu", metadata=_h("Torch device (cpu, cuda, cuda:1)."))
    dtype: str = field(default="auto", metadata=_h("Compute dtype: fp32, bf16, or auto (fp32 on CPU, "
                                                   "bf16 on CUDA)."))
    progress: bool = field(default=True, metadata=_h("Show a progress bar."))

    def __post_init__(self) -> None:
        self.param, self.encoder_scope = Param(self.param), Scope(self.encoder_scope)
        self.bptt = Bptt(self.bptt)
        if self.resume is None:
            for name in ("model", "train_data", "out"):
                if getattr(self, name) is None:
                    raise OptionError(f"--{name.replace('_', '-')} is required (or --resume RUN_DIR)")
        positive = ("batch_size", "grad_accum", "ctx_len", "eval_every", "save_every", "keep_checkpoints",
                    "encoder_in", "encoder_hidden")
        for name in positive:
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "patience", "val_batches"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise OptionError(f"--{name.replace('_', '-')}: must be at least 1, got {v}")
        if self.epochs <= 0:
            raise OptionError(f"--epochs: must be positive, got {self.epochs}")
        for name in ("lr", "lr_final", "shift_lr_scale"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise OptionError(f"--{name.replace('_', '-')}: must not be negative, got {v}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise OptionError(f"--{name}: AdamW needs a value in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "warmup_steps"):
            if getattr(self, name) < 0:
                raise OptionError(f"--{name.replace('_', '-')}: must not be negative, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise OptionError(f"--seed: must be in 0..{2**63 - 1}, got {self.seed}")
        if self.init == "prompt" and not self.init_prompt:
            raise OptionError("--init prompt needs --init-prompt TEXT")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise OptionError(f"--dtype: expected auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if self.tokenizer not in ("auto", "world", "bytes"):
            raise OptionError(f"--tokenizer: expected auto, world or bytes, got {self.tokenizer!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.param][0]
        if self.lr_final is None:
            self.lr_final = DEFAULT_LR[self.param][1]
