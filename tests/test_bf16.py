"""bf16 end to end on CPU: weights in bf16, the WKV state and the decays in fp32.

Tolerances against the fp32 model (measured on these tiny models: logits 2.1e-2 of the largest logit,
probabilities 2.2e-3): logits within 5e-2 of the largest logit, next-token probabilities within 1e-2,
and the reference and chunked WKV paths within 5e-3 of each other in bf16.
"""

from __future__ import annotations

import pytest
import torch
from conftest import write_checkpoint
from train_data import write_task

import statetune
from statetune.cli import main
from statetune.commands.train import TrainOptions, train
from statetune.data.loader import TokenDataset
from statetune.objective import dataset_loss

LOGITS_REL, PROBS_ABS, PATHS_REL = 5e-2, 1e-2, 5e-3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return {v: write_checkpoint(root / f"{v}.pth", v, n_layer=2, n_embd=32, head_size=16, vocab_size=300,
                                dim_ffn=64, seed=3) for v in ("rwkv7", "rwkv6")}


@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
def test_bf16_logits_are_close_to_fp32_on_both_paths(models, version):
    fp32 = statetune.load_model(models[version])
    bf16 = statetune.load_model(models[version], dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.zero_state(1).wkv.dtype == torch.float32
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    fp32.set_wkv_impl("reference")
    want, want_state = fp32(tokens)
    got = {}
    for impl in ("reference", "chunked"):
        bf16.set_wkv_impl(impl)
        logits, state = bf16(tokens)
        assert logits.dtype == torch.bfloat16 and state.wkv.dtype == torch.float32
        assert _rel(logits, want) < LOGITS_REL, impl
        assert (logits.float().softmax(-1) - want.softmax(-1)).abs().max() < PROBS_ABS, impl
        assert _rel(state.wkv, want_state.wkv) < LOGITS_REL, impl
        got[impl] = logits
    assert _rel(got["chunked"], got["reference"]) < PATHS_REL


@pytest.mark.slow
@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
def test_bf16_trains_a_state_that_works_in_fp32(models, tmp_path, version):
    model = models[version]
    tr, va = write_task(tmp_path)
    out = tmp_path / "run"
    assert train(TrainOptions(model=str(model), train_data=str(tr), val_data=str(va), out=str(out), progress=False,
                              batch_size=8, max_steps=25, eval_every=25, samples=0, dtype="bf16")) == 0
    fp32 = statetune.load_model(model)
    sf = statetune.load_state(out / "state-final.safetensors", fp32)
    assert sf.state.wkv.dtype == torch.float32
    val = TokenDataset(va, 300)
    zero = dataset_loss(fp32, val, fp32.zero_state(1), batch_size=8).loss
    tuned = dataset_loss(fp32, val, sf.state.to(dtype=fp32.dtype), batch_size=8).loss
    assert tuned < zero - 0.5, (zero, tuned)


def test_generate_in_bf16(models, capsys):
    args = ["generate", "--model", str(models["rwkv7"]), "--prompt", "Hello", "--max-tokens", "12",
            "--temperature", "0", "--tokenizer", "bytes"]
    assert main([*args, "--dtype", "bf16"]) == 0
    text = capsys.readouterr().out
    assert text.strip()


@pytest.mark.slow
def test_serve_in_bf16_equals_generate_in_bf16(models, tmp_path, capsys):
    pytest.importorskip("fastapi")
    from serve_helpers import Running

    from statetune.commands.serve import ServeOptions

    states = tmp_path / "states"
    states.mkdir()
    assert main(["generate", "--model", str(models["rwkv7"]), "--prompt", "Hello", "--max-tokens", "12",
                 "--temperature", "0", "--tokenizer", "bytes", "--dtype", "bf16"]) == 0
    expect = capsys.readouterr().out
    running = Running(ServeOptions(model=str(models["rwkv7"]), states=str(states), model_name="base",
                                   tokenizer="bytes", dtype="bf16"))
    try:
        r = running.client("unused").completions.create(model="base", prompt="Hello", max_tokens=12, temperature=0)
    finally:
        running.stop()
    assert r.choices[0].text == expect
