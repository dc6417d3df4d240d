"""A tuned state as a Hugging Face RWKV-7 cache: ``generate()`` of rwkv7-hf's pure-PyTorch model from the
converted cache gives statetune's own greedy tokens, token for token; the zero state gives what no cache
gives; the conversion round-trips and matches the state statetune's model reaches; misfits are refused."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import write_checkpoint
from state_compare import assert_states_close, random_state

import statetune
from statetune.errors import StateFileError
from statetune.infer.engine import Engine
from statetune.infer.sampling import SamplingParams
from statetune.model.state import RWKVState
from statetune.tokenizer import get_tokenizer
from statetune.tuning.hf_cache import generate_with_state, hf_cache_to_state, state_to_hf_cache
from statetune.tuning.statefile import save_state

pytest.importorskip("rwkv7_hf", reason="needs the hf-test extra (rwkv7-hf, transformers)")

N_NEW = 20
PROMPT = [72, 101, 108, 108, 111, 33, 11]
EOS = 0  # the converted generation_config's eos_token_id; the engine is told to stop there too


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A 3-layer RWKV-7 with the byte tokenizer's 257 ids (so statetune's engine samples from the same
    vocabulary as ``generate()``), converted by rwkv7-hf's own converter in fp32."""
    from rwkv7_hf import converter

    root = tmp_path_factory.mktemp("hfcache")
    ckpt = write_checkpoint(root / "m.pth", "rwkv7", n_layer=3, n_embd=32, head_size=16, vocab_size=257,
                            dim_ffn=64, seed=9)
    converter.main(["--input", str(ckpt), "--output", str(root / "hf"), "--precision", "fp32"])
    return root / "hf"


@pytest.fixture(scope="module")
def models(hf_dir):
    """(statetune's model, rwkv7-hf's installed ``RWKV7ForCausalLM``) on the same weights."""
    from rwkv7_hf import RWKV7ForCausalLM

    return statetune.load_model(hf_dir), RWKV7ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def _state(model, shift: bool, seed: int = 4) -> RWKVState:
    s = random_state(model, 1, seed)
    return s if shift else RWKVState(torch.zeros_like(s.att_shift), s.wkv, torch.zeros_like(s.ffn_shift))


def _engine_greedy(model, prompts: list[list[int]], state: RWKVState | None) -> list[list[int]]:
    """What ``statetune generate --temperature 0`` decodes: the engine's greedy tokens for each prompt."""
    engine = Engine(model, get_tokenizer("bytes"))
    params = SamplingParams(temperature=0, max_tokens=N_NEW, stop_token_ids=[EOS])
    ids = [engine.add(p, state, params) for p in prompts]
    done: dict[int, list[int]] = {}
    while len(done) < len(ids):
        done.update({d.seq_id: d.completion.tokens for d in engine.step() if d.finished})
    return [done[i] for i in ids]


def _new_tokens(out: torch.Tensor, prompt_len: int) -> list[list[int]]:
    """Each row's generated ids, up to and including the first end token (generate pads after it)."""
    rows = []
    for row in out[:, prompt_len:].tolist():
        rows.append(row[:row.index(EOS) + 1] if EOS in row else row)
    return rows


@pytest.mark.slow  # rwkv7-hf's reference model is slow on CPU: seconds per test
@pytest.mark.parametrize("shift", [False, True], ids=["wkv-only", "with-shift"])
def test_generate_from_state_matches_engine(models, shift):
    ours, hf = models
    state = _state(ours, shift)
    expect = _engine_greedy(ours, [PROMPT], state)[0]
    assert len(expect) >= 10  # a long enough run to compare (the seeds are fixed)
    out = generate_with_state(hf, state, PROMPT, max_new_tokens=N_NEW, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    seq = out.sequences
    assert seq[0, :len(PROMPT)].tolist() == PROMPT
    assert _new_tokens(seq, len(PROMPT))[0] == expect
    # and every step's logits are statetune's from the same state (greedy tokens alone can agree by chance
    # on a random model whose next token mostly follows the last one)
    logits, _ = ours(seq[:, :-1], state)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), logits[:, len(PROMPT) - 1:], atol=2e-3, rtol=0)
    # the state matters: from zeros the same prompt continues differently
    assert _engine_greedy(ours, [PROMPT], None)[0] != expect
    assert "prepare_inputs_for_generation" not in vars(hf)  # the call's adapter is gone again


@pytest.mark.slow
def test_zero_state_gives_the_same_as_no_cache(models):
    ours, hf = models
    with torch.no_grad():
        plain = hf.generate(torch.tensor([PROMPT]), max_new_tokens=N_NEW, do_sample=False)
    zero = generate_with_state(hf, ours.zero_state(1), PROMPT, max_new_tokens=N_NEW, do_sample=False)
    assert zero.tolist() == plain.tolist()
    assert _new_tokens(zero, len(PROMPT))[0] == _engine_greedy(ours, [PROMPT], None)[0]


@pytest.mark.slow
def test_remote_code_model_left_padded_batch_and_state_file(models, hf_dir, tmp_path):
    """The converted directory loaded as users load it (its own code and its own cache class), a state file
    with token-shift states, and two prompts of different lengths left-padded in one batch."""
    from transformers import AutoModelForCausalLM

    ours, _ = models
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True, dtype=torch.float32).eval()
    path = tmp_path / "s.safetensors"
    save_state(path, _state(ours, True, seed=6), ours, with_shift=True)
    state = statetune.load_state(path).state
    short = PROMPT[:3]
    expect = _engine_greedy(ours, [PROMPT, short], state)
    pad = len(PROMPT) - len(short)
    ids = torch.tensor([PROMPT, [EOS] * pad + short])
    mask = torch.tensor([[1] * len(PROMPT), [0] * pad + [1] * len(short)])
    out = generate_with_state(hf, str(path), ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False,
                              pad_token_id=EOS)
    assert _new_tokens(out, len(PROMPT)) == expect


def test_round_trip_and_layout(models):
    """Exact both ways; and the cache rwkv7-hf leaves after a prompt is the state statetune's model reaches."""
    ours, hf = models
    state = random_state(ours, 2, seed=8)
    cache = state_to_hf_cache(state, hf, batch_size=2)
    assert tuple(cache.recurrent_state[0].shape) == (2, 2, 16, 16) and cache.recurrent_state[0].dtype == torch.float32
    # rwkv7-hf's matrix is [key, value]: entry [k, v] is statetune's [v, k]
    assert cache.recurrent_state[1][1, 0, 3, 5] == state.wkv[1, 1, 0, 5, 3]
    assert_states_close(hf_cache_to_state(cache), state, atol=0, rtol=0)
    tokens = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        after = hf(input_ids=tokens, past_key_values=state_to_hf_cache(state, hf, batch_size=2), use_cache=True)
    _, expect = ours(tokens, state)
    # fp32 rounding differs between the two implementations (~3e-4 after three layers); a wrong layout is O(1)
    assert_states_close(hf_cache_to_state(after.past_key_values), expect, atol=2e-3, rtol=1e-3)


def test_text_prompt_and_a_state_repeated_per_beam(models):
    ours, hf = models
    text = "Hello!"
    out = generate_with_state(hf, _state(ours, True), text, tokenizer=get_tokenizer("bytes"), max_new_tokens=4,
                              num_beams=3, num_return_sequences=2, do_sample=False)
    assert out.shape[0] == 2 and out[:, :len(text)].tolist() == [get_tokenizer("bytes").encode(text)] * 2
    assert len(state_to_hf_cache(_state(ours, True), hf, batch_size=3).recurrent_state[0]) == 3


def test_misfits_are_refused(models, tmp_path):
    ours, hf = models
    state = random_state(ours, 1, seed=1)
    fewer = RWKVState(state.att_shift[:2], state.wkv[:2], state.ffn_shift[:2])
    with pytest.raises(StateFileError, match="the state has 2 layers .*3 layers of 2 heads x 16"):
        state_to_hf_cache(fewer, hf)
    wrong = RWKVState(state.att_shift, state.wkv[:, :, :1], state.ffn_shift)
    with pytest.raises(StateFileError, match=r"blocks.0.att.time_state: expected shape \[2, 16, 16\], found "
                                             r"\[1, 16, 16\]"):
        state_to_hf_cache(wrong, hf)
    with pytest.raises(ValueError, match="the state has 2 rows but batch_size is 3"):
        state_to_hf_cache(random_state(ours, 2, seed=1), hf, batch_size=3)
    with pytest.raises(StateFileError, match="no such state file"):
        state_to_hf_cache(tmp_path / "missing.safetensors", hf)
    with pytest.raises(ValueError, match="at least one token"):
        generate_with_state(hf, state, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        generate_with_state(hf, state, "Hello", max_new_tokens=2)
    with pytest.raises(ValueError, match="not an RWKV-7 model or config"):
        state_to_hf_cache(state, type("Cfg", (), {"model_type": "llama"})())


@pytest.mark.slow
def test_fla_cache_layout():
    """fla's cache (one dict per layer, [key, value] matrices): built and read back, in a process of its own
    because importing fla defines its Triton kernels (see tests/test_fla_interpret.py)."""
    pytest.importorskip("fla", reason="needs flash-linear-attention")
    script = textwrap.dedent("""
        import torch
        from fla.models import RWKV7Config
        from statetune.model.state import RWKVState
        from statetune.tuning.hf_cache import hf_cache_to_state, state_to_hf_cache
        cfg = RWKV7Config(hidden_size=32, num_hidden_layers=3, head_dim=16, vocab_size=257)
        g = torch.Generator().manual_seed(0)
        s = RWKVState(torch.randn(3, 1, 32, generator=g), torch.randn(3, 1, 2, 16, 16, generator=g),
                      torch.randn(3, 1, 32, generator=g))
        cache = state_to_hf_cache(s, cfg, batch_size=2)
        layer = cache[2]
        assert type(cache).__module__.startswith("fla."), type(cache)
        assert cache.get_seq_length() == 0
        assert layer["recurrent_state"].shape == (2, 2, 16, 16), layer["recurrent_state"].shape
        assert torch.equal(layer["recurrent_state"][1], s.wkv[2, 0].transpose(-1, -2))
        assert torch.equal(layer["conv_state"][1], s.att_shift[2, 0])
        assert torch.equal(layer["ffn_state"][0], s.ffn_shift[2, 0])
        back = hf_cache_to_state(cache)
        assert torch.equal(back.wkv, s.expand(2).wkv) and torch.equal(back.ffn_shift, s.expand(2).ffn_shift)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
