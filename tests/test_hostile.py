"""A careless or hostile user, round three: what broke, each with the rule that now holds.

- a lock file put there by someone else (a symbolic link, a directory, a FIFO) is refused, its target intact;
- an output that is a FIFO or a device (``/dev/null``, ``/dev/stdout``) is refused, not replaced by a file;
- a directory written inside a set-group-ID directory keeps the bit, as ``mkdir`` does;
- a record longer than the reader's limit is one error naming its line, read past without keeping it;
- ``prepare``'s workers stop cleanly on a bad record of any kind (the errors travel between processes);
- one header limit for state files, in the index and the reader alike;
- the server trusts only a ledger it could have written, names are portable, and a request's body has as
  long to arrive as its headers.
"""

from __future__ import annotations

import os
import pickle
import socket
import stat
import sys
import time

import pytest
import torch
from serve_helpers import KEY, Running

import statetune
from statetune.errors import OptionError, RecordError, StateFileError, StatetuneError
from statetune.fileio import atomic_dir, atomic_write
from statetune.locking import FileLock
from statetune.outpaths import check_output

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file kinds and modes")


# -- locks and outputs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["symlink", "dangling", "directory", "fifo"])
def test_a_lock_file_put_there_by_someone_else_is_refused(tmp_path, kind):
    precious, lock = tmp_path / "precious.txt", tmp_path / ".out.lock"
    precious.write_text("keep me")
    {"symlink": lambda: lock.symlink_to(precious), "dangling": lambda: lock.symlink_to(tmp_path / "nothing"),
     "directory": lock.mkdir, "fifo": lambda: os.mkfifo(lock)}[kind]()
    with pytest.raises(StatetuneError, match="lock file is .*remove it and run again"):
        FileLock(lock, wait=True).acquire()
    assert precious.read_text() == "keep me" and not (tmp_path / "nothing").exists()


def test_an_output_that_is_a_fifo_or_a_device_is_refused(tmp_path):
    fifo = tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    link = tmp_path / "stdout.jsonl"
    link.symlink_to(fifo)
    for out in (fifo, link, "/dev/null"):
        with pytest.raises(OptionError, match=r"--out: .* is a (FIFO|character device).*give a file name"):
            check_output(out, "--out")
    with pytest.raises(StatetuneError, match="is a FIFO"):  # the writers' own check, for outputs with no flag
        atomic_write(fifo, lambda tmp: open(tmp, "w").close())
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and not list(tmp_path.glob(".*.tmp"))


def test_a_directory_written_in_a_setgid_directory_keeps_the_bit(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    with atomic_dir(shared / "hf") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("x")
    for d in (shared / "hf", shared / "hf" / "sub"):
        assert os.stat(d).st_mode & stat.S_ISGID, d


# -- records -------------------------------------------------------------------------------------------------------
def test_a_record_error_survives_the_trip_to_a_worker():
    err = pickle.loads(pickle.dumps(RecordError("record", "has 1 columns, the header has 2")))
    assert (err.field, err.message) == ("record", "has 1 columns, the header has 2")


def test_a_line_over_the_record_limit_is_an_error_read_past(tmp_path, monkeypatch):
    from statetune.data import readers

    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 1 << 20)
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "' + b"x" * (3 << 20) + b'"}\n{"text": "b"}\n')
    items = list(readers.read_jsonl(path))
    assert [line for line, _, _ in items] == [1, 2, 3]
    assert isinstance(items[1][1], RecordError) and "a line of 3 MiB; a record is at most 1 MiB" in \
        items[1][1].message
    assert items[2][1] == b'{"text": "b"}\n'
    csv_path = tmp_path / "in.csv"
    csv_path.write_text('text\nok\n"' + "y" * (2 << 20) + '"\n')
    with pytest.raises(StatetuneError, match=r"in.csv:3: a field longer than 1 MiB"):
        list(readers.read_csv(csv_path))


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["first", "last"])
def test_workers_stop_on_a_bad_csv_row_first_or_last(tmp_path, capsys, bad):
    from statetune.cli import main

    rows = [f"record {i},{i}" for i in range(5000)]
    rows[0 if bad == "first" else -1] = "one column only"
    data = tmp_path / "in.csv"
    data.write_text("text,n\n" + "\n".join(rows) + "\n")
    line = 2 if bad == "first" else 5001
    assert main(["prepare", str(data), "--out", str(tmp_path / "out"), "--workers", "2", "--tokenizer",
                 "bytes"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"statetune prepare: error: {data}:{line}: has 1 columns, the header has 2"]


# -- state headers: one rule -----------------------------------------------------------------------------------------
def test_the_header_limit_and_deep_headers_are_refused_by_index_and_reader_alike(tiny_ckpt, tmp_path, monkeypatch):
    from statetune.serve.index import index_state
    from statetune.tuning import keys
    from statetune.tuning.statefile import load_state

    model = statetune.load_model(tiny_ckpt("rwkv7"))
    cfg = model.config
    tensors = {f"blocks.{i}.att.time_state": torch.zeros(cfg.n_head, cfg.head_size, cfg.head_size)
               for i in range(cfg.n_layer)}
    from safetensors.torch import save_file

    big = tmp_path / "big.safetensors"
    save_file(tensors, big, {"note": "x" * 5000})
    monkeypatch.setattr(keys, "MAX_HEADER", 4096)
    for read in (lambda p: load_state(p, model), lambda p: index_state(p, model, model.fingerprint())):
        with pytest.raises(StateFileError, match="a header of .* bytes; a state's is a few KB"):
            read(big)
    deep = tmp_path / "deep.safetensors"
    header = b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    deep.write_bytes(len(header).to_bytes(8, "little") + header)
    monkeypatch.setattr(keys, "MAX_HEADER", 16 << 20)
    with pytest.raises(StateFileError, match="nested too deeply"):
        index_state(deep, model, model.fingerprint())


# -- the server ----------------------------------------------------------------------------------------------------
def test_a_ledger_someone_else_could_have_written_counts_as_empty(tmp_path):
    from statetune.serve.ledger import LEDGER, Ledger

    state = tmp_path / "mine.safetensors"
    state.write_bytes(b"state")
    Ledger(tmp_path).record("mine", state)
    ledger = tmp_path / LEDGER
    assert stat.S_IMODE(os.stat(ledger).st_mode) == 0o600 and Ledger(tmp_path).owns("mine", state)
    os.chmod(ledger, 0o664)  # group-writable: anyone in the group could have forged it
    assert Ledger(tmp_path).records == {}
    os.chmod(ledger, 0o600)
    os.rename(ledger, tmp_path / "elsewhere.json")
    ledger.symlink_to(tmp_path / "elsewhere.json")
    assert Ledger(tmp_path).records == {}


@pytest.mark.parametrize("name", ["CON", "nul.x", "com1", "trail.", "LPT9.safetensors"])
def test_names_that_cannot_be_files_everywhere_are_refused(name):
    from statetune.serve.errors import ApiError
    from statetune.serve.states_api import check_name, check_new_name

    with pytest.raises(ApiError, match="not a device name of Windows"):
        check_name(name)
    assert check_name("con2") == "con2"
    with pytest.raises(ApiError, match="differs only in case from the state 'e2e'"):
        check_new_name("E2E", ["base", "e2e"])


@pytest.mark.slow
def test_headers_over_the_limit_in_one_piece_and_a_trickled_body_are_refused(tiny_ckpt):
    from statetune.commands.serve import ServeOptions

    server = Running(ServeOptions(model=str(tiny_ckpt("rwkv7")), tokenizer="bytes", api_key=KEY, header_timeout=1))
    host, port = server.url.removeprefix("http://").split(":")
    try:
        big = socket.create_connection((host, int(port)), timeout=10)
        big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        assert big.recv(100).startswith(b"HTTP/1.1 400")
        slow = socket.create_connection((host, int(port)), timeout=10)
        slow.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode())
        closed, deadline = False, time.monotonic() + 8
        while not closed and time.monotonic() < deadline:  # a byte every 0.2 s: never idle, always late
            time.sleep(0.2)
            try:
                slow.send(b" ")
            except OSError:
                closed = True
        assert closed
        assert server.get("/health").status_code == 200
    finally:
        server.stop()
