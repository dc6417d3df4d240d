"""The states a server offers, by name: every ``*.safetensors`` in ``--states`` DIR, the base model, and
states created over the API.

At (re)load the directory is *indexed*: each file's safetensors header is read and checked against the model
(keys, shapes, dtypes, the fingerprint recorded by ``train``, the tokenizer), but not its tensors, so starting
with thousands of files costs what opening them costs. A state's tensors are read on first use into an LRU of
at most ``max_loaded`` states (the least recently used unused one goes first); a request that has its state
keeps it alive whatever the LRU does. When the directory holds no more files than the LRU can keep, every
file is read and checked completely at (re)load instead, so a bad state is skipped before any request sees
it. A file that fails its checks (at index or at first read) is reported on stderr and listed as skipped;
the others are still served. Requests name a state; the name is only ever a key of this table, never joined
to a path, so no request can make the server read a file.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from statetune.errors import StateFileError, StatetuneError
from statetune.model.state import RWKVState
from statetune.prompts import Prompts, stops
from statetune.serve.index import index_pth, index_state
from statetune.tokenizer import Tokenizer, named_tokenizer

log = logging.getLogger("statetune.serve")
SUFFIX = ".safetensors"
# the .pth formats `state convert` writes (RWKV-PEFT/RWKV-Runner dict, the original list): read whole to index
PTH_SUFFIXES = (".pth", ".pt")
_serial = itertools.count(1)


@dataclass(frozen=True)
class Entry:
    """One servable state: its metadata and what ``generate`` derives from it; the tensors live in the registry.

    ``key`` identifies this version of the state (a changed file gets a new key, so cached prefixes of the
    old one are never used); ``prompts`` wraps a completion prompt in the state's training template;
    ``stop_strings`` and ``stop_ids`` are a completion's default stops (the state's ``stop`` metadata, end of
    text); ``origin`` is ``base``, ``file`` or ``api`` (created over the API and kept in memory).
    """

    name: str
    key: str
    metadata: dict[str, Any]
    path: Path | None
    prompts: Prompts
    stop_strings: list[str]
    stop_ids: list[int]
    origin: str = "file"
    has_shift: bool = False
    nbytes: int = 0
    signature: tuple[int, int, int] | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def template(self) -> str | None:
        return self.prompts.template

    @property
    def deletable(self) -> bool:
        """Created over the API and kept in memory; a file's metadata never makes it deletable (the files the
        server wrote are in its ledger, :mod:`statetune.serve.ledger`)."""
        return self.origin == "api"


@dataclass
class ReloadReport:
    """What a (re)scan found: names added, removed and changed, and the files skipped with the reason."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reloaded: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "removed": self.removed, "reloaded": self.reloaded, "skipped": self.skipped}


def make_entry(name: str, meta: dict[str, Any], path: Path | None, tokenizer: Tokenizer, **kw: Any) -> Entry:
    """An :class:`Entry`, with the prompt template and default stops taken the way ``generate`` takes them."""
    prompts = Prompts(meta)
    strings, ids = stops(meta, tokenizer)
    return Entry(name, f"{name}#{next(_serial)}", meta, path, prompts, strings, ids, **kw)


def _signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


class Registry:
    """Name → :class:`Entry`, and the LRU of loaded states; safe to use from any thread.

    ``on_drop(key)`` is called for every state version that goes away (so the prefix cache can forget it).
    Every state but the base model's is served times ``state_scale`` (``serve --state-scale``).
    """

    def __init__(self, model, tokenizer: Tokenizer, base_name: str, states_dir: str | Path | None,
                 max_loaded: int = 64, on_drop=None, state_scale: float = 1.0) -> None:
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.state_scale = state_scale
        self.states_dir = Path(states_dir) if states_dir is not None else None
        self.max_loaded = max(1, max_loaded)
        self.on_drop = on_drop or (lambda key: None)
        self.fingerprint = model.fingerprint()
        base_state = model.default_state if model.default_state is not None else model.zero_state(1)
        self.base = make_entry(base_name, {}, None, tokenizer, origin="base")
        self._entries: dict[str, Entry] = {base_name: self.base}
        self._resident: dict[str, RWKVState] = {self.base.key: base_state}  # never evicted
        self._loaded: OrderedDict[str, RWKVState] = OrderedDict()
        self.skipped: list[dict[str, str]] = []
        self.loads = self.evictions = 0
        self._lock = threading.RLock()

    # -- reading the table -----------------------------------------------------------------------------------
    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def names(self) -> list[str]:
        """The servable names: the base model first, then the states in sorted order."""
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def is_loaded(self, entry: Entry) -> bool:
        return entry.key in self._loaded or entry.key in self._resident

    @property
    def loaded(self) -> int:
        """States whose tensors are in memory: the LRU's and the resident ones (base, created)."""
        return len(self._loaded) + len(self._resident)

    # -- states ------------------------------------------------------------------------------------------------
    def state(self, entry: Entry) -> RWKVState:
        """The start state of ``entry``, read (and checked) on first use; raises :class:`StateFileError`
        when the file cannot be used, and then stops serving it."""
        with self._lock:
            state = self._resident.get(entry.key)
            if state is None:
                state = self._loaded.get(entry.key)
                if state is not None:
                    self._loaded.move_to_end(entry.key)
            if state is not None:
                return state
            try:
                state = self._read(entry)
            except StatetuneError as e:
                self._fail(entry, str(e).removeprefix(f"{entry.path}: "))
                raise
            except Exception as e:  # a corrupt file must never stop the server or hide the other states
                self._fail(entry, f"unreadable state file: {type(e).__name__}: {e}")
                raise StateFileError(f"{entry.path}: unreadable state file: {type(e).__name__}: {e}") from None
            self._keep(entry.key, state)
            return state

    def peek(self, entry: Entry) -> RWKVState | None:
        """The state of ``entry`` if it is in memory and the table is free now (never waits for a load)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            state = self._resident.get(entry.key)
            if state is None and (state := self._loaded.get(entry.key)) is not None:
                self._loaded.move_to_end(entry.key)
            return state
        finally:
            self._lock.release()

    def _read(self, entry: Entry) -> RWKVState:
        from statetune.tuning.statefile import load_state

        state = load_state(entry.path, self.model).state.scaled(self.state_scale)  # checked completely
        self.loads += 1
        return state

    def _keep(self, key: str, state: RWKVState) -> None:
        self._loaded[key] = state
        while len(self._loaded) > self.max_loaded:
            self._loaded.popitem(last=False)  # requests holding it keep their own reference
            self.evictions += 1

    def _fail(self, entry: Entry, why: str) -> None:
        log.warning("skipping %s: %s", entry.path.name if entry.path else entry.name, why)
        if self._entries.get(entry.name) is entry:
            self._entries = {n: e for n, e in self._entries.items() if n != entry.name}
            self.on_drop(entry.key)
        self.skipped = [s for s in self.skipped if s["file"] != entry.path.name] + [
            {"file": entry.path.name, "error": why}]

    # -- (re)loading the directory -----------------------------------------------------------------------------
    def reload(self) -> ReloadReport:
        """Rescan the states directory: index new and changed files, forget removed ones."""
        with self._lock:
            old, report = self._entries, ReloadReport()
            new: dict[str, Entry] = {self.base_name: self.base}
            for path in self._files(report):
                name = path.name[:-len(path.suffix)]
                if name == self.base_name:
                    self._skip(report, path, f"its name {name!r} is the base model's; rename the file or give "
                                             "the model another --model-name")
                    continue
                try:
                    sig = _signature(path)
                    prev = old.get(name)
                    if prev is not None and prev.signature == sig and prev.path == path:
                        new[name] = prev
                        continue
                    new[name] = self._index(name, path, sig)
                except StatetuneError as e:
                    self._skip(report, path, str(e).removeprefix(f"{path}: "))
                except Exception as e:  # a corrupt file must never stop the server or hide the other states
                    self._skip(report, path, f"unreadable state file: {type(e).__name__}: {e}")
            new.update((n, e) for n, e in old.items() if e.origin == "api")
            self._swap(old, new, report)
            files = [e for e in new.values() if e.origin == "file"]
            if len(files) <= self.max_loaded:  # everything fits: read and check it all now
                for e in files:
                    try:
                        self.state(e)
                    except StatetuneError as err:
                        report.skipped.append({"file": e.path.name, "error": str(err).removeprefix(f"{e.path}: ")})
            report.added = [n for n in report.added if n in self._entries]
            self.skipped = list(report.skipped)
            log.info("serving %d state(s) besides the base model %r%s", len(self._entries) - 1, self.base_name,
                     f": {', '.join(list(self._entries)[1:9])}{', ...' if len(self._entries) > 9 else ''}"
                     if len(self._entries) > 1 else "")
            return report

    def _index(self, name: str, path: Path, sig: tuple[int, int, int]) -> Entry:
        header = index_pth(path, self.model) if path.suffix in PTH_SUFFIXES else \
            index_state(path, self.model, self.fingerprint)
        named = named_tokenizer(header.metadata)
        if named is not None and named != self.tokenizer.name:
            raise StateFileError(f"{path}: the state was trained with the {named!r} tokenizer, but this server "
                                 f"uses {self.tokenizer.name!r}")
        return make_entry(name, header.metadata, path, self.tokenizer, has_shift=header.has_shift,
                          nbytes=header.nbytes, signature=sig)

    def _swap(self, old: dict[str, Entry], new: dict[str, Entry], report: ReloadReport) -> None:
        report.added = [n for n in new if n not in old]
        report.removed = [n for n in old if n not in new]
        report.reloaded = [n for n in new if n in old and new[n] is not old[n]]
        live = {e.key for e in new.values()}
        for e in old.values():
            if e.key not in live:
                self._loaded.pop(e.key, None)
                self.on_drop(e.key)
        self._entries = {self.base_name: self.base, **dict(sorted((n, e) for n, e in new.items()
                                                                  if n != self.base_name))}

    def _files(self, report: ReloadReport) -> list[Path]:
        if self.states_dir is None:
            return []
        if not self.states_dir.is_dir():
            self._skip(report, self.states_dir, "not a directory")
            return []
        return sorted(p for p in self.states_dir.iterdir()
                      if p.name.endswith((SUFFIX, *PTH_SUFFIXES)) and not p.name.startswith(".") and p.is_file())

    @staticmethod
    def _skip(report: ReloadReport, path: Path, why: str) -> None:
        log.warning("skipping %s: %s", path.name, why)
        report.skipped.append({"file": path.name, "error": why})

    # -- states created over the API ---------------------------------------------------------------------------
    def add(self, name: str, state: RWKVState, metadata: dict[str, Any], path: Path | None = None) -> Entry:
        """Serve ``state`` as ``name``: in memory, or (``path``: the file it was just written to) as a file;
        like every state but the base model's, it is served times ``state_scale``."""
        state = state.scaled(self.state_scale)
        with self._lock:
            if name in self._entries:
                raise ValueError(f"a state called {name!r} exists already")
            if path is None:
                entry = make_entry(name, metadata, None, self.tokenizer, origin="api", has_shift=True)
                self._resident[entry.key] = state
            else:
                entry = self._index(name, path, _signature(path))
                self._keep(entry.key, state)
            self._entries = {**self._entries, name: entry}
            return entry

    def remove(self, entry: Entry) -> None:
        """Stop serving ``entry`` (and delete its file when it has one)."""
        with self._lock:
            if self._entries.get(entry.name) is not entry:
                return
            self._entries = {n: e for n, e in self._entries.items() if n != entry.name}
            self._resident.pop(entry.key, None)
            self._loaded.pop(entry.key, None)
            self.on_drop(entry.key)
            if entry.path is not None:
                entry.path.unlink(missing_ok=True)
