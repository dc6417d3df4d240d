"""``--layers``: only the named layers' states are trained; every other layer stays exactly at its start, and
the saved state file still holds every layer."""

from __future__ import annotations

import pytest
import torch
from conftest import write_checkpoint
from train_data import write_task

import statetune
from statetune.cli import main
from statetune.commands.train import TrainOptions, train
from statetune.errors import OptionError
from statetune.tuning.config import StateTuningConfig, parse_layers
from statetune.tuning.tunable import TunableState


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("spec,want", [("0-3", [0, 1, 2, 3]), ("0,2,5", [0, 2, 5]), ("5,0-1,1", [0, 1, 5]),
                                       (" 2 ", [2])])
def test_parse_layers(spec, want):
    assert parse_layers(spec) == want


@pytest.mark.parametrize("spec,match", [("", "invalid value ''"), ("a", "invalid value 'a'"), ("1-", "invalid value"),
                                        ("-1", "invalid value"), ("3-1", "invalid range '3-1'"), ("0,,1", "invalid"),
                                        ("0-999999999", "invalid range")])
def test_bad_layers_name_the_flag(spec, match):
    with pytest.raises(OptionError, match=match) as e:
        StateTuningConfig(layers=spec)
    assert str(e.value).startswith("--layers: ")


def test_out_of_range_layer_is_refused(tiny_ckpt):
    model = statetune.load_model(tiny_ckpt("rwkv7"))
    with pytest.raises(OptionError, match=r"--layers: layer 2 is out of range: the model has 2 layers \(0\.\.1\)"):
        TunableState(model.zero_state(1), StateTuningConfig(layers="0,2"))


@pytest.mark.parametrize("param", ["direct", "encoder"])
def test_other_layers_stay_exactly_at_their_start(tiny_ckpt, param):
    model = statetune.load_model(tiny_ckpt("rwkv6"))
    g = torch.Generator().manual_seed(0)
    start = model.zero_state(1).map(lambda t: torch.randn(t.shape, generator=g))
    config = StateTuningConfig(param=param, tune_shift=True, layers="1", encoder_in=4, encoder_hidden=8)
    tunable = TunableState(start, config, seed=1)
    opt = torch.optim.AdamW(tunable.parameters(), lr=0.5, weight_decay=0.1)
    tokens = torch.randint(1, 300, (2, 9), generator=g)
    for _ in range(3):
        opt.zero_grad()
        logits, _ = model(tokens, tunable())
        logits.square().mean().backward()
        opt.step()
    state = tunable().detach()
    for a, b in zip(state.tensors(), start.tensors(), strict=True):
        assert torch.equal(a[0], b[0])  # bit for bit
        assert not torch.equal(a[1], b[1])


def test_all_layers_by_default_and_parameters_cover_only_the_named(tiny_ckpt):
    model = statetune.load_model(tiny_ckpt("rwkv7"))
    assert TunableState(model.zero_state(1)).wkv.shape[0] == 2
    assert TunableState(model.zero_state(1), StateTuningConfig(layers="1")).wkv.shape[0] == 1


def test_a_run_with_layers_keeps_the_init_elsewhere_and_saves_every_layer(tmp_path):
    model_path = write_checkpoint(tmp_path / "m.pth", "rwkv7", n_layer=3, n_embd=32, head_size=16, vocab_size=300,
                                  dim_ffn=64, seed=3)
    tr, va = write_task(tmp_path)
    model = statetune.load_model(model_path)
    g = torch.Generator().manual_seed(5)
    init = model.zero_state(1).map(lambda t: torch.randn(t.shape, generator=g).to(t) * 0.2)
    statetune.save_state(tmp_path / "init.safetensors", init, model, with_shift=True)
    opts = TrainOptions(model=str(model_path), train_data=str(tr), val_data=str(va), out=str(tmp_path / "run"),
                        init=str(tmp_path / "init.safetensors"), layers="0,2", tune_shift=True, max_steps=3,
                        lr=1.0, progress=False, samples=0, eval_every=3)
    assert train(opts) == 0
    saved = statetune.load_state(tmp_path / "run" / "state-final.safetensors", model)
    assert saved.state.wkv.shape[0] == 3
    for got, want in zip(saved.state.tensors(), init.tensors(), strict=True):
        assert torch.equal(got[1], want[1])
        assert not torch.equal(got[0], want[0])
    assert not torch.equal(saved.state.wkv[2], init.wkv[2])  # (the last layer's ffn shift reaches no loss token)
    assert saved.metadata["trained"]["tuning"]["layers"] == "0,2"


def test_cli_layers_out_of_range_is_a_usage_error(tiny_ckpt, tmp_path, capsys):
    tr, _ = write_task(tmp_path)
    code = main(["train", "--model", str(tiny_ckpt("rwkv7")), "--train-data", str(tr), "--out", str(tmp_path / "r"),
                 "--layers", "0-4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--layers: layer 4 is out of range" in err and "Traceback" not in err
