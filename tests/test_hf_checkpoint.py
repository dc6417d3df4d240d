"""Hugging Face model directories: read as produced by the ``rwkv7-hf`` converter, checked against the
official file and against ``rwkv7-hf``'s own pure-PyTorch model, converted both ways, and refused clearly
when broken."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from state_compare import assert_states_close, random_state

import statetune
from statetune.cli import main
from statetune.errors import CheckpointError
from statetune.model.checkpoint import read_state_dict, read_vocab_size, read_weights
from statetune.model.convert import convert_checkpoint
from statetune.model.hf import read_hf_tensors
from statetune.model.state import RWKVState

EXACT = dict(atol=1e-5, rtol=0)


def _tokens(vocab: int, shape=(2, 9), seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def rwkv7_hf_dir(official_ckpt, tmp_path_factory):
    """The official tiny RWKV-7 file converted by the ``rwkv7-hf`` package's own converter (fp32)."""
    converter = pytest.importorskip("rwkv7_hf.converter", reason="needs the hf-test extra (rwkv7-hf)")
    out = tmp_path_factory.mktemp("rwkv7hf") / "model"
    converter.main(["--input", str(official_ckpt("rwkv7")), "--output", str(out), "--precision", "fp32"])
    return out


@pytest.fixture
def our_hf_dir(tiny_ckpt, tmp_path):
    """A tiny RWKV-7 written as an HF directory by statetune itself (no test extra needed)."""
    return convert_checkpoint(tiny_ckpt("rwkv7"), tmp_path / "hf", "hf")


def test_rwkv7_hf_conversion_matches_official_file(official_ckpt, rwkv7_hf_dir):
    official = statetune.load_model(official_ckpt("rwkv7"))
    hf = statetune.load_model(rwkv7_hf_dir)
    assert hf.config == dataclasses.replace(official.config, layer0_has_v=False)
    assert hf.fingerprint() == official.fingerprint()
    tokens, state = _tokens(65536), random_state(official, 2, seed=4)
    (la, sa), (lb, sb) = official(tokens, state), hf(tokens, state)
    torch.testing.assert_close(lb, la, **EXACT)
    assert_states_close(sb, sa, **EXACT)


def test_matches_rwkv7_hf_reference_model(rwkv7_hf_dir):
    rwkv7_hf = pytest.importorskip("rwkv7_hf")
    ref = rwkv7_hf.RWKV7ForCausalLM.from_pretrained(str(rwkv7_hf_dir), dtype=torch.float32).eval()
    ours = statetune.load_model(rwkv7_hf_dir)
    tokens = _tokens(65536, (2, 11), seed=5)
    with torch.no_grad():
        out = ref(input_ids=tokens, use_cache=True)
    logits, state = ours(tokens)
    torch.testing.assert_close(logits, out.logits.float(), atol=1e-4, rtol=0)
    cache = out.past_key_values
    for i in range(ours.config.n_layer):
        # rwkv7-hf keeps the WKV state as [B, H, key, value]; statetune as [B, H, value, key]
        torch.testing.assert_close(state.wkv[i], cache.recurrent_state[i].float().transpose(-1, -2),
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(state.att_shift[i], cache.attention_shift[i].float(), atol=1e-4, rtol=0)
        torch.testing.assert_close(state.ffn_shift[i], cache.ffn_shift[i].float(), atol=1e-4, rtol=0)


def test_our_hf_writer_loads_strictly_in_rwkv7_hf(official_ckpt, tmp_path):
    rwkv7_hf = pytest.importorskip("rwkv7_hf")
    out = convert_checkpoint(official_ckpt("rwkv7"), tmp_path / "hf", "hf", max_shard_bytes=20_000_000)
    assert (out / "model.safetensors.index.json").is_file()
    config = rwkv7_hf.RWKV7Config(**json.loads((out / "config.json").read_text()))
    ref = rwkv7_hf.RWKV7ForCausalLM(config)
    ref.load_state_dict(read_hf_tensors(out), strict=True)
    tokens = _tokens(65536, (1, 7), seed=6)
    with torch.no_grad():
        expect = ref.eval()(input_ids=tokens).logits
    torch.testing.assert_close(statetune.load_model(official_ckpt("rwkv7"))(tokens)[0], expect,
                               atol=1e-4, rtol=0)


def test_hf_to_pth_to_hf_is_exact(rwkv7_hf_dir, tmp_path):
    pth = convert_checkpoint(rwkv7_hf_dir, tmp_path / "back.pth", "pth")
    again = convert_checkpoint(pth, tmp_path / "again", "hf")
    a, b = read_hf_tensors(rwkv7_hf_dir), read_hf_tensors(again)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("layer0_has_v", [False, True])
def test_pth_to_hf_to_pth_round_trip(tmp_path, layer0_has_v):
    from statetune.model.random_init import random_checkpoint

    sd = random_checkpoint("rwkv7", n_layer=2, n_embd=32, head_size=16, vocab_size=97, seed=7,
                           lora={"w": 5, "a": 6, "v": 7, "g": 9}, layer0_has_v=layer0_has_v)
    torch.save(sd, tmp_path / "m.pth")
    convert_checkpoint(tmp_path / "m.pth", tmp_path / "hf", "hf")
    back = read_state_dict(convert_checkpoint(tmp_path / "hf", tmp_path / "back.pth", "pth"))
    # block 0's value-residual weights are never used by the model and have no HF name: they are dropped
    dropped = {f"blocks.0.att.v{i}" for i in range(3)} if layer0_has_v else set()
    assert set(back) == set(sd) - dropped
    for k, v in back.items():
        assert v.shape == sd[k].shape and torch.equal(v, sd[k]), k
    tokens = _tokens(97, seed=8)
    torch.testing.assert_close(statetune.load_model(tmp_path / "back.pth")(tokens)[0],
                               statetune.load_model(tmp_path / "m.pth")(tokens)[0], atol=0, rtol=0)


def test_sharded_and_safetensors_outputs(tiny_ckpt, tmp_path):
    src = tiny_ckpt("rwkv7")
    sharded = convert_checkpoint(src, tmp_path / "hf", "hf", max_shard_bytes=4000)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert read_vocab_size(sharded) == 300
    st = convert_checkpoint(sharded, tmp_path / "m.safetensors", "pth")
    tokens = _tokens(300, seed=9)
    expect = statetune.load_model(src)(tokens)[0]
    for path in (sharded, st):
        torch.testing.assert_close(statetune.load_model(path)(tokens)[0], expect, atol=0, rtol=0)


def test_states_trained_on_either_layout_are_interchangeable(official_ckpt, tmp_path):
    src = official_ckpt("rwkv7")
    hf_dir = convert_checkpoint(src, tmp_path / "hf", "hf")
    tokens = _tokens(65536, (1, 12), seed=10)
    trained = []
    for path in (src, hf_dir):
        model = statetune.load_model(path)
        wkv = torch.zeros_like(model.zero_state(1).wkv, requires_grad=True)
        opt = torch.optim.Adam([wkv], lr=0.05)
        for _ in range(3):
            zero = model.zero_state(1)
            logits, _ = model(tokens[:, :-1], RWKVState(zero.att_shift, wkv, zero.ffn_shift))
            loss = torch.nn.functional.cross_entropy(logits[0], tokens[0, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained.append((model, wkv.detach()))
    (official, s_official), (hf, s_hf) = trained
    torch.testing.assert_close(s_hf, s_official, **EXACT)
    zero = hf.zero_state(1)
    statetune.save_state(tmp_path / "s.safetensors", RWKVState(zero.att_shift, s_hf, zero.ffn_shift), hf)
    sf = statetune.load_state(tmp_path / "s.safetensors", official)  # checks the fingerprint
    torch.testing.assert_close(sf.state.wkv, s_hf)


def test_packed_token_mix_vectors_load(our_hf_dir, tiny_ckpt):
    path = our_hf_dir / "model.safetensors"
    sd = load_file(str(path))
    for i in range(2):
        p = f"model.layers.{i}.attn."
        sd[p + "x_x"] = torch.cat([sd.pop(p + f"x_{c}").reshape(1, -1) for c in "rwkvag"])
    save_file(sd, str(path))
    tokens = _tokens(300, seed=11)
    torch.testing.assert_close(statetune.load_model(our_hf_dir)(tokens)[0],
                               statetune.load_model(tiny_ckpt("rwkv7"))(tokens)[0], atol=0, rtol=0)


def test_cli_converts_both_ways(tiny_ckpt, tmp_path, capsys):
    assert main(["model", "convert", str(tiny_ckpt("rwkv7")), str(tmp_path / "hf")]) == 0
    assert main(["model", "convert", str(tmp_path / "hf"), str(tmp_path / "m.pth")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["model", "convert", str(tiny_ckpt("rwkv7")), str(tmp_path / "hf")]) == 1  # exists: runtime error
    assert "already exists" in capsys.readouterr().err


# -- errors --------------------------------------------------------------------------------------------------
def test_missing_shard_is_named(tiny_ckpt, tmp_path):
    out = convert_checkpoint(tiny_ckpt("rwkv7"), tmp_path / "hf", "hf", max_shard_bytes=4000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard '{victim.name}'.*is missing"):
        statetune.load_model(out)


def test_config_disagreeing_with_shapes(our_hf_dir):
    cfg = json.loads((our_hf_dir / "config.json").read_text())
    cfg["hidden_size"], cfg["num_hidden_layers"] = 64, 5
    (our_hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_size is 64 but the tensors say 16; num_hidden_layers is 5"):
        statetune.load_model(our_hf_dir)


def test_unknown_key_is_named(our_hf_dir):
    path = our_hf_dir / "model.safetensors"
    sd = load_file(str(path))
    sd["model.layers.1.attn.mystery"] = torch.zeros(3)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="model.layers.1.attn.mystery"):
        statetune.load_model(our_hf_dir)


def test_directory_without_config_or_weights(our_hf_dir, tmp_path):
    with pytest.raises(CheckpointError, match="needs config.json"):
        statetune.load_model(tmp_path)
    (our_hf_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        statetune.load_model(our_hf_dir)


def test_other_model_types_are_refused(our_hf_dir):
    cfg = json.loads((our_hf_dir / "config.json").read_text())
    (our_hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        statetune.load_model(our_hf_dir)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_integer_quantised_weights_are_refused(tiny_ckpt, tmp_path, dtype):
    sd = read_weights(tiny_ckpt("rwkv7"))
    sd["blocks.0.att.key.weight"] = sd["blocks.0.att.key.weight"].mul(100).to(dtype)
    torch.save(sd, tmp_path / "q.pth")
    with pytest.raises(CheckpointError, match=r"integer \(quantised\) weights, e.g. blocks.0.att.key.weight"):
        statetune.load_model(tmp_path / "q.pth")


def test_rwkv6_and_merged_states_are_not_written_as_hf(tiny_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="RWKV-7 only"):
        convert_checkpoint(tiny_ckpt("rwkv6"), tmp_path / "hf6", "hf")
    sd = read_weights(tiny_ckpt("rwkv7"))
    sd["blocks.0.att.time_state"] = torch.zeros(2, 8, 8)
    sd["blocks.1.att.time_state"] = torch.zeros(2, 8, 8)
    torch.save(sd, tmp_path / "merged.pth")
    with pytest.raises(CheckpointError, match="merged state"):
        convert_checkpoint(tmp_path / "merged.pth", tmp_path / "hf7", "hf")
    assert not (tmp_path / "hf7").exists() and not list(tmp_path.glob(".hf*"))


def test_commands_take_an_hf_directory_as_model(tiny_ckpt, our_hf_dir, capsys):
    outs = []
    for model in (tiny_ckpt("rwkv7"), our_hf_dir):
        assert main(["generate", "--model", str(model), "--prompt", "Hi", "--max-tokens", "6", "--temperature", "0",
                     "--tokenizer", "bytes"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()
