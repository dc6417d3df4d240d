"""``--state-scale``: a loaded state times a factor, the same in generate, eval and serve (and 0 is the zero
state); a negative factor is a usage error on every command that takes it."""

from __future__ import annotations

import json

import pytest
import state_compare
from conftest import write_checkpoint
from train_data import write_task

import statetune
from statetune.cli import main
from statetune.commands.serve import ServeOptions, build_service
from statetune.model.state import RWKVState


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    model_path = write_checkpoint(root / "m.pth", "rwkv7", n_layer=2, n_embd=32, head_size=16, vocab_size=300,
                                  dim_ffn=64, seed=3)
    model = statetune.load_model(model_path)
    states = root / "states"
    states.mkdir()
    state = state_compare.random_state(model, 1, seed=1)
    statetune.save_state(states / "s.safetensors", state, model, {"tokenizer": "bytes"}, with_shift=True)
    _, val = write_task(root)
    return model_path, model, states / "s.safetensors", state, val


def test_scaled_is_the_line_from_zeros_to_the_state(setup):
    *_, state, _ = setup
    half = state.scaled(0.5)
    for a, b in zip(half.tensors(), state.tensors(), strict=True):
        assert (a == b * 0.5).all()
    assert state.scaled(1.0) is state and not state.scaled(0.0).wkv.any()


def _generate(model_path, extra, capsys) -> str:
    assert main(["generate", "--model", str(model_path), "--prompt", "Q: ab", "--raw", "--max-tokens", "8",
                 "--temperature", "0", "--tokenizer", "bytes", *extra]) == 0
    return capsys.readouterr().out


def test_generate_at_scale_zero_is_the_zero_state(setup, capsys):
    model_path, _, path, _, _ = setup
    base = _generate(model_path, [], capsys)
    assert _generate(model_path, ["--state", str(path), "--state-scale", "0"], capsys) == base
    assert _generate(model_path, ["--state", str(path)], capsys) != base  # the state itself changes the text


def test_eval_sweeps_several_scales_in_one_run(setup, tmp_path, capsys):
    model_path, _, path, _, val = setup
    out = tmp_path / "r"
    assert main(["eval", "--model", str(model_path), "--data", str(val), "--state", str(path), "--state-scale", "0",
                 "0.5", "1", "--out", str(out)]) == 0
    rows = {r["name"]: r["loss"] for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert list(rows) == ["base (zero state)", "s x0", "s x0.5", "s x1"]
    assert rows["s x0"] == pytest.approx(rows["base (zero state)"], abs=1e-6)
    assert len({round(v, 6) for v in rows.values()}) == 3


def test_serve_scales_every_state_it_reads(setup):
    model_path, model, path, state, _ = setup
    service = build_service(ServeOptions(model=str(model_path), states=str(path.parent), state_scale=0.25))
    loaded = service.registry.state(service.registry.get("s"))
    assert isinstance(loaded, RWKVState)
    assert (loaded.wkv == state.wkv * 0.25).all() and (loaded.att_shift == state.att_shift * 0.25).all()


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "serve"])
def test_negative_scale_is_a_usage_error(setup, command, capsys):
    model_path, _, path, _, val = setup
    extra = {"generate": ["--prompt", "x"], "chat": [], "eval": ["--data", str(val)], "serve": []}[command]
    assert main([command, "--model", str(model_path), "--state-scale", "-1", *extra]) == 2
    assert "--state-scale: must be 0 or more, got -1.0" in capsys.readouterr().err
