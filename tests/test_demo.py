"""``statetune demo --quick`` on the shipped model and the shipped E2E subset."""

from __future__ import annotations

import pytest

import statetune
from statetune.cli import main
from statetune.commands.demo import asset


def test_shipped_model_loads_and_is_byte_level():
    model = statetune.load_model(asset("tiny-rwkv7", "model.pth"))
    assert model.config.version == "rwkv7" and model.config.vocab_size == 257


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--threads", "2"]) == 0
    out = capsys.readouterr().out
    for text in ("validation loss", "BLEU", "example 1", "statetune generate", "statetune chat"):
        assert text in out
    sf = statetune.load_state(tmp_path / "e2e-state.safetensors",
                              statetune.load_model(asset("tiny-rwkv7", "model.pth")))
    assert sf.metadata["tokenizer"] == "bytes" and sf.metadata["prompt_template"] == "Input: {mr}\n\nResponse:"
