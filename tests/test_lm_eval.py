"""EleutherAI's lm-evaluation-harness, run for real against a ``statetune serve`` subprocess, on the small
local tasks of ``tests/data/lm_eval`` (multiple choice, rolling perplexity, generation; no hub download):
its numbers must be statetune's own, for the base model and for a state with a prompt template."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")

from serve_helpers import random_state  # noqa: E402

import statetune  # noqa: E402
from statetune.cli import main  # noqa: E402
from statetune.objective import masked_lm_loss  # noqa: E402
from statetune.tokenizer import get_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"
BYTES = get_tokenizer("bytes")
TEMPLATE = "Input: {mr}\n\nResponse:"  # the generation task's own prompt: the harness sends it formatted


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def served(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    path = tiny_ckpt("rwkv7")
    model = statetune.load_model(path)
    states = root / "states"
    states.mkdir()
    statetune.save_state(states / "tuned.safetensors", random_state(model, 5), model,
                         {"tokenizer": "bytes", "prompt_template": TEMPLATE, "stop": {"text": "\n\n"}}, with_shift=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "statetune", "serve", "--model", str(path), "--states",
                             str(states), "--model-name", "base", "--port", str(port), "--threads", "1"],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
    yield {"url": url, "model_path": path, "model": model, "states": states, "root": root}
    proc.terminate()
    proc.wait(30)


def harness(served, name: str, tmp: Path, chat: bool = False) -> tuple[dict, dict[str, list[dict]]]:
    """Run ``lm_eval`` on the three tasks for the served model ``name``; (results, samples by task)."""
    out = tmp / f"out-{name}"
    args = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
            f"base_url={served['url']}/v1/completions,model={name},tokenizer_backend=remote,num_concurrent=2,"
            "max_retries=1", "--batch_size", "4", "--tasks", "statetune_mc,statetune_ppl,statetune_gen",
            "--include_path", str(TASKS), "--output_path", str(out), "--log_samples"]
    run = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (folder,) = out.iterdir()
    results = json.loads(next(folder.glob("results_*.json")).read_text())["results"]
    samples = {}
    for f in folder.glob("samples_*.jsonl"):
        task = f.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in f.read_text().splitlines()]
    return results, samples


@pytest.mark.parametrize("name", ["base", "tuned"])
def test_the_harness_measures_what_statetune_measures(served, tmp_path, name):
    results, samples = harness(served, name, tmp_path)
    state_file = None if name == "base" else served["states"] / f"{name}.safetensors"
    model = served["model"]
    state = None if state_file is None else statetune.load_state(state_file, model).state

    # rolling perplexity: the harness scores each document after the end-of-text token; statetune eval on the
    # same token records gives the same bits per byte (the byte tokenizer has one token per byte)
    docs = [json.loads(line)["text"] for line in (TASKS / "ppl.jsonl").read_text().splitlines()]
    data = tmp_path / "ppl.jsonl"
    data.write_text("".join(json.dumps({"text": [0] + BYTES.encode(d), "mask": [0] + [1] * len(BYTES.encode(d))})
                            + "\n" for d in docs))
    args = ["eval", "--model", str(served["model_path"]), "--data", str(data), "--out", str(tmp_path / "ev")]
    assert main(args + ([] if state_file is None else ["--state", str(state_file)])) == 0
    row = json.loads((tmp_path / "ev.json").read_text())["rows"][-1]
    bpb = results["statetune_ppl"]["bits_per_byte,none"]
    assert math.isclose(bpb, row["loss"] / math.log(2), rel_tol=1e-4)

    # multiple choice: each choice's log-likelihood is minus the masked loss of its continuation
    correct = 0
    for s in samples["statetune_mc"]:
        doc = s["doc"]
        context = BYTES.encode(doc["question"])
        lls = []
        for choice, resp in zip(doc["choices"], s["filtered_resps"], strict=True):
            cont = BYTES.encode(" " + choice)
            loss, n, _ = masked_lm_loss(model, torch.tensor([context + cont]),
                                        torch.tensor([[0] * len(context) + [1] * len(cont)]), state)
            assert math.isclose(float(resp[0]), -float(loss), rel_tol=1e-4)
            lls.append(-float(loss))
        correct += max(range(len(lls)), key=lls.__getitem__) == doc["answer"]
    assert results["statetune_mc"]["acc,none"] == pytest.approx(correct / len(samples["statetune_mc"]))

    # generation: the harness's answers are statetune generate's; with the state, generate wraps the record's
    # field in the state's template, which is the task's prompt: the harness's prompt is not wrapped twice
    records = tmp_path / "gen.jsonl"
    gen_docs = [s["doc"] for s in sorted(samples["statetune_gen"], key=lambda s: s["doc_id"])]
    if state_file is None:
        records.write_text("".join(json.dumps({"prompt": TEMPLATE.format(mr=d["mr"])}) + "\n" for d in gen_docs))
        extra = ["--raw", "--prompt-field", "prompt"]
    else:
        records.write_text("".join(json.dumps({"mr": d["mr"]}) + "\n" for d in gen_docs))
        extra = ["--state", str(state_file)]
    out = tmp_path / "generated.jsonl"
    assert main(["generate", "--model", str(served["model_path"]), "--input", str(records), "--out", str(out),
                 "--temperature", "0", "--max-tokens", "24", "--stop", r"\n\n", *extra]) == 0
    expected = [json.loads(line)["generated"] for line in out.read_text().splitlines()]
    got = [s["filtered_resps"][0] for s in sorted(samples["statetune_gen"], key=lambda s: s["doc_id"])]
    assert got == expected
