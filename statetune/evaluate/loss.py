"""Masked loss of a dataset under a given initial state: it lives in :mod:`statetune.objective`, below both
training and evaluation; re-exported here for the evaluation code and scripts that import it from here."""

from statetune.objective import LossResult, dataset_loss

__all__ = ["LossResult", "dataset_loss"]
