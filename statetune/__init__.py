"""statetune: state tuning for RWKV language models."""

__version__ = "0.1.0"

from statetune.model.checkpoint import load_model  # noqa: E402
from statetune.model.state import RWKVState  # noqa: E402
from statetune.tuning.statefile import load_state, save_state  # noqa: E402

__all__ = ["RWKVState", "__version__", "load_model", "load_state", "save_state"]
