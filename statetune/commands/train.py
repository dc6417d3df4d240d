"""``statetune train``: its options (the run's config plus how to launch it) and a thin function over
:func:`statetune.train.loop.train`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from statetune.errors import OptionError
from statetune.options import accepts_flat, h
from statetune.train import loop, rundir, runlock
from statetune.train.config import TrainConfig


@accepts_flat
@dataclass
class TrainOptions(TrainConfig):
    """Train the initial state of a frozen RWKV model on a tokenized dataset (the output of prepare)."""

    resume: str | None = field(default=None, metadata={**h(
        "Continue the run in this directory (instead of --out) from its newest intact checkpoint; its options "
        "come from its config.toml (only --max-steps, --epochs, --eval-every, --save-every and a few more may "
        "change). --model, --train-data and --val-data are then optional: give them only when the files "
        "moved (their content is checked against the run's)."), "exclusive": "run", "metavar": "RUN"})
    overwrite: bool = field(default=False, metadata=h("Start over in an --out folder that already holds a "
                                                       "run: its checkpoints, logs and states are deleted."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resume is None:
            self.check_inputs()
        elif self.overwrite:
            raise OptionError("--overwrite starts a run over and --resume continues it: give one of them")

    def config(self) -> TrainConfig:
        """The run's config: these options without the launch switches."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})


def train(opts: TrainOptions) -> int:
    """Train a fresh run, or continue the one in ``--resume RUN`` (its config.toml, with the few changes
    allowed on resume taken from the other flags); returns the loop's exit status (130: interrupted)."""
    if opts.resume is not None:
        runlock.check_free(opts.resume)  # a run writing there: say so, not what its half-written folder lacks
        config = rundir.resumed_config(opts.resume, rundir.explicit(opts.config()))
        return loop.train(config, resume=True)
    return loop.train(opts.config(), overwrite=opts.overwrite)
