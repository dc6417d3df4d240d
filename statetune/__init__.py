"""statetune: state tuning for RWKV language models."""

from statetune._version import __version__
from statetune.model.checkpoint import load_model
from statetune.model.state import RWKVState
from statetune.tuning.statefile import load_state, save_state

__all__ = ["RWKVState", "__version__", "load_model", "load_state", "save_state"]
