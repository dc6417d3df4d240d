"""``ObjectiveConfig``: what a run minimises (``train --objective``) and the parameters of each objective.

The ``[objective]`` option group of :class:`~statetune.train.config.TrainConfig`: flat flags on the command
line (``--objective dpo --beta 0.2``), a table ``[objective]`` (or flat keys) in TOML, written to the run's
``config.toml`` and to every state file's ``trained`` metadata.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from statetune.errors import OptionError
from statetune.options import h


class Objective(enum.StrEnum):
    """The training objectives: the masked next-token loss, two preference losses, and distillation."""

    sft = "sft"
    dpo = "dpo"
    orpo = "orpo"
    distill = "distill"

    @property
    def preference(self) -> bool:
        """Whether the objective trains on preference pairs (``chosen``/``rejected``) rather than records."""
        return self in (Objective.dpo, Objective.orpo)


@dataclass
class ObjectiveConfig:
    """The training objective: masked next-token loss (sft), DPO, ORPO, or distillation from a teacher."""

    objective: Objective = field(default=Objective.sft, metadata=h(
        "What training minimises: sft (next-token loss on mask-1 tokens), dpo or orpo (preference pairs, "
        "see docs/training.md), or distill (match --teacher's next-token distributions)."))
    beta: float = field(default=0.1, metadata=h("DPO: the implicit reward's scale, beta * (log-prob - the "
                                                "reference's); larger keeps the state closer to the reference "
                                                "(the run's starting state)."))
    orpo_lambda: float = field(default=0.1, metadata=h("ORPO: the weight of the odds-ratio term added to the "
                                                       "next-token loss on the chosen completions."))
    teacher: str | None = field(default=None, metadata=h(
        "Distill: the teacher model (any model statetune loads with the same vocabulary, e.g. a fully "
        "fine-tuned checkpoint).", metavar="MODEL"))
    teacher_state: str | None = field(default=None, metadata=h(
        "Distill: a state file the teacher starts every record from (default: its zero state).",
        metavar="FILE"))
    distill_temperature: float = field(default=1.0, metadata=h(
        "Distill: softmax temperature of both distributions (the KL term is multiplied by its square)."))
    distill_alpha: float = field(default=0.5, metadata=h(
        "Distill: weight of the KL term; the next-token loss on the data gets 1 - ALPHA."))

    def __post_init__(self) -> None:
        try:
            self.objective = Objective(self.objective)
        except ValueError:
            raise OptionError(f"--objective: invalid value {self.objective!r} (choose from "
                              f"{', '.join(m.value for m in Objective)})") from None
        if not self.beta > 0:
            raise OptionError(f"--beta: must be positive, got {self.beta}")
        if not self.orpo_lambda >= 0:
            raise OptionError(f"--orpo-lambda: must not be negative, got {self.orpo_lambda}")
        if not self.distill_temperature > 0:
            raise OptionError(f"--distill-temperature: must be positive, got {self.distill_temperature}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise OptionError(f"--distill-alpha: must be in [0, 1], got {self.distill_alpha}")
        if self.objective == Objective.distill and not self.teacher:
            raise OptionError("--objective distill needs --teacher MODEL")
        if self.objective != Objective.distill and (self.teacher or self.teacher_state):
            raise OptionError(f"--teacher/--teacher-state: only --objective distill uses a teacher, not "
                              f"--objective {self.objective.value}")
        if self.teacher_state and not self.teacher:
            raise OptionError("--teacher-state needs --teacher MODEL")

    def to_dict(self) -> dict[str, Any]:
        """The objective and the parameters it uses, as plain JSON values (for a state's ``trained`` metadata)."""
        used = {Objective.sft: (), Objective.dpo: ("beta",), Objective.orpo: ("orpo_lambda",),
                Objective.distill: ("teacher", "teacher_state", "distill_temperature", "distill_alpha")}
        return {"objective": self.objective.value, **{k: getattr(self, k) for k in used[self.objective]}}
