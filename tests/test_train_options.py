"""``statetune train``'s option groups: flat flags into nested dataclasses, TOML flat or in tables under the
command line, unknown keys and bad choices refused by name, and a ``config.toml`` round trip."""

from __future__ import annotations

import pytest

from statetune.cli import build_parser, main
from statetune.commands.train import TrainOptions
from statetune.errors import OptionError
from statetune.objective import Bptt
from statetune.options import build, flatten, from_namespace, load_toml, to_toml
from statetune.train.config import TrainConfig
from statetune.tuning.config import Param, Scope, StateTuningConfig
from statetune.tuning.tunable import TunableState

REQUIRED = ["--model", "m.pth", "--train-data", "d.jsonl", "--out", "run"]


def parse(argv: list[str]) -> TrainOptions:
    ns = build_parser().parse_args(["train", *argv])
    config = ns.config
    for key in ("debug", "threads", "command", "subcommand"):
        ns.__dict__.pop(key, None)
    return from_namespace(TrainOptions, ns, config)


def test_flat_flags_fill_the_groups():
    opts = parse([*REQUIRED, "--lr", "0.5", "--param", "encoder", "--encoder-hidden", "16", "--max-steps", "7",
                  "--patience", "3", "--save-every", "9", "--bptt", "truncated"])
    assert opts.optim.lr == 0.5 and opts.tuning.param == Param.encoder and opts.tuning.encoder_hidden == 16
    assert opts.schedule.max_steps == 7 and opts.eval.patience == 3 and opts.checkpoint.save_every == 9
    assert opts.bptt == Bptt.truncated and opts.tuning.encoder_scope == Scope.layer  # untouched: the default


def test_help_lists_every_option_of_every_group(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name in flatten(TrainOptions(model="m", train_data="d", out="o")):
        assert "--" + name.replace("_", "-") in out, name
    assert "tuning options" in out and "optim options" in out


def test_toml_nested_or_flat_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('batch_size = 4\nwarmup_steps = 2\n[tuning]\nparam = "encoder"\ntune-shift = true\n'
                   '[optim]\nlr = 0.25\nbeta2 = 0.9\n')
    opts = parse([*REQUIRED, "--config", str(cfg), "--lr", "0.125"])
    assert opts.tuning.param == Param.encoder and opts.tuning.tune_shift and opts.batch_size == 4
    assert opts.optim.lr == 0.125 and opts.optim.beta2 == 0.9 and opts.schedule.warmup_steps == 2


@pytest.mark.parametrize("text,match", [
    ("learning_rate = 1.0\n", "unknown option 'learning_rate'"),
    ("[tuning]\nlr = 1.0\n", "unknown option tuning.'lr' in table [tuning]"),
    ("[optim]\nparam = \"direct\"\n", "unknown option optim.'param'"),
    ("lr = 1.0\n[optim]\nlr = 2.0\n", "'lr' is set twice"),
])
def test_unknown_or_misplaced_keys_are_refused_by_name(tmp_path, text, match):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(OptionError, match=match.replace("[", r"\[").replace("]", r"\]")):
        load_toml(cfg, TrainOptions)


@pytest.mark.parametrize("values,match", [
    ({"param": "prefix"}, "--param: invalid value 'prefix' (choose from direct, encoder)"),
    ({"encoder_scope": "all"}, "--encoder-scope: invalid value 'all' (choose from layer, global)"),
    ({"bptt": "sometimes"}, "--bptt: invalid value 'sometimes' (choose from full, truncated)"),
    ({"dtype": "fp8"}, "--dtype: expected one of auto, fp32, bf16, fp16, got 'fp8'"),
    ({"lr": -1.0}, "--lr: must not be negative"),
    ({"beta1": 1.0}, "--beta1: AdamW needs a value in [0, 1)"),
    ({"ema": 1.0}, "--ema: the average's decay must be in [0, 1), got 1.0"),
    ({"ema": -0.5}, "--ema: the average's decay must be in [0, 1)"),
    ({"save_every": 0}, "--save-every: must be at least 1"),
    ({"init": "prompt"}, "--init prompt needs --init-prompt TEXT"),
])
def test_bad_values_name_the_flag_and_the_choices(values, match):
    for make in (lambda: build(TrainOptions, {"model": "m", "train_data": "d", "out": "o", **values}),
                 lambda: TrainConfig(**values)):  # from TOML/CLI values and from Python alike
        with pytest.raises(OptionError) as e:
            make()
        assert match in str(e.value)


def test_fresh_runs_need_their_inputs_and_resume_excludes_overwrite():
    with pytest.raises(OptionError, match="--model is required"):
        TrainOptions(train_data="d", out="o")
    with pytest.raises(OptionError, match="give one of them"):
        TrainOptions(resume="run", overwrite=True)


def test_config_toml_round_trip(tmp_path):
    config = TrainOptions(model="m.pth", train_data="d.jsonl", out="run", val_data="v.jsonl", param="encoder",
                          encoder_scope="global", init="prompt", init_prompt='say "hi"\n', lr=0.3, lr_final=0.003,
                          max_steps=12, patience=2, keep_checkpoints=1, bptt="truncated", ctx_len=64).config()
    (tmp_path / "config.toml").write_text(to_toml(config))
    assert "# tuning\nparam = \"encoder\"" in (tmp_path / "config.toml").read_text()
    again = build(TrainConfig, load_toml(tmp_path / "config.toml", TrainConfig))
    assert again == config and flatten(again) == flatten(config)


def test_flat_keywords_and_groups_agree():
    a = TrainConfig(lr=0.5, param="encoder", eval_every=3)
    b = TrainConfig(optim=TrainConfig().optim.__class__(lr=0.5), tuning=StateTuningConfig(param="encoder"),
                    eval=TrainConfig().eval.__class__(eval_every=3))
    assert a == b
    assert TrainConfig(tuning=StateTuningConfig(tune_shift=True), encoder_in=4).tuning == StateTuningConfig(
        tune_shift=True, encoder_in=4)  # a flat keyword on top of a group object


def test_tunable_state_takes_the_config(tiny_ckpt):
    import statetune

    model = statetune.load_model(tiny_ckpt("rwkv7"))
    plain = TunableState(model.zero_state(1))  # the benchmarks' call: the defaults, the WKV state directly
    assert plain.param == Param.direct and not plain.tune_shift
    enc = TunableState(model.zero_state(1), StateTuningConfig(param="encoder", encoder_scope="global",
                                                              encoder_in=4, encoder_hidden=8, tune_shift=True,
                                                              shift_lr_scale=0.25))
    assert enc.encoder.w1.shape[0] == 1 and enc.encoder.w1.shape[1:] == (4, 8)
    assert [g["lr_scale"] for g in enc.param_groups()] == [1.0, 0.25]
