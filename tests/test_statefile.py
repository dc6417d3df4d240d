"""State files: round trip, metadata, interop layout, and mismatch errors."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import statetune
from statetune.errors import StateFileError
from statetune.model.state import RWKVState


def _random(model) -> RWKVState:
    s = model.zero_state(1)
    return RWKVState(torch.randn_like(s.att_shift), torch.randn_like(s.wkv), torch.randn_like(s.ffn_shift))


def test_round_trip_with_metadata(tmp_path, tiny_ckpt):
    model = statetune.load_model(tiny_ckpt("rwkv7"))
    state = _random(model)
    statetune.save_state(tmp_path / "s.safetensors", state, model, {"tokenizer": "bytes", "trained": {"steps": 3}},
                         with_shift=True)
    sf = statetune.load_state(tmp_path / "s.safetensors", model)
    assert sf.has_shift
    for a, b in zip(sf.state.tensors(), state.tensors(), strict=True):
        torch.testing.assert_close(a, b)
    assert sf.metadata["format"] == "statetune-state/1"
    assert sf.metadata["trained"] == {"steps": 3} and sf.metadata["tokenizer"] == "bytes"
    assert sf.metadata["model_fingerprint"] == model.fingerprint()
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert f.get_tensor("blocks.1.att.time_state").shape == (2, 8, 8)
        assert f.get_tensor("blocks.1.att.time_state").dtype == torch.float32


def test_without_shift_only_wkv_is_stored(tmp_path, tiny_ckpt):
    model = statetune.load_model(tiny_ckpt("rwkv7"))
    statetune.save_state(tmp_path / "s.safetensors", _random(model), model)
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    sf = statetune.load_state(tmp_path / "s.safetensors", model)
    assert not sf.has_shift and torch.count_nonzero(sf.state.att_shift) == 0


def test_foreign_state_file_without_metadata_loads(tmp_path, tiny_ckpt):
    model = statetune.load_model(tiny_ckpt("rwkv6"))
    save_file({f"blocks.{i}.att.time_state": torch.randn(2, 8, 8).bfloat16() for i in range(2)},
              tmp_path / "peft.safetensors")
    sf = statetune.load_state(tmp_path / "peft.safetensors", model)
    assert sf.state.wkv.dtype == torch.float32 and sf.metadata == {}


def test_state_from_a_different_model_is_refused(tmp_path, tiny_ckpt):
    a = statetune.load_model(tiny_ckpt("rwkv7"))
    b = statetune.load_model(tiny_ckpt("rwkv6"))  # same shapes, different weights
    statetune.save_state(tmp_path / "s.safetensors", _random(a), a)
    with pytest.raises(StateFileError, match="different base model"):
        statetune.load_state(tmp_path / "s.safetensors", b)


def test_state_of_wrong_shape_is_refused(tmp_path, tiny_ckpt):
    model = statetune.load_model(tiny_ckpt("rwkv7"))
    save_file({"blocks.0.att.time_state": torch.zeros(4, 4, 4)}, tmp_path / "s.safetensors")
    with pytest.raises(StateFileError, match="does not fit the model"):
        statetune.load_state(tmp_path / "s.safetensors", model)


def test_missing_and_unreadable_state_files(tmp_path):
    with pytest.raises(StateFileError, match="no such state file"):
        statetune.load_state(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_text("nope")
    with pytest.raises(StateFileError, match="not a readable"):
        statetune.load_state(tmp_path / "bad.safetensors")
