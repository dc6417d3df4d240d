"""The state a run starts from (the run folder and resumed options are in ``rundir``; dtype, tokenizer and
dataset metadata in :mod:`statetune.runtime`)."""

from __future__ import annotations

from pathlib import Path

from statetune.errors import OptionError
from statetune.model.state import RWKVState
from statetune.runtime import prompt_state
from statetune.tuning.config import StateTuningConfig


def initial_state(tuning: StateTuningConfig, model, tokenizer) -> RWKVState:
    """The state training starts from (``tuning.init``): zeros, a prompt's final state, or a state file."""
    if tuning.init == "zeros":
        return model.zero_state(1)
    if tuning.init == "prompt":
        ids = tokenizer.encode(tuning.init_prompt)
        if not ids:
            raise OptionError("--init-prompt: the prompt tokenizes to nothing")
        return prompt_state(model, ids)
    if Path(tuning.init).is_file():
        from statetune.tuning.statefile import load_state

        return load_state(tuning.init, model).state
    raise OptionError(f"--init: expected zeros, prompt, or an existing state file; got {tuning.init!r} "
                      f"(no such file)")
