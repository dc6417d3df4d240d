"""The transformers-native ``Rwkv7ForCausalLM`` layout (official names under ``model.``, ``head.weight``
outside, block 0's ``v0/v1/v2`` dropped): written by ``model convert --layout transformers``, read wherever
``--model`` is, told apart from the fla layout by ``config.json`` alone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import statetune
from statetune.cli import main
from statetune.errors import CheckpointError
from statetune.model.checkpoint import read_state_dict, read_vocab_size
from statetune.model.convert import convert_checkpoint
from statetune.model.hf import read_hf_tensors


def _tokens(vocab: int, shape=(2, 9), seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tf_dir(tiny_ckpt, tmp_path):
    return convert_checkpoint(tiny_ckpt("rwkv7"), tmp_path / "tf", "hf", layout="transformers", tokenizer="none")


def test_names_shapes_and_config(official_ckpt, tmp_path):
    src = official_ckpt("rwkv7")
    out = convert_checkpoint(src, tmp_path / "tf", "hf", layout="transformers", tokenizer="none")
    official, written = read_state_dict(src), read_hf_tensors(out)
    unused = {f"blocks.0.att.v{i}" for i in range(3)}
    expect = {("head.weight" if k == "head.weight" else "model." + k): v for k, v in official.items()
              if k not in unused}
    assert sorted(written) == sorted(expect)
    for k, v in expect.items():  # the official shapes, untouched ([1, 1, C] mixes, [C, r] low-rank factors)
        assert written[k].shape == v.shape and torch.equal(written[k], v), k
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Rwkv7ForCausalLM"] and config["model_type"] == "rwkv7"
    assert {k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim",
                                   "num_attention_heads", "attention_hidden_size", "intermediate_size",
                                   "layer_norm_epsilon", "deep_embedding_size", "tie_word_embeddings",
                                   "eos_token_id", "pad_token_id")} == {
        "vocab_size": 65536, "hidden_size": 128, "num_hidden_layers": 3, "head_dim": 64,
        "num_attention_heads": 2, "attention_hidden_size": 128, "intermediate_size": 512,
        "layer_norm_epsilon": 1e-5, "deep_embedding_size": 0, "tie_word_embeddings": False,
        "eos_token_id": 0, "pad_token_id": 0}
    lora = {k: official[f"blocks.1.att.{c}1"].shape[1] for k, c in
            (("decay_low_rank_dim", "w"), ("a_low_rank_dim", "a"), ("value_low_rank_dim", "v"),
             ("gate_low_rank_dim", "g"))}
    assert {k: config[k] for k in lora} == lora


def test_round_trip_same_logits_and_fingerprint(official_ckpt, tmp_path):
    src = official_ckpt("rwkv7")
    out = convert_checkpoint(src, tmp_path / "tf", "hf", layout="transformers", max_shard_bytes=20_000_000,
                             tokenizer="none")
    assert (out / "model.safetensors.index.json").is_file() and read_vocab_size(out) == 65536
    ref, ours = statetune.load_model(src), statetune.load_model(out)
    assert ours.fingerprint() == ref.fingerprint()
    tokens = _tokens(65536)
    torch.testing.assert_close(ours(tokens)[0], ref(tokens)[0], atol=0, rtol=0)


def test_between_layouts_is_exact(tf_dir, tmp_path):
    fla = convert_checkpoint(tf_dir, tmp_path / "fla", "hf", layout="fla", tokenizer="none")
    again = convert_checkpoint(fla, tmp_path / "tf2", "hf", layout="transformers", tokenizer="none")
    a, b = read_hf_tensors(tf_dir), read_hf_tensors(again)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    back = read_state_dict(convert_checkpoint(again, tmp_path / "m.pth", "pth"))
    assert sorted(back) == sorted(k.removeprefix("model.") for k in a)


def test_cli_layout_flag_and_commands_read_it(tiny_ckpt, tmp_path, capsys):
    src = str(tiny_ckpt("rwkv7"))
    assert main(["model", "convert", src, str(tmp_path / "tf"), "--layout", "transformers"]) == 0
    assert "transformers layout" in capsys.readouterr().out
    assert main(["model", "convert", src, str(tmp_path / "x"), "--layout", "llama"]) == 2
    assert "--layout: unknown layout 'llama'" in capsys.readouterr().err
    outs = []
    for model in (src, str(tmp_path / "tf")):
        assert main(["generate", "--model", model, "--prompt", "Hi", "--max-tokens", "6", "--temperature", "0",
                     "--tokenizer", "bytes"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()


def _edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (directory / "config.json").write_text(json.dumps(cfg))


def test_detected_by_fields_without_architectures(tf_dir, tiny_ckpt):
    _edit_config(tf_dir, architectures=None)
    tokens = _tokens(300)
    torch.testing.assert_close(statetune.load_model(tf_dir)(tokens)[0],
                               statetune.load_model(tiny_ckpt("rwkv7"))(tokens)[0], atol=0, rtol=0)


# -- errors --------------------------------------------------------------------------------------------------
def test_layout_cannot_be_told(tf_dir):
    _edit_config(tf_dir, architectures=None, value_low_rank_dim=None, wkv_mode=None, layer_norm_epsilon=None,
                 deep_embedding_size=None)
    with pytest.raises(CheckpointError, match="cannot tell the layout"):
        statetune.load_model(tf_dir)


def test_unknown_architecture(tf_dir):
    _edit_config(tf_dir, architectures=["LlamaForCausalLM"])
    with pytest.raises(CheckpointError, match=r"architectures is \['LlamaForCausalLM'\]"):
        statetune.load_model(tf_dir)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("value_low_rank_dim", 99, "value_low_rank_dim is 99 but the tensors say"),
    ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon is 1e-06"),
    ("deep_embedding_size", 32, "without DeepEmbed only"),
])
def test_config_disagreeing(tf_dir, field, value, message):
    _edit_config(tf_dir, **{field: value})
    with pytest.raises(CheckpointError, match=message):
        statetune.load_model(tf_dir)


def test_key_outside_model_prefix(tf_dir):
    path = tf_dir / "model.safetensors"
    sd = load_file(str(path))
    sd["lm_head.weight"] = sd["head.weight"].clone()
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="outside 'model.' in a transformers-layout directory: lm_head.weight"):
        statetune.load_model(tf_dir)
