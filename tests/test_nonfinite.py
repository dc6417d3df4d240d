"""No silent non-finite output: logits or a loss that are NaN or infinite are a one-line runtime error naming the
state and its scale (generate, chat, eval, state capture, training), a 500 for that request alone (serve), and
no JSON file statetune writes ever holds NaN or Infinity.
"""

from __future__ import annotations

import ast
import io
import json
import math
from pathlib import Path

import pytest
import torch
from abuse import fails, no_temp_files, snapshot, unchanged
from conftest import write_checkpoint
from state_compare import random_state
from train_data import write_task

import statetune
from statetune.data.loader import TokenDataset
from statetune.errors import NonFiniteError, StateFileError, check_finite
from statetune.infer.engine import Engine, decode_all
from statetune.infer.sampling import SamplingParams
from statetune.model.state import RWKVState
from statetune.objective import LossResult, dataset_loss
from statetune.tokenizer import get_tokenizer
from statetune.train.metrics import MetricsLog
from statetune.train.samples import sample_generations

BYTES = get_tokenizer("bytes")
ROOT = Path(__file__).resolve().parents[1]
NOT_FINITE = "is not finite (NaN or infinite logits)"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, the same model with one NaN weight, a tuned-looking state, a task, records to generate for."""
    root = tmp_path_factory.mktemp("nonfinite")
    good = write_checkpoint(root / "m.pth", "rwkv7", n_layer=2, n_embd=16, head_size=8, vocab_size=300, dim_ffn=40,
                            seed=2)
    sd = torch.load(good, weights_only=True)
    sd["head.weight"][200, 5] = math.nan  # one logit NaN at every position (a row the fingerprint skips)
    torch.save(sd, root / "nan.pth")
    model = statetune.load_model(good)
    statetune.save_state(root / "s.safetensors", random_state(model, 1, 7), model, {"tokenizer": "bytes"},
                         with_shift=True)
    tr, va = write_task(root, n_train=8, n_val=4)
    (root / "in.jsonl").write_text("".join(json.dumps({"prompt": f"Q: {w}\nA:"}) + "\n" for w in ("ab", "cd", "ef")))
    return {"root": root, "good": good, "nan": root / "nan.pth", "model": model, "state": root / "s.safetensors",
            "train": tr, "val": va, "records": root / "in.jsonl"}


def gen(w, model_key: str, *extra) -> list:
    return ["generate", "--model", w[model_key], "--state", w["state"], "--temperature", "0", "--max-tokens", "8",
            "--threads", "1", *extra]


# -- generate --------------------------------------------------------------------------------------------------
def test_generate_prompt_with_an_overflowing_scale_fails_naming_state_and_scale(world, capsys):
    capsys.readouterr()
    err = fails(capsys, gen(world, "good", "--state-scale", "1e30", "--prompt", "Q: ab"), 1,
                NOT_FINITE, f"state {world['state']} at --state-scale 1e+30", "after reading the prompt")
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert capsys.readouterr().out == ""  # nothing sampled from the non-finite logits reached stdout


def test_generate_prompt_at_scale_one_still_works(world, capsys):
    assert statetune.cli.main([str(a) for a in gen(world, "good", "--prompt", "Q: ab")]) == 0


def test_generate_prompt_with_a_nan_weight_fails(world, capsys):
    fails(capsys, gen(world, "nan", "--prompt", "Q: ab"), 1, NOT_FINITE,
          f"state {world['state']} at --state-scale 1")


@pytest.mark.parametrize("model_key,scale", [("nan", "1"), ("good", "1e30")])
def test_generate_input_writes_nothing_and_leaves_input_alone(world, tmp_path, capsys, model_key, scale):
    out = tmp_path / "out.jsonl"
    before = snapshot(world["records"])
    fails(capsys, gen(world, model_key, "--state-scale", scale, "--input", world["records"], "--prompt-field",
                      "prompt", "--out", out), 1, NOT_FINITE, f"at --state-scale {float(scale):g}")
    assert not out.exists() and unchanged(before) and no_temp_files(tmp_path)
    out.write_text("kept\n")  # an existing output is not replaced either
    fails(capsys, gen(world, model_key, "--state-scale", scale, "--input", world["records"], "--prompt-field",
                      "prompt", "--out", out), 1, NOT_FINITE)
    assert out.read_text() == "kept\n"


# -- chat, state capture, training ---------------------------------------------------------------------------------
def test_chat_piped_fails_with_one_line(world, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nsecond line\n"))
    fails(capsys, ["chat", "--model", world["good"], "--state", world["state"], "--state-scale", "1e30",
                   "--threads", "1", "--max-tokens", "8"], 1, NOT_FINITE, "at --state-scale 1e+30")


def test_state_capture_with_a_nan_model_writes_no_state(world, tmp_path, capsys):
    out = tmp_path / "cap.safetensors"
    fails(capsys, ["state", "capture", "--model", world["nan"], "--prompt", "You are terse.", "--out", out], 1,
          NOT_FINITE, "with the zero state")
    assert not out.exists()


def test_training_samples_name_the_state_being_trained(world):
    model = world["model"]
    huge = random_state(model, 1, 3).scaled(1e30)
    with pytest.raises(NonFiniteError, match="the state being trained"):
        sample_generations(model, BYTES, TokenDataset(world["val"], 300), huge, 2, max_tokens=4)


def test_training_a_nan_model_stops_before_writing_metrics(world, tmp_path, capsys):
    run = tmp_path / "run"
    fails(capsys, ["train", "--model", world["nan"], "--train-data", world["train"], "--val-data", world["val"],
                   "--out", run, "--max-steps", "2", "--no-progress"], 1, "the loss is not finite (nan)",
          "with the zero state")
    metrics = run / "metrics.jsonl"
    assert not metrics.exists() or "NaN" not in metrics.read_text()


# -- eval ---------------------------------------------------------------------------------------------------------
def test_eval_sweep_with_an_overflowing_scale_fails_and_writes_no_report(world, tmp_path, capsys):
    out = tmp_path / "report"
    fails(capsys, ["eval", "--model", world["good"], "--data", world["val"], "--state", world["state"],
                   "--state-scale", "1", "1e38", "--out", out, "--threads", "1"], 1,
          "the loss is not finite (nan)", f"state {world['state']} at --state-scale 1e+38")
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "report.md").exists()


def test_eval_sweep_of_finite_scales_writes_strict_json(world, tmp_path, capsys):
    out = tmp_path / "report"
    assert statetune.cli.main([str(a) for a in ["eval", "--model", world["good"], "--data", world["val"], "--state",
                                                 world["state"], "--state-scale", "1", "0.5", "--out", out]]) == 0
    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert [r["name"] for r in report["rows"]] == ["base (zero state)", "s x1", "s x0.5"]


def test_eval_with_a_nan_model_fails_at_the_base_row(world, capsys):
    fails(capsys, ["eval", "--model", world["nan"], "--data", world["val"], "--generate", "--max-tokens", "4"], 1,
          "the loss is not finite (nan), with the zero state")


# -- the engine and the objective, below the CLI -------------------------------------------------------------------
def test_engine_names_how_far_a_sequence_got(world):
    """Logits that overflow only after some tokens: the error says how many were generated."""
    model = world["model"]

    class Late:
        def __init__(self) -> None:
            self.calls = 0

        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, tokens, state, last_only=False):
            logits, state = model(tokens, state, last_only=last_only)
            self.calls += 1
            return (logits * math.inf if self.calls == 4 else logits), state

    engine = Engine(Late(), BYTES)
    engine.add(BYTES.encode("Q: ab"), None, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[]),
               source="the zero state")
    with pytest.raises(NonFiniteError, match=r"after 3 generated token\(s\)"):
        while len(engine):
            engine.step()


def test_decode_all_raises_where_it_used_to_return_text(world):
    model = world["model"]
    with pytest.raises(NonFiniteError, match="with state x at --state-scale 1e"):
        decode_all(model, BYTES, [BYTES.encode("ab")], random_state(model, 1, 1).scaled(1e30),
                   SamplingParams(temperature=0, max_tokens=4), source="state x at --state-scale 1e+30")


def test_loss_check(world):
    nan_model = statetune.load_model(world["nan"])
    res = dataset_loss(nan_model, TokenDataset(world["val"], 300), None)
    assert math.isnan(res.loss)  # the learning-rate search reads a diverged trial this way
    with pytest.raises(NonFiniteError, match=r"the loss is not finite \(nan\), with the zero state"):
        res.checked("the zero state")
    assert LossResult(2.5, 10).checked("s") == LossResult(2.5, 10)
    with pytest.raises(NonFiniteError, match="inf"):
        check_finite(math.inf, "the loss")
    check_finite(torch.ones(3), "logits")
    with pytest.raises(NonFiniteError):
        check_finite(torch.tensor([1.0, math.nan]), "logits")


# -- serve -------------------------------------------------------------------------------------------------------
def test_batcher_fails_the_broken_sequence_of_a_batch_alone(world):
    """Both sequences submitted together (one batch): the broken one gets its 500, the other its answer."""
    import asyncio

    from statetune.serve.batcher import Batcher
    from statetune.serve.errors import EngineFailure

    model = world["model"]
    good, huge = random_state(model, 1, 5), random_state(model, 1, 5).scaled(1e30)
    params = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[])
    prompt = BYTES.encode("Q: ab\nA:")

    async def both():
        handles = [batcher.submit(prompt, huge, params, source="state 'huge' at serve --state-scale 1"),
                   batcher.submit(prompt, good, params, source="state 'good'")]
        batcher.start()  # the first time only: both wait in its inbox and join the batch in the same step
        out = []
        for h in handles:
            while True:
                item = await h.queue.get()
                if isinstance(item, EngineFailure) or item.finished:
                    out.append(item)
                    break
        return out

    batcher = Batcher(model, BYTES, max_batch_size=8)
    try:
        failed, done = asyncio.run(both())
        again, = asyncio.run(both())[1:]
    finally:
        batcher.stop()
    assert isinstance(failed, EngineFailure) and failed.status == 500 and NOT_FINITE in failed.message
    assert "state 'huge' at serve --state-scale 1" in failed.message
    assert done.completion.tokens == decode_tokens(model, prompt, good, params) == again.completion.tokens


def decode_tokens(model, prompt: list[int], state: RWKVState, params: SamplingParams) -> list[int]:
    engine = Engine(model, BYTES)
    engine.add(prompt, state, params)
    done = None
    while len(engine):
        done = next((d.completion for d in engine.step() if d.completion), done)
    return done.tokens


@pytest.mark.slow
def test_serve_fails_the_broken_request_alone(world, tmp_path):
    pytest.importorskip("fastapi")
    from concurrent.futures import ThreadPoolExecutor

    from serve_helpers import KEY, Running

    from statetune.commands.serve import ServeOptions

    model = world["model"]
    states = tmp_path / "states"
    states.mkdir()
    statetune.save_state(states / "good.safetensors", random_state(model, 1, 5), model, {"tokenizer": "bytes"},
                         with_shift=True)
    z = model.zero_state(1)
    statetune.save_state(states / "overflow.safetensors", RWKVState(*(torch.full_like(t, 3e38) for t in z.tensors())),
                         model, {"tokenizer": "bytes"}, with_shift=True)
    server = Running(ServeOptions(model=str(world["good"]), states=str(states), api_key=KEY, max_batch_size=8))
    try:
        body = {"prompt": "Q: ab\nA:", "max_tokens": 12, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:  # both in flight together: one batch
            bad, good = pool.map(lambda name: server.post("/v1/completions", {**body, "model": name}),
                                 ["overflow", "good"])
        assert bad.status_code == 500
        err = bad.json()["error"]
        assert err["type"] == "server_error" and err["code"] == "engine_error"
        assert NOT_FINITE in err["message"] and "state 'overflow' at serve --state-scale 1" in err["message"]
        engine = Engine(model, BYTES)
        engine.add(BYTES.encode(body["prompt"]), statetune.load_state(states / "good.safetensors", model).state,
                   SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[0]))
        alone = None
        while len(engine):
            alone = next((d.completion.text for d in engine.step() if d.completion), alone)
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == alone
        health = server.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        again = server.post("/v1/completions", {**body, "model": "good"})
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == alone
    finally:
        server.stop()


# -- JSON writers ------------------------------------------------------------------------------------------------
def test_every_json_writer_refuses_nan():
    """Every json.dump/json.dumps call in the package, the benchmarks and the scripts passes allow_nan=False."""
    loose = []
    for folder in ("statetune", "benchmarks", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("dump", "dumps") and getattr(node.func.value, "id", None) == "json"):
                    strict = any(k.arg == "allow_nan" and getattr(k.value, "value", True) is False
                                 for k in node.keywords)
                    if not strict:
                        loose.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not loose, loose


def test_writers_refuse_nan_at_run_time(world, tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    with pytest.raises(ValueError):
        log.log("val", 1, loss=math.nan)
    model = world["model"]
    with pytest.raises(StateFileError, match="metadata holds NaN"):
        statetune.save_state(tmp_path / "s.safetensors", model.zero_state(1), model, {"trained": {"val": math.nan}})
    assert not (tmp_path / "s.safetensors").exists()


def test_a_nan_literal_in_an_input_record_is_refused_naming_the_line(world, tmp_path, capsys):
    records = tmp_path / "in.jsonl"
    records.write_text('{"prompt": "ab"}\n{"prompt": "cd", "score": NaN}\n')
    fails(capsys, gen(world, "good", "--input", records, "--prompt-field", "prompt", "--out", tmp_path / "o.jsonl"),
          1, f"{records}:2: NaN is not a JSON number")
