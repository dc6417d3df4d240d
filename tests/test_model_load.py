"""Loading official checkpoints: formats, sizes from shapes, merged states, and clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import LORA
from safetensors.torch import save_file

import statetune
from statetune.errors import CheckpointError
from statetune.model.random_init import random_checkpoint
from statetune.model.state import RWKVState


@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
def test_sizes_are_read_from_shapes(tmp_path, version):
    sd = random_checkpoint(version, n_layer=3, n_embd=96, head_size=32, vocab_size=301, dim_ffn=200,
                           lora=LORA[version])
    torch.save(sd, tmp_path / "m.pth")
    cfg = statetune.load_model(tmp_path / "m.pth").config
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size) == (version, 3, 96, 3, 32)
    assert (cfg.vocab_size, cfg.dim_ffn) == (301, 200)
    assert cfg.lora == LORA[version] if version == "rwkv6" else cfg.lora == {"w": 23, "a": 19, "g": 37, "v": 13}


def test_safetensors_and_pth_load_the_same(tmp_path, tiny_ckpt):
    sd = torch.load(tiny_ckpt("rwkv7"), weights_only=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    a = statetune.load_model(tiny_ckpt("rwkv7"))
    b = statetune.load_model(tmp_path / "m.safetensors")
    tokens = torch.tensor([[1, 2, 3]])
    # bf16 storage rounds the weights, so only closeness is expected; the fingerprint ignores storage dtype
    torch.testing.assert_close(a(tokens)[0], b(tokens)[0], atol=0.1, rtol=0.1)
    assert b.fingerprint() == statetune.load_model(tmp_path / "m.safetensors").fingerprint()


def test_layer0_without_value_residual_weights(tmp_path):
    sd = random_checkpoint("rwkv7", n_layer=2, n_embd=16, head_size=8, vocab_size=50, layer0_has_v=False)
    torch.save(sd, tmp_path / "m.pth")
    model = statetune.load_model(tmp_path / "m.pth")
    assert not hasattr(model.blocks[0].att, "v1") and model.config.layer0_has_v is False


def test_weights_are_frozen(tiny_ckpt):
    model = statetune.load_model(tiny_ckpt("rwkv6"))
    assert not any(p.requires_grad for p in model.parameters())


def test_time_state_becomes_default_state(tmp_path, tiny_ckpt):
    sd = torch.load(tiny_ckpt("rwkv6"), weights_only=True)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        sd[f"blocks.{i}.att.time_state"] = torch.randn(2, 8, 8, generator=g)
    torch.save(sd, tmp_path / "merged.pth")
    model = statetune.load_model(tmp_path / "merged.pth")
    assert model.default_state is not None
    torch.testing.assert_close(model.default_state.wkv[1, 0], sd["blocks.1.att.time_state"])
    tokens = torch.tensor([[4, 5]])
    zeros, _ = model(tokens, None)
    plain, _ = statetune.load_model(tiny_ckpt("rwkv6"))(tokens, None)
    torch.testing.assert_close(zeros, plain)  # None always means zeros
    with_state, _ = model(tokens, model.default_state)
    assert not torch.allclose(with_state, zeros)


@pytest.mark.slow
def test_gradients_reach_the_initial_state_float64(tiny_ckpt):
    model = statetune.load_model(tiny_ckpt("rwkv7"), dtype=torch.float64)
    model.set_wkv_impl("reference")
    tokens = torch.tensor([[3, 1, 4, 1, 5]])
    g = torch.Generator().manual_seed(1)
    s = model.zero_state(1)
    att = (torch.randn(s.att_shift.shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    wkv = (torch.randn(s.wkv.shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    ffn = (torch.randn(s.ffn_shift.shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_()

    def f(a, w, c):
        logits, new = model(tokens, RWKVState(a, w, c))
        return logits[0, -1, :7], new.wkv[-1, 0, 0, :2]

    assert torch.autograd.gradcheck(f, (att, wkv, ffn), eps=1e-6, atol=1e-5)


@pytest.mark.slow
def test_rwkv6_gradcheck_float64(tiny_ckpt):
    model = statetune.load_model(tiny_ckpt("rwkv6"), dtype=torch.float64)
    model.set_wkv_impl("reference")
    s = model.zero_state(1)
    wkv = (torch.randn(s.wkv.shape, dtype=torch.float64) * 0.5).requires_grad_()
    att = torch.randn(s.att_shift.shape, dtype=torch.float64).requires_grad_()

    def f(a, w):
        return model(torch.tensor([[7, 8, 9]]), RWKVState(a, w, s.ffn_shift))[0][0, :, :5]

    assert torch.autograd.gradcheck(f, (att, wkv), eps=1e-6, atol=1e-5)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        statetune.load_model(tmp_path / "nope.pth")


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "junk.pth"
    p.write_text("hello")
    with pytest.raises(CheckpointError, match="junk.pth: not a PyTorch tensor checkpoint"):
        statetune.load_model(p)


def test_pickled_objects_are_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "obj": object()}, p)
    with pytest.raises(CheckpointError, match="weights_only"):
        statetune.load_model(p)


def test_unknown_architecture(tmp_path):
    torch.save({"emb.weight": torch.zeros(4, 8), "blocks.0.att.key.weight": torch.zeros(8, 8)},
               tmp_path / "v4.pth")
    with pytest.raises(CheckpointError, match="unknown architecture"):
        statetune.load_model(tmp_path / "v4.pth")


def test_missing_and_unexpected_keys(tmp_path, tiny_ckpt):
    sd = torch.load(tiny_ckpt("rwkv7"), weights_only=True)
    del sd["blocks.1.ffn.x_k"]
    sd["blocks.0.att.mystery"] = torch.zeros(3)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.ffn\.x_k.*unexpected keys: "
                                              r"blocks\.0\.att\.mystery"):
        statetune.load_model(tmp_path / "m.pth")


def test_inconsistent_shapes(tmp_path, tiny_ckpt):
    sd = torch.load(tiny_ckpt("rwkv7"), weights_only=True)
    sd["blocks.1.att.key.weight"] = torch.zeros(16, 15)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.att\.key\.weight has shape \(16, 15\)"):
        statetune.load_model(tmp_path / "m.pth")


@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
def test_decode_layout_changes_memory_order_only(tiny_ckpt, version):
    model = statetune.load_model(tiny_ckpt(version))
    tokens = torch.tensor([[5, 17, 230, 9], [1, 2, 3, 4]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits, state = model(tokens, None)
    step, _ = model(tokens[:, :1], None)
    assert model.use_decode_layout() is model
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert model.head.weight.stride() == (1, model.config.vocab_size)  # [in, out] in memory
    assert model.blocks[0].ffn.key.weight.stride() == (1, model.config.dim_ffn)
    assert not any(p.requires_grad for p in model.parameters())
    logits2, state2 = model(tokens, None)
    step2, _ = model(tokens[:, :1], None)
    torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step2, step, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state2.wkv, state.wkv, atol=1e-5, rtol=1e-5)
