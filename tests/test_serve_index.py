"""The header-only index of state files: what it refuses, and that it reads no tensor data."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import save_file
from serve_helpers import random_state

import statetune
from statetune.errors import StateFileError
from statetune.serve.index import index_state, read_header
from statetune.serve.registry import Registry
from statetune.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return statetune.load_model(tiny_ckpt("rwkv7"))


def tensors(model, layers: int | None = None, shift: bool = True, dtype=torch.float32) -> dict[str, torch.Tensor]:
    cfg = model.config
    C = cfg.n_head * cfg.head_size
    out = {}
    for i in range(cfg.n_layer if layers is None else layers):
        out[f"blocks.{i}.att.time_state"] = torch.zeros(cfg.n_head, cfg.head_size, cfg.head_size, dtype=dtype)
        if shift:
            out[f"blocks.{i}.att.time_shift"] = torch.zeros(C, dtype=dtype)
            out[f"blocks.{i}.ffn.time_shift"] = torch.zeros(C, dtype=dtype)
    return out


def test_a_good_file_is_indexed_with_its_metadata_and_size(model, tmp_path):
    path = tmp_path / "good.safetensors"
    statetune.save_state(path, random_state(model, 1), model, {"prompt_template": "Q: {q}"}, with_shift=True)
    header = index_state(path, model, model.fingerprint())
    assert header.has_shift and header.metadata["prompt_template"] == "Q: {q}"
    assert header.nbytes == sum(t.numel() * 4 for t in tensors(model).values())
    save_file(tensors(model, shift=False), str(tmp_path / "plain.safetensors"))
    assert not index_state(tmp_path / "plain.safetensors", model, model.fingerprint()).has_shift


@pytest.mark.parametrize("case,needle", [
    ("missing_layer", "missing 'blocks.1.att.time_state' (the model has 2 layers)"),
    ("extra_layer", "'blocks.2.att.time_state' is there, but the model has 2 layers"),
    ("half_shift", "missing 'blocks.0.ffn.time_shift' (token-shift vectors must be there for every layer or none)"),
    ("int_dtype", "blocks.0.att.time_state: expected a floating dtype, found I32"),
    ("wrong_shape", "blocks.0.att.time_state: expected shape [2, 8, 8], found [2, 8, 4]"),
    ("fingerprint", "trained on a different base model"),
    ("unknown_key", "unexpected key(s) blocks.0.att.key.weight"),
    ("shift_beyond", "'blocks.2.ffn.time_shift' is there, but the model has 2 layers"),
    ("truncated", "truncated safetensors header"),
    ("huge_header", "header of"),
    ("not_json", "its header is not JSON"),
    ("empty", "shorter than its 8-byte header length"),
])
def test_bad_headers_are_refused_naming_what_differs(model, tmp_path, case, needle):
    path = tmp_path / f"{case}.safetensors"
    t = tensors(model)
    if case == "missing_layer":
        t = tensors(model, layers=1)
    elif case == "extra_layer":
        t = tensors(model, layers=3)
    elif case == "half_shift":
        del t["blocks.0.ffn.time_shift"]
    elif case == "int_dtype":
        t = tensors(model, dtype=torch.int32)
    elif case == "wrong_shape":
        t["blocks.0.att.time_state"] = torch.zeros(2, 8, 4)
    elif case == "unknown_key":
        t["blocks.0.att.key.weight"] = torch.zeros(16, 16)
    elif case == "shift_beyond":
        t["blocks.2.ffn.time_shift"] = torch.zeros(16)
    if case in ("truncated", "huge_header", "not_json", "empty"):
        path.write_bytes({"truncated": struct.pack("<Q", 100) + b"{}", "huge_header": struct.pack("<Q", 1 << 40),
                          "not_json": struct.pack("<Q", 4) + b"nope", "empty": b""}[case])
    else:
        meta = {"model_fingerprint": "0123456789abcdef"} if case == "fingerprint" else None
        save_file(t, str(path), metadata=meta)
    with pytest.raises(StateFileError) as e:
        index_state(path, model, model.fingerprint())
    assert needle in str(e.value) and str(path) in str(e.value)
    with pytest.raises(StateFileError):  # the index and the state reader follow the same rules
        statetune.load_state(path, model)


def test_the_registry_indexes_without_reading_tensors_and_loads_on_first_use(model, tmp_path):
    for k in range(6):
        statetune.save_state(tmp_path / f"s{k}.safetensors", random_state(model, k), model, with_shift=True)
    reg = Registry(model, get_tokenizer("bytes"), "base", tmp_path, max_loaded=2)
    report = reg.reload()
    assert report.added == [f"s{k}" for k in range(6)] and not report.skipped
    assert reg.loads == 0  # six files, room for two: indexed only
    for k in (0, 1, 2, 0):
        state = reg.state(reg.get(f"s{k}"))
        torch.testing.assert_close(state.wkv, random_state(model, k).wkv)
    assert reg.loads == 4 and reg.evictions == 2 and reg.loaded == 2 + 1
    header, _ = read_header(tmp_path / "s0.safetensors")
    assert "blocks.0.att.time_state" in header


@pytest.mark.parametrize("fmt,name", [("pth", "peft.pth"), ("list", "original.pth"), ("ai00", "ai00.safetensors")])
def test_every_format_state_convert_writes_is_served(model, tmp_path, fmt, name):
    """`state convert` outputs load in serve as they do everywhere else (the one state reader)."""
    from statetune.tuning.formats import write_as
    from statetune.tuning.statefile import StateFile

    state = random_state(model, 3)
    write_as(StateFile(state, {}, has_shift=False), tmp_path / name, fmt, model)
    reg = Registry(model, get_tokenizer("bytes"), "base", tmp_path, max_loaded=2)
    report = reg.reload()
    assert report.added == [name.rsplit(".", 1)[0]] and not report.skipped, report.skipped
    served = reg.state(reg.get(name.rsplit(".", 1)[0]))
    tol = 1e-3 if fmt == "ai00" else 0  # ai00 keeps float16
    torch.testing.assert_close(served.wkv, state.wkv, atol=tol, rtol=tol)
