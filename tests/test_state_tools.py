"""``statetune state``: interop with the rwkv package, lossless conversions, capture, average, errors."""

from __future__ import annotations

import pytest
import torch
from reference_rwkv import reference_model, to_reference_state

import statetune
from statetune.cli import main
from statetune.model.state import RWKVState
from statetune.tuning.formats import read_any


def _state(model, seed=0, shift=True) -> RWKVState:
    g = torch.Generator().manual_seed(seed)
    s = model.zero_state(1)
    att = torch.randn(s.att_shift.shape, generator=g) if shift else s.att_shift
    ffn = torch.randn(s.ffn_shift.shape, generator=g) if shift else s.ffn_shift
    return RWKVState(att, torch.randn(s.wkv.shape, generator=g) * 0.5, ffn)


@pytest.mark.slow
def test_rwkv6_merged_checkpoint_matches_in_rwkv_package(official_ckpt, tmp_path):
    path = official_ckpt("rwkv6")
    model = statetune.load_model(path)
    state = _state(model, shift=False)
    statetune.save_state(tmp_path / "s.safetensors", state, model)
    assert main(["state", "merge", "--model", str(path), "--state", str(tmp_path / "s.safetensors"),
                 "--out", str(tmp_path / "merged.pth")]) == 0
    ref = reference_model(tmp_path / "merged.pth", "rwkv6")
    tokens = [11, 2000, 65000, 7]
    ref_logits, _ = ref.forward(tokens, None)  # None: the package starts from the merged time_state
    ours, _ = model(torch.tensor([tokens]), state)
    torch.testing.assert_close(ours[0, -1], ref_logits.float(), atol=1e-4, rtol=0)
    # and statetune reads the merged file's state back as the model's default state
    merged = statetune.load_model(tmp_path / "merged.pth")
    torch.testing.assert_close(merged.default_state.wkv, state.wkv)


def test_rwkv7_state_file_matches_in_rwkv_package(official_ckpt, tmp_path):
    path = official_ckpt("rwkv7")
    model = statetune.load_model(path)
    state = _state(model)
    statetune.save_state(tmp_path / "s.safetensors", state, model, with_shift=True)
    loaded = statetune.load_state(tmp_path / "s.safetensors", model).state
    ref = reference_model(path, "rwkv7")
    tokens = [5, 6, 7000]
    ref_logits, _ = ref.forward(tokens, to_reference_state(loaded, 0, "rwkv7"))
    ours, _ = model(torch.tensor([tokens]), loaded)
    torch.testing.assert_close(ours[0, -1], ref_logits.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt,ext,keeps_shift", [("statetune", ".safetensors", True), ("pth", ".pth", False),
                                                 ("list", ".pth", True), ("ai00", ".st", False)])
def test_conversions_round_trip(tiny_ckpt, tmp_path, fmt, ext, keeps_shift, caplog):
    model = statetune.load_model(tiny_ckpt("rwkv7"))
    state = _state(model)
    statetune.save_state(tmp_path / "s.safetensors", state, model, with_shift=True)
    out = tmp_path / f"out{ext}"
    assert main(["state", "convert", str(tmp_path / "s.safetensors"), str(out), "--to", fmt]) == 0
    back = read_any(out, model)
    want = state.wkv.half().float() if fmt == "ai00" else state.wkv  # ai00 stores float16
    torch.testing.assert_close(back.state.wkv, want, atol=0, rtol=0)
    if keeps_shift:
        torch.testing.assert_close(back.state.att_shift, state.att_shift, atol=0, rtol=0)
    else:
        assert "token-shift states are dropped" in caplog.text


def test_ai00_layout_is_float16_key_by_value(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    model = statetune.load_model(tiny_ckpt("rwkv7"))
    state = _state(model)
    statetune.save_state(tmp_path / "s.safetensors", state, model)
    assert main(["state", "convert", str(tmp_path / "s.safetensors"), str(tmp_path / "a.st"), "--to", "ai00"]) == 0
    raw = load_file(tmp_path / "a.st")
    assert set(raw) == {f"blocks.{i}.att.time_state" for i in range(model.config.n_layer)}
    for i in range(model.config.n_layer):
        t = raw[f"blocks.{i}.att.time_state"]
        assert t.dtype == torch.float16 and t.shape == state.wkv[i, 0].shape
        assert torch.equal(t, state.wkv[i, 0].transpose(-1, -2).half())  # [H, key, value]
    # a file from ai00's own converter carries no metadata: float16 alone marks the layout
    save_file(raw, tmp_path / "plain.st")
    back = statetune.load_state(tmp_path / "plain.st", model).state
    torch.testing.assert_close(back.wkv, state.wkv.half().float(), atol=0, rtol=0)


def test_ai00_refuses_what_float16_cannot_hold(tiny_ckpt, tmp_path, capsys):
    model = statetune.load_model(tiny_ckpt("rwkv7"))
    state = _state(model)
    state.wkv[0, 0, 0, 0, 0] = 1e6
    statetune.save_state(tmp_path / "s.safetensors", state, model)
    assert main(["state", "convert", str(tmp_path / "s.safetensors"), str(tmp_path / "a.st"), "--to", "ai00"]) == 1
    assert "float16" in capsys.readouterr().err and not (tmp_path / "a.st").exists()


def test_capture_equals_reading_the_prompt(tiny_ckpt, tmp_path):
    path = tiny_ckpt("rwkv7")
    assert main(["state", "capture", "--model", str(path), "--prompt", "Hi\\nthere", "--out",
                 str(tmp_path / "c.safetensors")]) == 0
    model = statetune.load_model(path)
    _, expect = model(torch.tensor([[b + 1 for b in b"Hi\nthere"]]))
    sf = statetune.load_state(tmp_path / "c.safetensors", model)
    assert sf.metadata["captured_prompt"] == "Hi\nthere"
    for a, b in zip(sf.state.tensors(), expect.tensors(), strict=True):
        torch.testing.assert_close(a, b)


def test_average_interpolates(tiny_ckpt, tmp_path):
    model = statetune.load_model(tiny_ckpt("rwkv7"))
    a, b = _state(model, 1), _state(model, 2)
    statetune.save_state(tmp_path / "a.safetensors", a, model, with_shift=True)
    statetune.save_state(tmp_path / "b.safetensors", b, model, with_shift=True)
    assert main(["state", "average", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                 "--weights", "0.25", "0.75", "--out", str(tmp_path / "m.safetensors")]) == 0
    m = statetune.load_state(tmp_path / "m.safetensors", model)
    torch.testing.assert_close(m.state.wkv, 0.25 * a.wkv + 0.75 * b.wkv)


def test_info_reports_fit(tiny_ckpt, tmp_path, capsys):
    model = statetune.load_model(tiny_ckpt("rwkv7"))
    statetune.save_state(tmp_path / "s.safetensors", _state(model), model)
    assert main(["state", "info", str(tmp_path / "s.safetensors"), "--model", str(tiny_ckpt("rwkv7"))]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["state", "info", str(tmp_path / "s.safetensors"), "--model", str(tiny_ckpt("rwkv6"))]) == 1


def test_errors(tiny_ckpt, tmp_path, capsys):
    model = statetune.load_model(tiny_ckpt("rwkv7"))
    statetune.save_state(tmp_path / "s.safetensors", _state(model), model)
    (tmp_path / "x.pth").write_bytes(b"garbage")
    assert main(["state", "info", str(tmp_path / "x.pth")]) == 1
    assert "not a readable state file" in capsys.readouterr().err
    torch.save({"something": torch.zeros(2)}, tmp_path / "y.pth")
    assert main(["state", "info", str(tmp_path / "y.pth")]) == 1
    assert "unknown state format" in capsys.readouterr().err
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["state", "info", str(tmp_path / "t.safetensors")]) == 1
    assert "not a readable" in capsys.readouterr().err
    assert main(["state", "merge", "--model", str(tiny_ckpt("rwkv6")), "--state", str(tmp_path / "s.safetensors"),
                 "--out", str(tmp_path / "m.pth")]) == 1
    assert "different base model" in capsys.readouterr().err
    assert main(["state", "convert", str(tmp_path / "s.safetensors"), str(tmp_path / "o.bin"), "--to", "onnx"]) == 2
    assert "--to" in capsys.readouterr().err
