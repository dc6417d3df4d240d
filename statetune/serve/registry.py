"""The states a server offers, by name: every ``*.safetensors`` in ``--states`` DIR, and the base model.

States are read and checked against the model (shapes, fingerprint, tokenizer) once, when the registry is
(re)loaded, never per request. A file that does not fit is reported on stderr and skipped; the others are
still served. Requests name a state; the name is only ever a key of this table, never joined to a path, so
no request can make the server read a file.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from statetune.errors import StatetuneError
from statetune.infer.generate import Prompts, stops
from statetune.model.state import RWKVState
from statetune.tokenizer import Tokenizer

log = logging.getLogger("statetune.serve")
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Entry:
    """One servable state: its batch-1 start state, metadata, and what ``generate`` derives from them.

    ``prompts`` wraps a completion prompt in the state's training template; ``stop_strings`` and
    ``stop_ids`` are the default stops of a completion (the state's ``stop`` metadata, end of text).
    """

    name: str
    state: RWKVState
    metadata: dict[str, Any]
    path: Path | None
    prompts: Prompts
    stop_strings: list[str]
    stop_ids: list[int]
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def template(self) -> str | None:
        return self.prompts.template


@dataclass
class ReloadReport:
    """What a (re)scan found: names added, removed and re-read, and the files skipped with the reason."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reloaded: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "removed": self.removed, "reloaded": self.reloaded, "skipped": self.skipped}


def tokenizer_name(meta: dict[str, Any]) -> str | None:
    """The tokenizer a state's metadata names (a string, or ``{"name": ...}``), if any."""
    named = meta.get("tokenizer")
    if isinstance(named, dict):
        named = named.get("name")
    return named if isinstance(named, str) and named else None


def make_entry(name: str, state: RWKVState, meta: dict[str, Any], path: Path | None, tokenizer: Tokenizer) -> Entry:
    """An :class:`Entry`, with the prompt template and default stops taken the way ``generate`` takes them."""
    prompts = Prompts(SimpleNamespace(raw=False, prompt_field=None, prompt_template=None), meta)
    strings, ids = stops(SimpleNamespace(stop=None, stop_token=None), meta, tokenizer)
    return Entry(name, state, meta, path, prompts, strings, ids)


class Registry:
    """Name → :class:`Entry` for the base model and the states of a directory; safe to read from any thread.

    ``reload`` builds a new table and swaps it in whole, so a request sees either the old or the new table;
    a request already decoding keeps the state it started with.
    """

    def __init__(self, model, tokenizer: Tokenizer, base_name: str, states_dir: str | Path | None) -> None:
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.states_dir = Path(states_dir) if states_dir is not None else None
        base_state = model.default_state if model.default_state is not None else model.zero_state(1)
        self.base = make_entry(base_name, base_state, {}, None, tokenizer)
        self._entries: dict[str, Entry] = {base_name: self.base}
        self._lock = threading.Lock()

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def names(self) -> list[str]:
        """The servable names: the base model first, then the states in sorted order."""
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def reload(self) -> ReloadReport:
        """Rescan the states directory (every file is read again); reports problems on stderr too."""
        with self._lock:
            old = self._entries
            new: dict[str, Entry] = {self.base_name: self.base}
            report = ReloadReport()
            for path in self._files(report):
                name = path.name[:-len(SUFFIX)]
                if name == self.base_name:
                    self._skip(report, path, f"its name {name!r} is the base model's; rename the file or give "
                                             "the model another --model-name")
                    continue
                try:
                    new[name] = self._load(name, path)
                except StatetuneError as e:
                    self._skip(report, path, str(e).removeprefix(f"{path}: "))
                except Exception as e:  # a corrupt file must never stop the server or hide the other states
                    self._skip(report, path, f"unreadable state file: {type(e).__name__}: {e}")
            report.added = [n for n in new if n not in old]
            report.removed = [n for n in old if n not in new]
            report.reloaded = [n for n in new if n in old and n != self.base_name]
            self._entries = new
            log.info("serving %d state(s) besides the base model %r: %s", len(new) - 1, self.base_name,
                     ", ".join(n for n in new if n != self.base_name) or "none")
            return report

    def _files(self, report: ReloadReport) -> list[Path]:
        if self.states_dir is None:
            return []
        if not self.states_dir.is_dir():
            self._skip(report, self.states_dir, "not a directory")
            return []
        return sorted(p for p in self.states_dir.iterdir()
                      if p.name.endswith(SUFFIX) and not p.name.startswith(".") and p.is_file())

    def _load(self, name: str, path: Path) -> Entry:
        from statetune.tuning.statefile import load_state

        sf = load_state(path, self.model)
        named = tokenizer_name(sf.metadata)
        if named is not None and named != self.tokenizer.name:
            raise StatetuneError(f"the state was trained with the {named!r} tokenizer, but this server "
                                 f"uses {self.tokenizer.name!r}")
        return make_entry(name, sf.state, sf.metadata, path, self.tokenizer)

    @staticmethod
    def _skip(report: ReloadReport, path: Path, why: str) -> None:
        log.warning("skipping %s: %s", path.name, why)
        report.skipped.append({"file": path.name, "error": why})
