"""The one ``--device`` check: a clear error naming the flag instead of a failure inside torch."""

from __future__ import annotations

import pytest
import torch

from statetune.cli import main
from statetune.device import resolve_device
from statetune.errors import OptionError


def test_good_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec,match", [("gpu", "'gpu' is not a device"), ("cuda:x", "'cuda:x' is not a device"),
                                        ("meta", "unsupported device type 'meta'")])
def test_bogus_devices(spec, match):
    with pytest.raises(OptionError, match=f"--device: {match}"):
        resolve_device(spec)


def test_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionError, match="--device cuda: CUDA is not available here"):
        resolve_device("cuda")


def test_cuda_index_past_the_last_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(OptionError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("argv", [["generate", "--prompt", "hi", "--max-tokens", "1"], ["smoke"],
                                  ["state", "capture", "--prompt", "hi", "--out", "x.safetensors"]])
def test_commands_refuse_a_bogus_device_in_one_line(tiny_ckpt, argv, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = [] if argv == ["smoke"] else ["--model", str(tiny_ckpt("rwkv7"))]
    assert main([*argv, *model, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available here" in err and "Traceback" not in err
