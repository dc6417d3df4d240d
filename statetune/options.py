"""Options as dataclasses: argparse flags from fields, a TOML file under them, the command line on top.

Every command's options are a dataclass whose fields carry ``metadata={"help": ...}``; this module turns
such a dataclass into argparse flags (``--field-name``), merges an optional TOML config, and rebuilds the
dataclass, whose ``__post_init__`` validates values and names the flag on error.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from statetune.errors import OptionError
from statetune.option_groups import accepts_flat, flatten, groups, leaves

__all__ = ["accepts_flat", "add_arguments", "build", "flag", "flatten", "from_namespace", "load_toml", "to_toml"]

T = TypeVar("T")


def flag(name: str) -> str:
    """The command-line flag of a dataclass field."""
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of the dataclass ``cls`` (the fields of its option groups too, flat, under a
    heading of their own in ``--help``); positional fields have ``metadata["positional"]``, and top-level
    fields with the same ``metadata["exclusive"]`` tag are mutually exclusive flags (argparse refuses both)."""
    headings: dict[str | None, Any] = {None: parser}
    for name, group in groups(cls).items():
        headings[name] = parser.add_argument_group(f"{name} options", (group.__doc__ or "").strip() or None)
    options = [(f, tp, group) for f, tp, group in leaves(cls) if f.metadata.get("cli") is not False]
    done: set[str] = set()
    for f, tp, group in options:
        tag = f.metadata.get("exclusive") if group is None else None
        if not tag:
            _add_flag(headings[group], f, tp)
        elif tag not in done:  # the whole set at the first one's place (usage lists them side by side)
            done.add(tag)
            mutex = parser.add_mutually_exclusive_group()
            for g, g_tp, g_group in options:
                if g_group is None and g.metadata.get("exclusive") == tag:
                    _add_flag(mutex, g, g_tp)


def _add_flag(parser: Any, f: dataclasses.Field, tp: Any) -> None:
    tp, _ = _unwrap_optional(tp)
    help_text = f.metadata.get("help", "")
    kwargs: dict[str, Any] = {"help": help_text, "dest": f.name, "default": argparse.SUPPRESS}
    origin = typing.get_origin(tp)
    if f.metadata.get("positional"):
        parser.add_argument(f.name, nargs="+" if origin is list else None, help=help_text,
                            default=argparse.SUPPRESS, metavar=f.name.upper())
        return
    if tp is bool:
        parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        return
    if origin is list:
        (inner,) = typing.get_args(tp)
        kwargs.update(nargs="+", type=inner)
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        kwargs.update(choices=[m.value for m in tp])
    elif tp in (int, float, str) and "parse" not in f.metadata:
        kwargs["type"] = tp
    elif tp is Path:
        kwargs["type"] = str
    if "metavar" in f.metadata:
        kwargs["metavar"] = f.metadata["metavar"]
    parser.add_argument(flag(f.name), **kwargs)


def _coerce(name: str, tp: Any, value: Any, parse: Any = None) -> Any:
    if parse is not None:  # the field parses its own values (e.g. --lr: a number or "auto")
        try:
            return parse(value)
        except (ValueError, TypeError) as e:
            raise OptionError(f"{flag(name)}: invalid value {value!r}: {e}") from None
    tp, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None
    try:
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return tp(value)
        if tp is Path:
            return Path(value)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if tp in (int, float, str, bool):
            _check_type(value, tp)
        if typing.get_origin(tp) is list:
            if not isinstance(value, list):
                raise TypeError(f"expected a list, got {type(value).__name__}")
            (inner,) = typing.get_args(tp)
            for k, item in enumerate(value):
                if inner in (int, float, str):
                    _check_type(item, inner, f"item {k}: ")
        if typing.get_origin(tp) is list and typing.get_args(tp) == (float,):
            value = [_finite(float(v) if isinstance(v, int) and not isinstance(v, bool) else v) for v in value]
        elif tp is float:
            value = _finite(value)
        if tp in (str, Path) and str(value) == "" and flag(name) in EMPTY_IS_WRONG:
            raise ValueError("a file name cannot be empty")
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                _utf8(text)
    except (ValueError, TypeError) as e:
        choices = ""
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            choices = f" (choose from {', '.join(m.value for m in tp)})"
        raise OptionError(f"{flag(name)}: invalid value {value!r}{choices}: {e}") from None
    return value


def _check_type(value: Any, tp: type, where: str = "") -> None:
    """A TypeError unless ``value`` is a ``tp``; a bool is no number (``true`` in TOML is not 1), an int is a
    float."""
    ok = isinstance(value, tp) and not (isinstance(value, bool) and tp is not bool)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise TypeError(f"{where}expected {tp.__name__}, got {type(value).__name__}")


#: Path options for which an empty string is a mistake (an output ``''`` would mean the current directory).
EMPTY_IS_WRONG = frozenset({"--out", "--output", "--input", "--model", "--state", "--init", "--train-data",
                            "--val-data", "--resume", "--data"})


def _finite(value: Any) -> Any:
    """``value`` if it is a finite float: NaN or infinity is never a meaningful option value."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _utf8(text: str) -> None:
    """Refuse text that cannot be UTF-8 (an argument whose bytes were not UTF-8 arrives as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text.encode("utf-8", "surrogateescape")[e.start:e.start + 1] if e.start < len(text) else b""
        raise ValueError(f"not valid UTF-8 (byte {raw!r} at character {e.start})") from None


def load_toml(path: str | Path, cls: type, obsolete: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a TOML config into flat option values: keys are field names (``_`` or ``-``), a group's fields
    either at the top or in a table named for the group (``[optim] lr = 0.5``); unknown keys are errors,
    except top-level ``obsolete`` ones (written by older versions), which are dropped."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise OptionError(f"--config: file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise OptionError(f"--config: {p} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise OptionError(f"--config: {p} is not valid TOML: not UTF-8 at byte {e.start}") from None
    except RecursionError:
        raise OptionError(f"--config: {p} is nested too deeply to read") from None
    by_group: dict[str | None, set[str]] = {}
    types: dict[str, tuple[Any, Any]] = {}
    for f, tp, group in leaves(cls):
        by_group.setdefault(group, set()).add(f.name)
        types[f.name] = (tp, f.metadata.get("parse"))
    names = set().union(*by_group.values())
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.replace("-", "_")
        if key in by_group and key is not None and isinstance(v, dict):
            for ik, iv in v.items():
                inner = ik.replace("-", "_")
                if inner not in by_group[key]:
                    raise OptionError(f"--config: {p}: unknown option {k}.{ik!r} in table [{k}] (known: "
                                      f"{', '.join(sorted(by_group[key]))})")
                _put(out, inner, iv, p, types[inner], f"{k}.{ik}")
        elif key in obsolete:
            continue
        elif key not in names:
            raise OptionError(f"--config: {p}: unknown option {k!r} (known: {', '.join(sorted(names))})")
        else:
            _put(out, key, v, p, types[key], k)
    return out


def _put(out: dict[str, Any], key: str, value: Any, path: Path, typed: tuple[Any, Any], spelled: str) -> None:
    """Set one option read from ``path``, type-checked as the flag would be (a TOML ``true`` is no number);
    the error names the file and the key as the file spells it."""
    if key in out:
        raise OptionError(f"--config: {path}: {key!r} is set twice (at the top and in its table)")
    try:
        _coerce(key, typed[0], value, typed[1])
    except OptionError as e:
        raise OptionError(f"{e} (key {spelled!r} of {path})") from None
    out[key] = value


def build(cls: type[T], values: dict[str, Any]) -> T:
    """Construct the dataclass from flat plain values (a group's fields by their own names), coercing
    types and naming the flag on error."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {name: {} for name in groups(cls)}
    missing = []
    for f, tp, group in leaves(cls):
        if f.name in values:
            (top if group is None else nested[group])[f.name] = _coerce(f.name, tp, values[f.name],
                                                                         f.metadata.get("parse"))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append(flag(f.name))
    if missing:
        raise OptionError(f"missing required option(s): {', '.join(missing)}")
    for name, group in groups(cls).items():
        top[name] = group(**nested[name])
    return cls(**top)


def from_namespace(cls: type[T], ns: argparse.Namespace, config: str | Path | None = None) -> T:
    """Merge a TOML config (if any) under the parsed command-line values and build the options."""
    values: dict[str, Any] = load_toml(config, cls) if config else {}
    values.update({k: v for k, v in vars(ns).items() if k not in ("command", "config")})
    return build(cls, values)


def to_toml(opts: Any) -> str:
    """Render options as TOML (None values omitted), for ``RUN_DIR/config.toml``.

    Flat, each group's fields after a comment naming the group: any statetune reads it (flat keys have
    always been accepted) and a line appended at the end stays a top-level key, not part of a table.
    """
    lines = []
    for f in dataclasses.fields(opts):
        v = getattr(opts, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            lines.append(f"# {f.name}")
            lines.extend(f"{g.name} = {_toml_value(getattr(v, g.name))}" for g in dataclasses.fields(v)
                         if getattr(v, g.name) is not None)
        elif v is not None:
            lines.append(f"{f.name} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, enum.Enum):
        v = v.value
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def h(text: str, **kw: Any) -> dict[str, Any]:
    """A field's ``metadata``: its help text, plus ``positional=True``, ``metavar=...``, ``cli=False`` or
    ``parse=fn`` (the field's own parser of flag and TOML values; ValueError/TypeError name the flag)."""
    return {"help": text, **kw}
