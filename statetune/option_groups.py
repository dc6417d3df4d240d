"""Option groups: dataclasses nested one level in an options dataclass, seen as flat options.

litgpt-style argument groups (``TrainConfig.optim``, ``TrainConfig.tuning``) keep each concern in its own
dataclass, while flags, TOML keys and the Python keywords stay flat (``--lr``, ``lr = 0.5``,
``TrainConfig(lr=0.5)``): the leaves' names are the option names, so they must be unique across groups.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _group_type(tp: Any) -> type | None:
    """The dataclass a field holds when it is an option group (a nested dataclass), else None."""
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def groups(cls: type) -> dict[str, type]:
    """The option groups of ``cls``: field name -> the nested dataclass it holds (one level deep)."""
    hints = typing.get_type_hints(cls)
    return {f.name: g for f in dataclasses.fields(cls) if (g := _group_type(hints[f.name])) is not None}


def leaves(cls: type) -> list[tuple[dataclasses.Field, Any, str | None]]:
    """Every option of ``cls`` as ``(field, type, group)``, the fields of its groups flattened in place
    (``group`` names the group, None at the top). Leaf names are the flags, so they must be unique."""
    out, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        group = _group_type(hints[f.name])
        if group is None:
            out.append((f, hints[f.name], None))
        else:
            inner = typing.get_type_hints(group)
            out.extend((g, inner[g.name], f.name) for g in dataclasses.fields(group))
    names = [f.name for f, _, _ in out]
    if len(names) != len(set(names)):
        raise TypeError(f"{cls.__name__}: two options flatten to the same flag")
    return out


def flatten(opts: Any) -> dict[str, Any]:
    """The options as flat values, a group's fields by their own names (what :func:`statetune.options.build` takes)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(opts):
        v = getattr(opts, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out.update({g.name: getattr(v, g.name) for g in dataclasses.fields(v)})
        else:
            out[f.name] = v
    return out


def accepts_flat(cls: type[T]) -> type[T]:
    """Let a dataclass with option groups also be built from flat keywords: ``TrainConfig(lr=0.5)`` puts
    ``lr`` into the group that owns it (on top of a group object given for that group, if any)."""
    init = cls.__init__
    owners = {f.name: (name, group) for name, group in groups(cls).items() for f in dataclasses.fields(group)}
    group_types = groups(cls)

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        picked: dict[str, dict[str, Any]] = {}
        # a group may hold a leaf of its own name (``objective.objective``): a group object is the group
        for key in [k for k in kwargs if k in owners and not isinstance(kwargs[k], group_types.get(k, ()))]:
            picked.setdefault(owners[key][0], {})[key] = kwargs.pop(key)
        for name, values in picked.items():
            given = kwargs.get(name)
            group = owners[next(iter(values))][1]
            kwargs[name] = dataclasses.replace(given, **values) if given is not None else group(**values)
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]
    return cls
