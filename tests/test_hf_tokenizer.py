"""Tokenizer files in Hugging Face directories: ``AutoTokenizer.from_pretrained(DIR)`` loads them offline,
without remote code, and gives statetune's ids for both vocabularies; the chat template is statetune's."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

import statetune
from statetune.cli import main
from statetune.errors import CheckpointError, StatetuneError
from statetune.model.convert import convert_checkpoint
from statetune.model.hf_tokenizer import TOKENIZER_FILES, build_tokenizer_json, tokenizer_files
from statetune.prompts import chat_prompt
from statetune.tokenizer import Tokenizer, get_tokenizer

transformers = pytest.importorskip("transformers", reason="needs the hf-test extra (transformers)")
pytest.importorskip("tokenizers", reason="needs the hf extra (tokenizers)")

DATA = Path(__file__).parent / "data"
TINY = Path(statetune.__file__).parent / "assets" / "tiny-rwkv7" / "model.pth"


def _load(directory: Path):
    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


@pytest.fixture(scope="module", params=["bytes", "world"])
def pair(request, tmp_path_factory):
    """(statetune tokenizer, the HF tokenizer loaded from the files statetune writes for it)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    ours = get_tokenizer(request.param)
    directory = tmp_path_factory.mktemp(f"tok-{request.param}")
    for name, text in tokenizer_files(ours).items():
        (directory / name).write_text(text, encoding="utf-8")
    yield ours, _load(directory)
    mp.undo()


def _texts() -> list[str]:
    rng = random.Random(0)
    samples = [json.loads(line)["text"] for line in (DATA / "e2e_sample_raw.jsonl").read_text().splitlines()]
    planes = [(32, 127), (0, 32), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    unicode = ["".join(chr(rng.randrange(*rng.choice(planes))) for _ in range(rng.randrange(1, 80)))
               for _ in range(200)]
    latin1 = ["".join(chr(rng.randrange(256)) for _ in range(rng.randrange(1, 80))) for _ in range(100)]
    spaces = ["    def f(x):\n        return x\n\n\n", "a" * 300, " " * 200 + "x", "\r\n\t\x00\x7f", "🤗🤗 ok"]
    return samples + unicode + latin1 + spaces


def test_ids_equal_statetunes_and_decode_inverts(pair):
    ours, hf = pair
    wrong = [t for t in _texts() if hf(t, add_special_tokens=True)["input_ids"] != ours.encode(t)]
    assert not wrong, f"{len(wrong)} texts tokenize differently, e.g. {wrong[0]!r}"
    for t in _texts():
        assert hf.decode(ours.encode(t)) == t


def test_long_text_is_exact(pair):
    ours, hf = pair
    samples = [json.loads(line)["text"] for line in (DATA / "e2e_sample_raw.jsonl").read_text().splitlines()]
    text = "\n\n".join(samples)[:20_000] + "中文的文本" * 400
    assert hf(text)["input_ids"] == ours.encode(text)


def test_special_tokens(pair):
    ours, hf = pair
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (0, 0, None)
    assert hf.decode([0, *ours.encode("hi")], skip_special_tokens=True) == "hi"
    # the end-of-text token's own text is the special token, as in every Hugging Face tokenizer
    assert hf("<|endoftext|>")["input_ids"] == [0]


class _Toy(Tokenizer):
    """Bytes plus tokens that overlap each other: greedy longest-match has to see across every cut."""

    name, vocab_size = "toy", 262
    EXTRA = [b"ab", b"bcd", b"abc", b"cdx", b"dxy"]

    def token_bytes(self, token_id: int) -> bytes:
        return b"" if token_id == 0 else bytes((token_id - 1,)) if token_id <= 256 else self.EXTRA[token_id - 257]

    def encode(self, text: str) -> list[int]:
        raw, out, i = text.encode(), [], 0
        table = {self.token_bytes(t): t for t in range(1, self.vocab_size)}
        while i < len(raw):
            n = max(n for n in range(1, len(raw) - i + 1) if raw[i:i + n] in table)
            out.append(table[raw[i:i + n]])
            i += n
        return out


def test_greedy_across_overlapping_tokens():
    from tokenizers import Tokenizer as HFTokenizer

    toy = _Toy()
    hf = HFTokenizer.from_str(build_tokenizer_json(toy))
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice("abcdxy ") for _ in range(rng.randrange(1, 30)))
        assert hf.encode(text).ids == toy.encode(text), text


def test_chat_template_is_statetunes(pair):
    _, hf = pair
    messages = [{"role": "system", "content": " Be\n\n\nbrief. "}, {"role": "user", "content": "Hi\r\n\r\nthere"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Q?\n"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chat_prompt(messages)
    with pytest.raises(Exception, match="chat roles are system, user and assistant"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_shipped_tiny_model_converts_with_a_loadable_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = convert_checkpoint(TINY, tmp_path / "hf", "hf")
    assert all((out / name).is_file() for name in TOKENIZER_FILES)
    hf = _load(out)
    text = "The cat sat on the mat.\n\nÜber 中文"
    ids = get_tokenizer("bytes").encode(text)
    assert hf(text)["input_ids"] == ids
    tokens = torch.tensor([ids])
    torch.testing.assert_close(statetune.load_model(out)(tokens)[0], statetune.load_model(TINY)(tokens)[0],
                               atol=0, rtol=0)


def test_tokenizer_choice(tiny_ckpt, tmp_path, capsys):
    assert main(["model", "convert", str(tiny_ckpt("rwkv7")), str(tmp_path / "none"), "--tokenizer", "none"]) == 0
    assert not any((tmp_path / "none" / name).exists() for name in TOKENIZER_FILES)
    assert main(["model", "convert", str(tiny_ckpt("rwkv7")), str(tmp_path / "w"), "--tokenizer", "world"]) == 1
    assert "the world tokenizer has 65536 ids but the model's vocabulary has only 300" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    assert main(["model", "convert", str(tiny_ckpt("rwkv7")), str(tmp_path / "x"), "--tokenizer", "gpt2"]) == 2
    assert "--tokenizer: unknown choice 'gpt2'" in capsys.readouterr().err


def test_unknown_vocabulary_gets_no_tokenizer(tmp_path):
    from statetune.model.random_init import random_checkpoint

    sd = random_checkpoint("rwkv7", n_layer=2, n_embd=32, head_size=16, vocab_size=97, seed=7)
    torch.save(sd, tmp_path / "m.pth")
    out = convert_checkpoint(tmp_path / "m.pth", tmp_path / "hf", "hf")
    assert (out / "config.json").is_file() and not (out / "tokenizer.json").exists()
    with pytest.raises(CheckpointError, match="bytes tokenizer has 257 ids but the model's vocabulary has only 97"):
        convert_checkpoint(tmp_path / "m.pth", tmp_path / "hf2", "hf", tokenizer="bytes")


def test_missing_tokenizers_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(StatetuneError, match=r"needs the 'tokenizers' package: pip install 'statetune\[hf\]'"):
        build_tokenizer_json(get_tokenizer("bytes"))
