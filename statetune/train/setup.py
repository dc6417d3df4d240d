"""The state a run starts from and the data it reads (the run folder and resumed options are in ``rundir``;
dtype, tokenizer and dataset metadata in :mod:`statetune.runtime`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from statetune.data.loader import TokenDataset
from statetune.data.pairs import PREFERENCE, PreferenceDataset, data_kind
from statetune.errors import DataError, OptionError
from statetune.model.state import RWKVState
from statetune.runtime import dataset_meta, prompt_state
from statetune.train.config import TrainConfig
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


def load_datasets(config: TrainConfig, vocab_size: int) -> tuple[Any, Any]:
    """The training and validation data (None without ``--val-data``) as the run's objective reads them:
    records for sft and distill, preference pairs for dpo and orpo; the other kind is refused by name, and
    so is data without a loss token."""
    objective = config.objective.objective
    out = []
    for flag_name, path in (("--train-data", config.train_data), ("--val-data", config.val_data)):
        if path is None:
            out.append(None)
            continue
        if Path(path).is_file() and (data_kind(path, dataset_meta(path)) == PREFERENCE) != objective.preference:
            if objective.preference:
                raise DataError(f"{flag_name} {path}: holds records ({{text, mask}}), but --objective "
                                f"{objective.value} trains on preference pairs ({{chosen, rejected}}, \"kind\": "
                                f"\"preference\" in its .meta.json); give preference data, or use --objective sft")
            raise DataError(f"{flag_name} {path}: holds preference pairs ({{chosen, rejected}}), but --objective "
                            f"{objective.value} trains on records ({{text, mask}}); use --objective dpo or orpo")
        data = PreferenceDataset(path, vocab_size) if objective.preference else TokenDataset(path, vocab_size)
        if data.loss_tokens == 0:
            raise DataError(f"{flag_name} {data.path}: no record has a loss token (every mask is 0 after "
                            f"the first token), so there is nothing to learn from or measure")
        out.append(data)
    return out[0], out[1]
