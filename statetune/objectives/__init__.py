"""Training objectives beyond the masked next-token loss: DPO, ORPO and distillation.

One module per loss, each a pure function of log-probabilities or logits (``dpo``, ``orpo``, ``distill``),
tested on hand-computed values; the objectives that train with them (``base``: the interface and SFT,
``preference``: DPO and ORPO, ``distill``) share the segment loop of :mod:`statetune.objective`.
:func:`make_objective` builds the one a run's config asks for.
"""

from __future__ import annotations

from statetune.errors import OptionError
from statetune.model.state import RWKVState
from statetune.objectives.base import EvalResult, Segmenting, SFTObjective, TrainObjective
from statetune.objectives.config import Objective, ObjectiveConfig

__all__ = ["EvalResult", "Objective", "ObjectiveConfig", "SFTObjective", "Segmenting", "TrainObjective",
           "make_objective"]


def make_objective(config: ObjectiveConfig, model, start: RWKVState, seg: Segmenting) -> TrainObjective:
    """The objective ``config`` names, for ``model`` trained from ``start`` (DPO's reference state); loads
    the teacher (and its state) for distillation, refusing one whose vocabulary differs."""
    if config.objective == Objective.sft:
        return SFTObjective(model, seg)
    if config.objective.preference:
        from statetune.objectives.preference import PreferenceObjective

        return PreferenceObjective(model, config, start, seg)
    from statetune.model.checkpoint import load_model
    from statetune.objectives.distill import DistillObjective
    from statetune.tuning.statefile import load_state

    teacher = load_model(config.teacher, device=model.device, dtype=model.dtype)  # frozen, as every model loads
    if teacher.config.vocab_size != model.config.vocab_size:
        raise OptionError(f"--teacher {config.teacher}: its vocabulary has {teacher.config.vocab_size} ids, the "
                          f"model's {model.config.vocab_size}; distillation needs the same tokenizer and vocabulary")
    teacher_state = load_state(config.teacher_state, teacher).state if config.teacher_state else None
    return DistillObjective(model, teacher, teacher_state, config, seg)
