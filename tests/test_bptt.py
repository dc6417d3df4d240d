"""Backpropagation through the segments of long sequences: the gradient of the tuned state with any
``--ctx-len`` is that of one unsegmented pass (``--bptt full``), or of the first segment alone
(``--bptt truncated``); from the library, a float64 gradcheck, the CLI, exact resume and long chats."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import write_checkpoint

import statetune
from statetune.cli import main
from statetune.data.loader import TokenDataset, collate
from statetune.model.state import RWKVState
from statetune.objective import Bptt, backward_sequence, masked_lm_loss, segments, sequence_loss
from statetune.train.metrics import read_metrics
from statetune.train.rundir import resumed_config
from statetune.tuning.config import StateTuningConfig
from statetune.tuning.tunable import TunableState

REPO = Path(__file__).resolve().parents[1]


def random_tunable(model, tune_shift: bool, seed: int = 0) -> TunableState:
    """A trainable state away from zero (a zero WKV state hides terms of the gradient)."""
    tunable = TunableState(model.zero_state(1), StateTuningConfig(tune_shift=tune_shift))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tunable.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return tunable


def batch(lengths: list[int], vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of random tokens with loss tokens scattered over the whole length of each row."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.randint(1, vocab, (len(lengths), T), generator=g)
    mask = torch.rand(len(lengths), T, generator=g) < 0.4
    for b, n in enumerate(lengths):
        tokens[b, n:], mask[b, n:] = 0, False
    return tokens, mask


def grads_of(tunable: TunableState) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in tunable.named_parameters()}
    tunable.zero_grad(set_to_none=True)
    return out


def test_segments_cover_every_position_once():
    for length, ctx in [(2, 1), (9, 4), (23, 5), (17, 100), (64, 16)]:
        wins = segments(length, ctx)
        predicted = [t for w in wins for t in range(w.start + 1, min(w.stop, length))]
        assert predicted == list(range(1, length))
        assert all(w.stop - w.start == ctx + 1 for w in wins)


@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
@pytest.mark.parametrize("tune_shift", [False, True], ids=["wkv", "wkv+shift"])
@pytest.mark.parametrize("ctx_len", [4, 7])
def test_full_bptt_gradient_equals_one_unsegmented_pass(tiny_ckpt, version, tune_shift, ctx_len):
    model = statetune.load_model(tiny_ckpt(version))
    tunable = random_tunable(model, tune_shift)
    tokens, mask = batch([23, 17], model.config.vocab_size)  # not multiples of ctx_len; rows padded
    assert len(segments(23, ctx_len)) >= 4
    loss, n, _ = masked_lm_loss(model, tokens, mask, tunable())
    (loss * 0.1).backward()
    want = grads_of(tunable)
    got_loss, got_n = backward_sequence(model, tokens, mask, tunable(), ctx_len, Bptt.full, scale=0.1)
    got = grads_of(tunable)
    assert got_n == n and n > 0
    torch.testing.assert_close(got_loss, float(loss.detach()), rtol=1e-5, atol=1e-5)
    assert set(got) == set(want) == ({"wkv", "att_shift", "ffn_shift"} if tune_shift else {"wkv"})
    for name in want:
        assert want[name].abs().sum() > 0
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not any(p.grad is not None for p in model.parameters())


def test_loss_tokens_in_the_last_segment_alone_reach_the_state(tiny_ckpt):
    model = statetune.load_model(tiny_ckpt("rwkv7"))
    tunable = random_tunable(model, tune_shift=True)
    tokens, mask = batch([30], model.config.vocab_size)
    mask[:, :26] = False  # only the last segment of ctx_len 8 carries loss
    for bptt, reaches in [(Bptt.full, True), (Bptt.truncated, False)]:
        backward_sequence(model, tokens, mask, tunable(), 8, bptt)
        g = grads_of(tunable)
        assert all(bool(t.abs().sum() > 0) == reaches for t in g.values()), bptt


def test_full_bptt_with_activation_checkpoint_and_an_encoder(tiny_ckpt):
    model = statetune.load_model(tiny_ckpt("rwkv7"))
    tunable = TunableState(model.zero_state(1), StateTuningConfig(param="encoder", encoder_in=4, encoder_hidden=8),
                           seed=1)
    with torch.no_grad():
        tunable.encoder.ln2_w.normal_()  # leave the zero start, so every encoder weight gets a gradient
    tokens, mask = batch([19, 19, 11], model.config.vocab_size, seed=3)
    loss, _, _ = masked_lm_loss(model, tokens, mask, tunable())
    loss.backward()
    want = grads_of(tunable)
    backward_sequence(model, tokens, mask, tunable(), 5, Bptt.full, activation_checkpoint=True)
    got = grads_of(tunable)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
def test_truncated_is_the_first_segment_alone(tiny_ckpt, version):
    model = statetune.load_model(tiny_ckpt(version))
    tunable = random_tunable(model, tune_shift=True)
    tokens, mask = batch([21, 14], model.config.vocab_size, seed=1)
    first, _, _ = masked_lm_loss(model, tokens[:, :6], mask[:, :6], tunable())
    first.backward()
    want = grads_of(tunable)
    total, n = backward_sequence(model, tokens, mask, tunable(), 5, Bptt.truncated)
    got = grads_of(tunable)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    # the reported loss still counts every segment, as evaluation does
    ref_total, ref_n = sequence_loss(model, tokens, mask, tunable(), 5)
    assert n == ref_n == int(mask[:, 1:].sum())
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)


class _SegmentedLoss(torch.autograd.Function):
    """The segmented loss as a function of the initial state: forward is evaluation's loop, backward is
    the reverse sweep of full BPTT; gradcheck compares the sweep with finite differences of the loop."""

    @staticmethod
    def forward(ctx, model, tokens, mask, ctx_len, att, wkv, ffn):
        ctx.model, ctx.tokens, ctx.mask, ctx.ctx_len = model, tokens, mask, ctx_len
        ctx.save_for_backward(att, wkv, ffn)
        total, _ = sequence_loss(model, tokens, mask, RWKVState(att, wkv, ffn), ctx_len)
        return torch.tensor(total, dtype=torch.float64)

    @staticmethod
    def backward(ctx, g):
        leaves = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            backward_sequence(ctx.model, ctx.tokens, ctx.mask, RWKVState(*leaves), ctx.ctx_len, Bptt.full,
                              scale=float(g))
        return None, None, None, None, *(t.grad for t in leaves)


@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
def test_float64_gradcheck_on_two_segments(tiny_ckpt, version):
    model = statetune.load_model(tiny_ckpt(version), dtype=torch.float64)
    tokens, mask = batch([9], model.config.vocab_size, seed=2)
    mask[:, 1:] = True
    assert len(segments(9, 5)) == 2
    g = torch.Generator().manual_seed(4)
    s0 = model.zero_state(1)
    att, wkv, ffn = (torch.randn(t.shape, generator=g, dtype=torch.float64).mul_(0.3).requires_grad_()
                     for t in s0.tensors())
    assert torch.autograd.gradcheck(lambda a, w, f: _SegmentedLoss.apply(model, tokens, mask, 5, a, w, f),
                                    (att, wkv, ffn), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


# -- from the command line ------------------------------------------------------------------------------


def write_long(root: Path, n: int = 6, seed: int = 0) -> Path:
    """Byte-token records of 150-260 tokens with loss tokens in runs spread over the whole record."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        length = rng.randint(150, 260)
        ids = [rng.randint(1, 255) for _ in range(length)]
        mask = [1 if (t // 20) % 2 else 0 for t in range(length)]
        lines.append(json.dumps({"text": ids, "mask": mask}))
    path = root / "long.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def long_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    model = write_checkpoint(root / "m.pth", "rwkv7", n_layer=2, n_embd=32, head_size=16, vocab_size=300,
                             dim_ffn=64, seed=3)
    return model, write_long(root)


def _train_args(long_task, out: Path, *extra: str) -> list[str]:
    model, data = long_task
    return ["train", "--model", str(model), "--train-data", str(data), "--out", str(out), "--batch-size", "3",
            "--no-progress", "--threads", "1", *extra]


def _grad_norm(out: Path) -> float:
    (event,) = [e for e in read_metrics(out / "metrics.jsonl") if e["type"] == "train"]
    return event["grad_norm"]


@pytest.mark.slow
def test_cli_grad_norm_does_not_depend_on_ctx_len(long_task, tmp_path):
    for ctx in ("8", "64", "4096"):  # 4096: longer than every record, one unsegmented pass
        assert main(_train_args(long_task, tmp_path / ctx, "--max-steps", "1", "--ctx-len", ctx)) == 0
    one_pass = _grad_norm(tmp_path / "4096")
    assert one_pass > 0
    for ctx in ("8", "64"):
        assert abs(_grad_norm(tmp_path / ctx) - one_pass) <= 1e-4 * one_pass, (ctx, _grad_norm(tmp_path / ctx))
    assert main(_train_args(long_task, tmp_path / "cut", "--max-steps", "1", "--ctx-len", "8",
                            "--bptt", "truncated")) == 0
    cut = _grad_norm(tmp_path / "cut")
    assert abs(cut - one_pass) > 0.05 * one_pass, (cut, one_pass)  # the state learns from 8 tokens only
    cfg = tomllib.loads((tmp_path / "64" / "config.toml").read_text())
    assert cfg["bptt"] == "full" and cfg["ctx_len"] == 64
    trained = statetune.load_state(tmp_path / "cut" / "state-final.safetensors").metadata["trained"]
    assert trained["bptt"] == "truncated" and trained["ctx_len"] == 8


@pytest.mark.slow
def test_gradient_accumulation_averages_over_the_global_batch(long_task, tmp_path):
    """One batch of 6, two micro-batches of 3, three of 2: the same global batch, the same gradient."""
    for bs, accum in [(6, 1), (3, 2), (2, 3)]:
        args = _train_args(long_task, tmp_path / f"{bs}x{accum}", "--max-steps", "1", "--ctx-len", "16",
                           "--grad-accum", str(accum))
        args[args.index("--batch-size") + 1] = str(bs)
        assert main(args) == 0
    norms = [_grad_norm(tmp_path / name) for name in ("6x1", "3x2", "2x3")]
    assert all(abs(n - norms[0]) <= 1e-4 * norms[0] for n in norms), norms


@pytest.mark.slow
def test_two_processes_match_one_with_full_bptt(long_task, tmp_path):
    one = _train_args(long_task, tmp_path / "one", "--max-steps", "2", "--ctx-len", "16")
    one[one.index("--batch-size") + 1] = "6"
    assert main(one) == 0
    two = _train_args(long_task, tmp_path / "two", "--max-steps", "2", "--ctx-len", "16")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "statetune", *two], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    a = statetune.load_state(tmp_path / "one" / "state-final.safetensors").state
    b = statetune.load_state(tmp_path / "two" / "state-final.safetensors").state
    torch.testing.assert_close(a.wkv, b.wkv, atol=1e-5, rtol=1e-4)
    assert a.wkv.abs().sum() > 0


def test_bad_bptt_value_is_a_one_line_error(long_task, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(_train_args(long_task, tmp_path / "x", "--bptt", "sometimes"))
    assert e.value.code == 2 and "--bptt" in capsys.readouterr().err


def test_a_run_from_before_bptt_resumes_truncated(long_task, tmp_path):
    model, data = long_task
    (tmp_path / "config.toml").write_text(f'model = "{model}"\ntrain_data = "{data}"\nctx_len = 64\n')
    assert resumed_config(tmp_path, {}).bptt == Bptt.truncated
    (tmp_path / "config.toml").write_text(f'model = "{model}"\ntrain_data = "{data}"\nbptt = "full"\n')
    assert resumed_config(tmp_path, {}).bptt == Bptt.full


@pytest.mark.slow
def test_sigkill_resume_is_bit_identical_with_full_bptt(long_task, tmp_path):
    common = _train_args(long_task, tmp_path / "full", "--max-steps", "5", "--save-every", "2", "--ctx-len", "48")
    def cli(args, env=None):
        return subprocess.run([sys.executable, "-m", "statetune", *args], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, cwd=REPO, timeout=300)
    assert cli(common).returncode == 0
    cut_args = [a if a != str(tmp_path / "full") else str(tmp_path / "cut") for a in common]
    assert cli(cut_args, env={"STATETUNE_KILL_AT_STEP": "3"}).returncode == -9
    resumed = cli(["train", "--resume", str(tmp_path / "cut"), "--threads", "1"])
    assert resumed.returncode == 0, resumed.stderr
    a = statetune.load_state(tmp_path / "full" / "state-final.safetensors").state
    b = statetune.load_state(tmp_path / "cut" / "state-final.safetensors").state
    assert torch.equal(a.wkv, b.wkv)
    assert statetune.load_state(tmp_path / "cut" / "state-final.safetensors").metadata["trained"]["bptt"] == "full"


# -- long chats through prepare ----------------------------------------------------------------------------


@pytest.mark.slow
def test_fifty_turn_chat_trains_on_every_assistant_turn(tiny_ckpt, tmp_path):
    from statetune.commands.prepare import PrepareOptions, prepare

    turns = []
    for i in range(50):
        turns += [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": f"a{i}."}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": turns}) + "\n")
    assert prepare(PrepareOptions(inputs=[str(tmp_path / "chat.jsonl")], out=str(tmp_path / "p"),
                                  tokenizer="bytes")) == 0
    data = TokenDataset(tmp_path / "p.jsonl", 300)
    ex = data[0]
    runs, start = [], None  # maximal runs of loss tokens, decoded
    for t, m in enumerate([*ex.mask, 0]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            runs.append(bytes(i - 1 for i in ex.ids[start:t]).decode())
            start = None
    assert runs == [f" a{i}.\n\n" for i in range(50)]

    model = statetune.load_model(tiny_ckpt("rwkv7"))
    tunable = random_tunable(model, tune_shift=False)
    tokens, mask = collate([ex])
    assert len(segments(tokens.shape[1], 64)) > 10
    loss, _, _ = masked_lm_loss(model, tokens, mask, tunable())
    loss.backward()
    want = grads_of(tunable)["wkv"]
    backward_sequence(model, tokens, mask, tunable(), 64, Bptt.full)
    torch.testing.assert_close(grads_of(tunable)["wkv"], want, rtol=1e-4, atol=1e-6)
    last = mask.clone()
    last[:, : int(mask[0].nonzero()[-7])] = False  # the last assistant turn alone
    backward_sequence(model, tokens, last, tunable(), 64, Bptt.full)
    assert grads_of(tunable)["wkv"].abs().sum() > 0
