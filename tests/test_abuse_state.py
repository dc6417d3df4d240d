"""Classes 1 and 2 of the fault suite: every command reads every state format statetune writes, through one
reader that checks a state completely (shapes with the key named, dtype, finite values, shifts all or none)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from abuse import fails, snapshot, unchanged
from safetensors.torch import save_file

import statetune
from statetune.cli import main
from statetune.errors import StateFileError


@pytest.fixture
def states(tiny_ckpt, tmp_path, capsys):
    """A random state of the tiny model in every format ``state convert`` writes."""
    model = statetune.load_model(tiny_ckpt())
    g = torch.Generator().manual_seed(0)
    state = model.zero_state(1)
    state = type(state)(*(torch.randn(t.shape, generator=g) * 0.5 for t in state.tensors()))
    src = tmp_path / "s.safetensors"
    statetune.save_state(src, state, model, with_shift=True)
    statetune.save_state(tmp_path / "wkv-only.safetensors", state, model)
    paths = {"statetune": src}
    for fmt, name in (("pth", "s.pth"), ("list", "s-list.pth"), ("ai00", "s-ai00.st")):
        assert main(["state", "convert", str(src), str(tmp_path / name), "--to", fmt]) == 0
        paths[fmt] = tmp_path / name
    capsys.readouterr()
    return paths


def _generate(capsys, model, state) -> str:
    capsys.readouterr()
    assert main(["generate", "--model", str(model), "--state", str(state), "--prompt", "Hi", "--temperature", "0",
                 "--max-tokens", "12"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_every_format_is_read_wherever_a_state_is_accepted(tiny_ckpt, states, tmp_path, capsys):
    model = tiny_ckpt()
    out = {fmt: _generate(capsys, model, p) for fmt, p in states.items()}
    assert out["list"] == out["statetune"]  # both keep the token-shift states, in fp32
    assert out["pth"] == _generate(capsys, model, tmp_path / "wkv-only.safetensors")  # pth holds WKV only
    loaded = {fmt: statetune.load_state(p) for fmt, p in states.items()}  # what serve's registry calls
    torch.testing.assert_close(loaded["ai00"].state.wkv, loaded["statetune"].state.wkv, atol=2e-3, rtol=2e-3)
    # eval, train --init and chat /load take the same files
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": [73, 106, 33, 1, 2, 0], "mask": [0, 0, 0, 1, 1, 1]}) + "\n")
    assert main(["eval", "--model", str(model), "--data", str(data), "--state", str(states["list"])]) == 0
    assert main(["train", "--model", str(model), "--train-data", str(data), "--out", str(tmp_path / "run"),
                 "--init", str(states["pth"]), "--max-steps", "1", "--no-progress", "--samples", "0"]) == 0
    capsys.readouterr()
    import sys

    old = sys.stdin
    sys.stdin = io.StringIO(f"/load {states['ai00']}\nhello\n")
    try:
        assert main(["chat", "--model", str(model), "--temperature", "0", "--max-tokens", "4"]) == 0
    finally:
        sys.stdin = old
    assert f"loaded {states['ai00']}" in capsys.readouterr().err


def test_the_extension_picks_the_written_format(tiny_ckpt, tmp_path, capsys):
    model = tiny_ckpt()
    base = ["state", "capture", "--model", model, "--prompt", "Hello"]
    assert main([str(a) for a in base] + ["--out", str(tmp_path / "c.pth")]) == 0
    assert (tmp_path / "c.pth").read_bytes()[:2] == b"PK"  # a torch.save file, not safetensors bytes
    assert main([str(a) for a in base] + ["--out", str(tmp_path / "c.safetensors")]) == 0
    wkv = statetune.load_state(tmp_path / "c.safetensors").state.wkv
    torch.testing.assert_close(statetune.load_state(tmp_path / "c.pth").state.wkv, wkv)
    fails(capsys, base + ["--out", tmp_path / "c.bin"], 2, "--out", ".safetensors")
    fails(capsys, ["state", "convert", tmp_path / "c.safetensors", tmp_path / "x.pth", "--to", "statetune"], 2,
          "the statetune format is written as .safetensors")
    fails(capsys, ["state", "average", tmp_path / "c.safetensors", "--out", tmp_path / "avg"], 2, "--out")
    assert not (tmp_path / "c.bin").exists() and not (tmp_path / "x.pth").exists()


def _wkv(n_layer=2, shape=(2, 8, 8), dtype=torch.float32):
    return {f"blocks.{i}.att.time_state": torch.zeros(shape, dtype=dtype) for i in range(n_layer)}


BROKEN = {
    "integer tensor": (_wkv(dtype=torch.int32), "blocks.0.att.time_state: expected a floating-point tensor, "
                                                "found torch.int32"),
    "boolean tensor": ({**_wkv(), "blocks.1.att.time_state": torch.zeros(2, 8, 8, dtype=torch.bool)},
                       "blocks.1.att.time_state: expected a floating-point tensor, found torch.bool"),
    "nan": ({**_wkv(), "blocks.1.att.time_state": torch.full((2, 8, 8), float("nan"))},
            "blocks.1.att.time_state: 128 of 128 values are NaN or infinite"),
    "inf shift": ({**_wkv(), **{f"blocks.{i}.{k}.time_shift": torch.full((16,), float("inf"))
                                for i in range(2) for k in ("att", "ffn")}}, "NaN or infinite"),
    "wrong head size": (_wkv(shape=(2, 4, 4)), "blocks.0.att.time_state: expected shape [2, 8, 8], found [2, 4, 4]"),
    "too few layers": (_wkv(n_layer=1), "missing blocks.1.att.time_state: expected shape [2, 8, 8], found nothing"),
    "too many layers": (_wkv(n_layer=3), "blocks.2.att.time_state: a layer the model does not have"),
    "a gap": ({"blocks.0.att.time_state": torch.zeros(2, 8, 8), "blocks.2.att.time_state": torch.zeros(2, 8, 8)},
              "missing blocks.1.att.time_state"),
    "layers of two shapes": ({**_wkv(), "blocks.1.att.time_state": torch.zeros(2, 4, 4)},
                             "blocks.1.att.time_state: expected shape [2, 8, 8] (as layer 0), found [2, 4, 4]"),
    "shift for one layer": ({**_wkv(), "blocks.0.att.time_shift": torch.zeros(16),
                             "blocks.0.ffn.time_shift": torch.zeros(16)}, "missing blocks.1.att.time_shift"),
    "shift of the wrong width": ({**_wkv(), **{f"blocks.{i}.{k}.time_shift": torch.zeros(15)
                                               for i in range(2) for k in ("att", "ffn")}},
                                 "blocks.0.att.time_shift: expected shape [16] (heads x head size), found [15]"),
    "a model checkpoint": ({**_wkv(), "emb.weight": torch.zeros(3, 16)}, "unexpected key(s) emb.weight"),
}


@pytest.mark.parametrize("container", ["safetensors", "pth"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_state_is_refused_naming_the_key(tiny_ckpt, tmp_path, capsys, case, container):
    tensors, message = BROKEN[case]
    path = tmp_path / f"bad.{container}"
    if container == "pth":
        torch.save(tensors, path)
    else:
        save_file(tensors, path)
    before = snapshot(path)
    model = tiny_ckpt()
    fails(capsys, ["generate", "--model", model, "--state", path, "--prompt", "x", "--max-tokens", "2"], 1, message)
    # state info never says "fits: yes" for a state generate refuses
    capsys.readouterr()
    rc = main(["state", "info", str(path), "--model", str(model)])
    out, err = capsys.readouterr()
    assert rc == 1 and "fits" not in out.replace(f"fits {model}: no", "") and "Traceback" not in err
    with pytest.raises(StateFileError):
        statetune.load_state(path, statetune.load_model(model))
    assert unchanged(before)


def test_a_list_state_is_checked_like_the_others(tiny_ckpt, tmp_path, capsys):
    items = []
    for _ in range(2):
        items += [torch.zeros(16), torch.zeros(2, 8, 8), torch.zeros(16, dtype=torch.int64)]
    torch.save(items, tmp_path / "l.pth")
    fails(capsys, ["state", "info", tmp_path / "l.pth"], 1, "blocks.0.ffn.time_shift: expected a floating-point")
    torch.save(items[:4], tmp_path / "short.pth")
    fails(capsys, ["state", "info", tmp_path / "short.pth"], 1, "[att_shift, wkv, ffn_shift] * layers", "4 items")
