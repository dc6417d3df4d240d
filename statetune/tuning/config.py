"""``StateTuningConfig``: how a state is tuned (what is trained, its sizes, where it starts), PEFT-style.

The config travels with what it made: a run's ``config.toml`` holds it, and every state file the run writes
records it (as sorted JSON in its ``trained`` metadata), so a state says exactly how it was made and
:meth:`StateTuningConfig.from_dict` rebuilds an equal config from it.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from statetune.errors import OptionError
from statetune.options import flag, h


class Param(enum.StrEnum):
    """What the optimizer changes: the state tensors themselves, or an encoder that produces them."""

    direct = "direct"
    encoder = "encoder"


class Scope(enum.StrEnum):
    """One state encoder per layer, or one shared by all layers."""

    layer = "layer"
    glob = "global"


def _enum(cls: type[enum.Enum], name: str, value: Any) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise OptionError(f"{flag(name)}: invalid value {value!r} (choose from "
                          f"{', '.join(m.value for m in cls)})") from None


def parse_layers(spec: str) -> list[int]:
    """``"0-3"``, ``"0,2,5"`` or ``"0-1,4"`` as a sorted list of distinct layer indices (``--layers``)."""
    out: set[int] = set()
    for part in str(spec).split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise OptionError(f"--layers: invalid value {spec!r}: expected layer numbers and ranges such as "
                              f"0-3 or 0,2,5") from None
        if first < 0 or last < first or last > 100_000:
            raise OptionError(f"--layers: invalid range {part.strip()!r} in {spec!r}: need 0 <= first <= last")
        out.update(range(first, last + 1))
    return sorted(out)


@dataclass
class StateTuningConfig:
    """The state-tuning method: parameterisation, encoder scope and sizes, token-shift states, initial state."""

    param: Param = field(default=Param.direct, metadata=h("What is trained: the state tensors themselves, "
                                                          "or a per-layer state encoder that produces them."))
    encoder_scope: Scope = field(default=Scope.layer, metadata=h("One encoder per layer, or one shared."))
    encoder_in: int = field(default=64, metadata=h("Encoder: size of the learned input per head."))
    encoder_hidden: int = field(default=256, metadata=h("Encoder: hidden width."))
    tune_shift: bool = field(default=False, metadata=h("Also train the two token-shift states per layer."))
    shift_lr_scale: float = field(default=1.0, metadata=h("With --tune-shift: the token-shift states' learning "
                                                           "rate as a fraction of the state's (they live at "
                                                           "the scale of normalised activations, ~1)."))
    init: str = field(default="zeros", metadata=h("Initial state: zeros, prompt (see --init-prompt), or a "
                                                   "state file to continue from."))
    init_prompt: str | None = field(default=None, metadata=h("Text whose final state initialises training "
                                                              "(with --init prompt)."))
    layers: str | None = field(default=None, metadata=h(
        "Train only these layers' states (e.g. 0-3, 0,2,5; default: all); the others keep their initial "
        "state, and the saved state file still holds every layer.", metavar="LIST"))

    def __post_init__(self) -> None:
        self.param = _enum(Param, "param", self.param)
        self.encoder_scope = _enum(Scope, "encoder_scope", self.encoder_scope)
        for name in ("encoder_in", "encoder_hidden"):
            if getattr(self, name) < 1:
                raise OptionError(f"{flag(name)}: must be at least 1, got {getattr(self, name)}")
        if self.shift_lr_scale < 0:
            raise OptionError(f"--shift-lr-scale: must not be negative, got {self.shift_lr_scale}")
        if self.init == "prompt" and not self.init_prompt:
            raise OptionError("--init prompt needs --init-prompt TEXT")
        if self.layers is not None:
            parse_layers(self.layers)

    def layer_list(self, n_layer: int) -> list[int] | None:
        """The trained layers in order (None: all of them), checked against a model of ``n_layer`` layers."""
        if self.layers is None:
            return None
        layers = parse_layers(self.layers)
        if layers[-1] >= n_layer:
            raise OptionError(f"--layers: layer {layers[-1]} is out of range: the model has {n_layer} layers "
                              f"(0..{n_layer - 1})")
        return layers

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON values (enums by value), for metadata and ``config.toml``."""
        return {f.name: getattr(getattr(self, f.name), "value", getattr(self, f.name))
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StateTuningConfig:
        """The config a :meth:`to_dict` (e.g. a state file's ``trained["tuning"]``) describes; unknown keys
        are refused by name, missing ones take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise OptionError(f"unknown state-tuning setting(s) {', '.join(map(repr, unknown))} "
                              f"(known: {', '.join(sorted(names))})")
        return cls(**values)
