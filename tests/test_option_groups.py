"""One option group per concern: the runtime group is the same on every command that runs a model, ``--threads``
reaches it from the command line and from TOML, and the three declarations of the sampling fields (the
command-line flags, :class:`SamplingParams`, the server's request schema) agree."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from statetune.cli import COMMANDS, main
from statetune.commands.chat import ChatOptions
from statetune.commands.eval import EvalOptions
from statetune.commands.generate import GenerateOptions
from statetune.commands.serve import ServeOptions
from statetune.commands.state import CaptureOptions
from statetune.errors import OptionError
from statetune.infer.sampling import SamplingError, SamplingOptions, SamplingParams
from statetune.options import build, from_namespace
from statetune.runtime import ModelOptions

RUNS_A_MODEL = [GenerateOptions, ChatOptions, EvalOptions, ServeOptions, CaptureOptions]
# the flag's name where it differs from the field of SamplingParams
FLAG_TO_PARAM = {"stop_token": "stop_token_ids"}
# defaults the command line picks on purpose (a CLI user wants nucleus sampling, a chat a longer reply)
CLI_DEFAULTS = {"top_p": 0.85}


@pytest.mark.parametrize("cls", RUNS_A_MODEL, ids=lambda c: c.__name__)
def test_every_command_that_runs_a_model_has_the_runtime_group(cls):
    group = {f.name: f for f in dataclasses.fields(ModelOptions)}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in group.items():
        assert name in fields, f"{cls.__name__} lacks --{name}"
        assert fields[name].metadata["help"] == f.metadata["help"], f"{cls.__name__} --{name} has its own help"
        assert fields[name].default == f.default


@pytest.mark.parametrize("argv", [["eval", "--model", "m", "--data", "d"], ["state", "capture", "--model", "m",
                                  "--prompt", "x", "--out", "o.safetensors"]], ids=lambda a: " ".join(a[:2]))
def test_eval_and_capture_take_dtype(argv, capsys):
    assert main([*argv, "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "--dtype" in err and "fp32" in err


def test_threads_from_the_command_line_and_from_toml(tmp_path, tiny_ckpt, capsys):
    """--threads is a field of the runtime group: the flag, a TOML file and the Python API all set it, and
    loading the model applies it."""
    ckpt = str(tiny_ckpt())
    config = tmp_path / "c.toml"
    config.write_text("threads = 1\n")
    import argparse

    ns = argparse.Namespace(model=ckpt, prompt="x")
    assert from_namespace(GenerateOptions, ns, config).threads == 1
    assert build(GenerateOptions, {"model": ckpt, "prompt": "x", "threads": 2}).threads == 2
    with pytest.raises(OptionError, match="--threads: must be at least 1, got 0"):
        GenerateOptions(model=ckpt, prompt="x", threads=0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["generate", "--model", ckpt, "--prompt", "ab", "--max-tokens", "2", "--temperature", "0",
                     "--tokenizer", "bytes", "--config", str(config)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()


def test_threads_stays_global_on_commands_without_a_model(capsys):
    assert main(["smoke", "--tokens", "4", "--threads", "0"]) == 2
    assert "--threads: must be at least 1, got 0" in capsys.readouterr().err


def _sampling_flags() -> dict[str, dataclasses.Field]:
    return {FLAG_TO_PARAM.get(f.name, f.name): f for f in dataclasses.fields(SamplingOptions)}


def test_sampling_flags_and_params_have_the_same_fields_and_defaults():
    params = {f.name: f for f in dataclasses.fields(SamplingParams)}
    flags = _sampling_flags()
    assert set(flags) == set(params)
    for name, f in flags.items():
        if name in ("stop", "stop_token_ids"):  # None on the command line: the state's stops
            assert f.default is None and params[name].default_factory() == []
        else:
            assert f.default == CLI_DEFAULTS.get(name, params[name].default), name
    assert set(CLI_DEFAULTS) <= set(params) and all(CLI_DEFAULTS[k] != params[k].default for k in CLI_DEFAULTS)


def test_the_server_schema_has_every_sampling_field_defaulting_to_the_params():
    pytest.importorskip("pydantic")
    from statetune.serve.prompts import Limits, sampling_params
    from statetune.serve.schemas import CompletionRequest

    schema = CompletionRequest.model_fields
    assert set(_sampling_flags()) <= set(schema)
    req = CompletionRequest(model="m", prompt="x")
    got = sampling_params(req, [], [0], Limits(max_tokens=SamplingParams().max_tokens))
    assert got == SamplingParams(stop_token_ids=[0])  # absent fields: SamplingParams' defaults


BAD = {"temperature": -1.0, "top_p": 1.5, "top_k": -1, "repetition_penalty": 0.0, "max_tokens": 0, "seed": -1}


@pytest.mark.parametrize("name", sorted(BAD))
def test_the_three_refuse_the_same_out_of_bounds_values(name):
    pytest.importorskip("pydantic")
    from statetune.serve.errors import ApiError
    from statetune.serve.prompts import Limits, sampling_params
    from statetune.serve.schemas import ChatRequest

    value = BAD[name]
    with pytest.raises(SamplingError, match=name):
        SamplingParams(**{name: value})
    with pytest.raises(OptionError, match=f"--{name.replace('_', '-')}"):
        GenerateOptions(model="m", prompt="x", **{name: value})
    # chat: completions alone take max_tokens 0 (score the prompt, generate nothing; tests/test_serve_scoring.py)
    with pytest.raises(ApiError, match=name):
        sampling_params(ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], **{name: value}), [], [0],
                        Limits())
    edge = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1e-3, "max_tokens": 1, "seed": 0}
    SamplingParams(**{name: edge[name]})
    GenerateOptions(model="m", prompt="x", **{name: edge[name]})


def test_commands_table_points_only_at_command_modules():
    for cmd in COMMANDS.values():
        for c in cmd.values() if isinstance(cmd, dict) else [cmd]:
            assert c.module.startswith("statetune.commands.") or c.module == "statetune.train.loop", c.module
