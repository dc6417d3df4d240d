"""``generate``, the engine and sampling: the official package's greedy output, sampling rules, stops,
batching, templates and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from reference_rwkv import reference_model, to_reference_state

import statetune
from statetune.cli import main
from statetune.commands.generate import GenerateOptions
from statetune.errors import OptionError
from statetune.infer.engine import Engine
from statetune.infer.sampling import RowSampler, SamplingError, SamplingParams, penalize, probabilities, sample
from statetune.model.state import RWKVState
from statetune.tokenizer import get_tokenizer

BYTES = get_tokenizer("bytes")


def random_state(model, seed: int) -> RWKVState:
    g = torch.Generator().manual_seed(seed)
    s = model.zero_state(1)
    return RWKVState(torch.randn(s.att_shift.shape, generator=g), torch.randn(s.wkv.shape, generator=g) * 0.5,
                     torch.randn(s.ffn_shift.shape, generator=g))


def run(engine: Engine) -> dict:
    """Step until the engine is idle; ``{seq_id: (streamed text, completion)}``."""
    out, texts = {}, {}
    while len(engine):
        for d in engine.step():
            texts[d.seq_id] = texts.get(d.seq_id, "") + d.text
            if d.completion is not None:
                out[d.seq_id] = (texts[d.seq_id], d.completion)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
def test_greedy_with_state_matches_official_package(official_ckpt, tmp_path, capsys, version):
    pytest.importorskip("rwkv")
    path = official_ckpt(version)
    model = statetune.load_model(path)
    state = random_state(model, seed=11)
    statetune.save_state(tmp_path / "s.safetensors", state, model, {"tokenizer": "world"}, with_shift=True)
    world = get_tokenizer("world")
    prompt = world.encode("The state of RWKV")

    ref = reference_model(path, version)
    ref_state, expect = to_reference_state(state, 0, version), []
    for t in prompt:
        logits, ref_state = ref.forward([t], ref_state)
    while len(expect) < 16:
        tok = int(logits.float()[:65536].argmax())
        if tok == 0:
            break
        expect.append(tok)
        logits, ref_state = ref.forward([tok], ref_state)

    assert len(expect) == 16
    capsys.readouterr()  # the package prints while loading
    assert main(["generate", "--model", str(path), "--state", str(tmp_path / "s.safetensors"), "--prompt",
                 "The state of RWKV", "--temperature", "0", "--max-tokens", "16", "--threads", "1"]) == 0
    assert capsys.readouterr().out == world.decode(expect)
    engine = Engine(model, world)
    engine.add(prompt, state, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[0]))
    (_, done), = run(engine).values()
    assert [t for t in done.tokens if t != 0] == expect


@pytest.mark.parametrize("name,value", [("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0),
                                        ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5), ("repetition_penalty", 0),
                                        ("presence_penalty", float("inf")), ("max_tokens", 0), ("seed", -1),
                                        ("stop", [""]), ("stop", [3]), ("stop_token_ids", [-2]),
                                        ("temperature", True)])
def test_sampling_params_validation_names_the_field(name, value):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{name: value})
    assert e.value.field == name and str(e.value).startswith(f"{name}: ")
    assert isinstance(e.value, ValueError) and isinstance(e.value, OptionError)
    with pytest.raises(SamplingError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[300]).check_vocab(300)


def test_bad_sampling_flag_names_the_flag(tiny_ckpt, capsys):
    assert main(["generate", "--model", str(tiny_ckpt()), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "--top-p: must be in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(OptionError, match="--stop-token"):
        GenerateOptions(model="m", prompt="x", stop_token=[-1])
    with pytest.raises(OptionError, match="--prompt/--input"):
        GenerateOptions(model="m")


def test_penalties_as_specified():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    row = RowSampler(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25))
    for t in (0, 1, 1, 1):
        row.observe(t)
    plain = RowSampler(SamplingParams())
    plain.observe(0)
    out = penalize(logits, [row, plain])
    torch.testing.assert_close(out[0], torch.tensor([2.0 / 2 - 0.5 - 0.25, -1.0 * 2 - 0.5 - 0.75, 0.5, 3.0]))
    torch.testing.assert_close(out[1], logits[1])  # a row without penalties is untouched
    assert logits[0, 0] == 2.0  # the input is not modified


def test_penalty_decay_fades_counts_like_the_rwkv_pipeline():
    """The reference loop: before each new token every occurrence count is multiplied by the decay, then the
    token's count grows by 1; the penalty is presence + frequency * count for every token seen."""
    decay, tokens = 0.5, [3, 1, 3, 0, 3]
    row = RowSampler(SamplingParams(presence_penalty=0.1, frequency_penalty=1.0, penalty_decay=decay))
    reference: dict[int, float] = {}
    for t in tokens:
        reference = {k: v * decay for k, v in reference.items()}
        reference[t] = reference.get(t, 0.0) + 1.0
        row.observe(t)
    assert row.counts == pytest.approx(reference)
    out = penalize(torch.zeros(1, 5), [row])[0]
    expect = torch.tensor([-(0.1 + reference.get(i, 0.0)) if i in reference else 0.0 for i in range(5)])
    torch.testing.assert_close(out, expect)
    long = RowSampler(SamplingParams(frequency_penalty=1.0, penalty_decay=0.5))
    for _ in range(2000):  # far past the internal rescale: counts stay finite and exact
        long.observe(7)
    assert long.counts[7] == pytest.approx(2.0)
    with pytest.raises(SamplingError, match="penalty_decay: must be in"):
        SamplingParams(penalty_decay=0.0)


def test_temperature_top_k_top_p_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs, order = probabilities(logits, [RowSampler(SamplingParams(top_p=0.7))])
    assert order[0].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(probs[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    probs, _ = probabilities(logits, [RowSampler(SamplingParams(top_k=3, temperature=0.5))])
    expect = torch.tensor([0.25, 0.09, 0.0225])
    torch.testing.assert_close(probs[0], torch.cat([expect / expect.sum(), torch.zeros(1)]))


def test_sampling_respects_vocab_limit_seed_and_top_k_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 300, generator=g)
    logits[:, 290] = 100.0  # beyond the tokenizer's vocabulary: never chosen
    greedy = sample(logits, [RowSampler(SamplingParams(temperature=0))] * 3, vocab_size=257)
    assert greedy == logits[:, :257].argmax(-1).tolist()
    top1 = [RowSampler(SamplingParams(temperature=1.5, top_k=1, seed=i)) for i in range(3)]
    assert sample(logits, top1, vocab_size=257) == greedy
    draws = [sample(logits, [RowSampler(SamplingParams(seed=7))] * 3, 257) for _ in range(2)]
    assert draws[0] == draws[1]


def test_seeded_sampling_is_reproducible_and_top_k_one_is_greedy(tiny_ckpt):
    model = statetune.load_model(tiny_ckpt())

    def tokens(**kw) -> list[int]:
        engine = Engine(model, BYTES)
        engine.add(BYTES.encode("Hi"), None, SamplingParams(max_tokens=24, **kw))
        return next(iter(run(engine).values()))[1].tokens

    assert tokens(seed=3) == tokens(seed=3)
    assert tokens(seed=3) != tokens(seed=4)
    assert tokens(top_k=1, seed=5) == tokens(temperature=0)


class Scripted:
    """A fake model whose n-th generated token (after a one-token prompt) is ``script[n]``."""

    def __init__(self, text: bytes | list[int]) -> None:
        self.script = list(text) if isinstance(text, list) else [b + 1 for b in text]
        self.config = type("Config", (), {"vocab_size": 257})()
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def zero_state(self, batch: int) -> RWKVState:
        return RWKVState(torch.zeros(1, batch, 1), torch.zeros(1, batch, 1, 1, 1), torch.zeros(1, batch, 1))

    def __call__(self, tokens, state, last_only=False):
        B, T = tokens.shape
        read = state.att_shift[0, :, 0].long()
        logits = torch.zeros(B, T, 257)
        for b in range(B):
            for t in range(T):
                logits[b, t, self.script[min(int(read[b]) + t, len(self.script) - 1)]] = 1.0
        logits = logits[:, -1:] if last_only else logits
        return logits, RWKVState(state.att_shift + T, state.wkv, state.ffn_shift)


def scripted(text, **kw):
    engine = Engine(Scripted(text), BYTES)
    engine.add([1], None, SamplingParams(temperature=0, **kw))
    deltas = []
    while len(engine):
        deltas += engine.step()
    return [d.text for d in deltas], deltas[-1].completion


def test_stop_string_split_across_tokens_is_held_back_and_never_emitted():
    texts, done = scripted(b"Hi!\n\nBye", stop=["\n\n"])
    assert texts == ["H", "i", "!", "", ""] and done.text == "Hi!"
    assert done.finish_reason == "stop" and done.stop == "\n\n" and len(done.tokens) == 5


def test_held_back_prefix_is_released_when_it_is_not_a_stop():
    texts, done = scripted(b"a!b!?c", stop=["!?"], max_tokens=20)
    assert texts == ["a", "", "!b", "", ""] and done.text == "a!b"
    texts, done = scripted("xé!".encode(), stop=["é"])  # a stop string inside a two-byte character
    assert "".join(texts) == "x" and done.stop == "é"


def test_stop_token_and_max_tokens():
    texts, done = scripted([ord("o") + 1, ord("k") + 1, 0, ord("z") + 1], stop_token_ids=[0])
    assert "".join(texts) == "ok" and done.stop == 0 and done.finish_reason == "stop" and done.tokens[-1] == 0
    texts, done = scripted(b"abcdef", max_tokens=4, stop=["cdx"])
    assert texts == ["a", "b", "", "cd"] and done.finish_reason == "length" and done.text == "abcd"


def test_batched_decoding_equals_each_alone_and_keeps_caller_states(tiny_ckpt):
    model = statetune.load_model(tiny_ckpt())
    prompts = [BYTES.encode(p) for p in ("Hello", "abc", "xyz", "A much longer prompt", "q")]
    states = [random_state(model, seed=i) for i in range(4)] + [None]
    before = [s.clone() for s in states[:4]]
    params = [SamplingParams(temperature=0, max_tokens=12), SamplingParams(seed=1, max_tokens=9),
              SamplingParams(seed=2, top_p=0.8, max_tokens=15), SamplingParams(temperature=0, max_tokens=3),
              SamplingParams(seed=3, repetition_penalty=1.3, presence_penalty=0.2, max_tokens=10)]
    alone = []
    for p, s, sp in zip(prompts, states, params, strict=True):
        engine = Engine(model, BYTES)
        engine.add(p, s, sp)
        alone.append(next(iter(run(engine).values()))[1].tokens)
    for max_batch in (5, 2):
        engine = Engine(model, BYTES, max_batch_size=max_batch)
        ids = [engine.add(p, s, sp) for p, s, sp in zip(prompts, states, params, strict=True)]
        results = run(engine)
        assert [results[i][1].tokens for i in ids] == alone
        assert [results[i][0] for i in ids] == [results[i][1].text for i in ids]
    for s, b in zip(states, before, strict=False):
        for x, y in zip(s.tensors(), b.tensors(), strict=True):
            assert torch.equal(x, y)


def test_cancel_leaves_the_others_alone(tiny_ckpt):
    model = statetune.load_model(tiny_ckpt())
    engine = Engine(model, BYTES)
    a = engine.add(BYTES.encode("one"), None, SamplingParams(temperature=0, max_tokens=6))
    b = engine.add(BYTES.encode("two"), None, SamplingParams(temperature=0, max_tokens=6))
    engine.step()
    assert engine.cancel(a) and not engine.cancel(a)
    rest = run(engine)
    solo = Engine(model, BYTES)
    solo.add(BYTES.encode("two"), None, SamplingParams(temperature=0, max_tokens=6))
    assert list(rest) == [b] and rest[b][1].tokens == next(iter(run(solo).values()))[1].tokens


META = {"tokenizer": "bytes", "data_format": "template", "prompt_template": "Input: {mr}\n\nResponse:",
        "prompt_fields": ["mr"], "stop": {"ids": [0], "text": None}}


def test_prompt_templates():
    p = GenerateOptions(model="m", prompt="x").prompts(META)
    assert p.from_text("a b") == "Input: a b\n\nResponse:"
    assert GenerateOptions(model="m", prompt="x", raw=True).prompts(META).from_text("a b") == "a b"
    own = GenerateOptions(model="m", prompt="x", prompt_template=r"Q: {q}\nA:").prompts(META)
    assert own.from_text("hi") == "Q: hi\nA:"
    instr = {"data_format": "instruction",
             "prompt_template": "Instruction: {instruction}\n\nInput: {input}\n\nResponse:",
             "prompt_template_no_input": "Instruction: {instruction}\n\nResponse:"}
    p = GenerateOptions(model="m", input="i", out="o").prompts(instr)
    assert p.from_record({"instruction": "Add", "input": "1 2"}) == "Instruction: Add\n\nInput: 1 2\n\nResponse:"
    assert p.from_record({"instruction": "Add", "input": ""}) == "Instruction: Add\n\nResponse:"
    assert GenerateOptions(model="m", prompt="x").prompts(instr).from_text("Hi") == "Instruction: Hi\n\nResponse:"
    plain = GenerateOptions(model="m", input="i", out="o").prompts({})
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\n\n there "},
            {"role": "assistant", "content": "Hello."}]
    assert plain.from_record({"messages": msgs}) == "System: Be brief.\n\nUser: Hi\n there\n\nAssistant:"
    assert plain.from_record({"prompt": "P", "completion": "C"}) == "P"


@pytest.fixture()
def tuned(tiny_ckpt, tmp_path):
    model = statetune.load_model(tiny_ckpt())
    path = tmp_path / "tuned.safetensors"
    statetune.save_state(path, random_state(model, seed=5), model, META, with_shift=True)
    return str(tiny_ckpt()), str(path)


def test_cli_prompt_applies_the_state_template_unless_raw(tuned, capsys):
    model, state = tuned
    common = ["generate", "--model", model, "--state", state, "--temperature", "0", "--max-tokens", "12"]
    outs = []
    for extra in (["--prompt", "a cafe"], ["--prompt", r"Input: a cafe\n\nResponse:", "--raw"],
                  ["--prompt", "a cafe", "--raw"]):
        assert main(common + extra) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] != outs[2]


def test_cli_input_out_batched(tuned, tmp_path, capsys):
    model, state = tuned
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"mr": m, "id": i}) + "\n" for i, m in enumerate(["a", "bb", "ccc"])))
    out = tmp_path / "out.jsonl"
    common = ["generate", "--model", model, "--state", state, "--temperature", "0", "--max-tokens", "8"]
    assert main(common + ["--input", str(src), "--out", str(out), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["mr"]) for r in rows] == [(0, "a"), (1, "bb"), (2, "ccc")]
    capsys.readouterr()
    assert main(common + ["--prompt", "bb"]) == 0
    assert capsys.readouterr().out == rows[1]["generated"]
    src.write_text(json.dumps({"mr": "a"}) + "\n" + json.dumps({"other": 1}) + "\n")
    assert main(common + ["--input", str(src), "--out", str(tmp_path / "bad.jsonl")]) == 1
    assert "in.jsonl:2: field 'mr': missing" in capsys.readouterr().err
    assert not (tmp_path / "bad.jsonl").exists()
