"""A pinned loss curve: five optimizer steps of state tuning on a tiny random RWKV-7 (CPU, fp32, one thread)
log exactly the per-step training losses recorded below.

Any change to the model, the objective, the segment loop, the data order, the optimizer or the schedule
that moves training shows up here as a changed number, even when every other test still passes.

To re-record after an intended change (say why in the commit), run
``STATETUNE_RECORD_LOSS_CURVE=1 python -m pytest tests/test_loss_curve.py -s`` and paste the printed lists
over ``EXPECTED``.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import write_checkpoint
from train_data import write_task

from statetune.commands.train import TrainOptions, train
from statetune.train.metrics import read_metrics

EXPECTED = {
    "direct": [6.4577300, 6.0048224, 5.6192050, 5.3422465, 5.1485017],
    "encoder": [6.4577300, 6.3105724, 6.1762586, 5.8964160, 5.7138214],
}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("param", ["direct", "encoder"])
def test_the_first_steps_lose_what_they_always_lost(tmp_path, one_thread, param):
    model = write_checkpoint(tmp_path / "m.pth", "rwkv7", n_layer=2, n_embd=32, head_size=16, vocab_size=300,
                             dim_ffn=64, seed=3)
    train_path, _ = write_task(tmp_path, n_train=32, n_val=4)
    extra = {"encoder_in": 8, "encoder_hidden": 16, "lr": 0.1} if param == "encoder" else {}
    opts = TrainOptions(model=str(model), train_data=str(train_path), out=str(tmp_path / "run"), max_steps=5,
                        batch_size=4, ctx_len=16, warmup_steps=2, seed=7, dtype="fp32", progress=False,
                        param=param, **extra)
    assert train(opts) == 0
    losses = [e["loss"] for e in read_metrics(tmp_path / "run" / "metrics.jsonl") if e["type"] == "train"]
    if os.environ.get("STATETUNE_RECORD_LOSS_CURVE"):
        print(f'\n    "{param}": [{", ".join(f"{x:.7f}" for x in losses)}],')
        pytest.skip("recording the loss curve, not checking it")
    assert len(losses) == 5
    assert losses == pytest.approx(EXPECTED[param], rel=2e-5)
    assert losses[-1] < losses[0]  # the recorded run learns; a curve that does not is not worth pinning
