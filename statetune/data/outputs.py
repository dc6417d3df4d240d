"""The output files of ``prepare``, committed together: every destination is replaced, or none is; two
``prepare`` runs writing the same ``--out`` commit one after the other, so the set is always one run's."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import IO

from statetune.data.pipeline import ChunkResult
from statetune.fileio import AtomicGroup
from statetune.locking import lock_beside, waiting


class Outputs:
    """Temporary output files beside their destinations; ``commit`` replaces every destination or none."""

    def __init__(self, train: Path, val: Path | None, meta: Path) -> None:
        self._group = AtomicGroup([p for p in (train, val, meta) if p is not None])
        self._files: list[IO[str]] = []
        try:
            for tmp in self._group.temps:
                self._files.append(open(tmp, "w", encoding="utf-8", newline="\n", buffering=1 << 20))  # noqa: SIM115
        except BaseException:
            self.__exit__()
            raise
        self.train, self.meta = self._files[0], self._files[-1]
        self.val = self._files[1] if val is not None else None

    def write(self, result: ChunkResult) -> None:
        with self._group.naming_destinations():
            self.train.write("".join(result.train))
            if self.val is not None:
                self.val.write("".join(result.val))

    def commit(self) -> None:
        with self._group.naming_destinations():  # a full disk may show only at the last flush, in close
            for fh in self._files:
                fh.close()
        with waiting(lock_beside(self._group.finals[0])):  # two prepares of one OUT: one's set, never a mix
            self._group.commit()

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *exc: object) -> None:
        for fh in self._files:
            with contextlib.suppress(OSError):
                fh.close()
        self._group.discard()
