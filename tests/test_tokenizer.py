"""Tokenizers: World ids equal the reference implementation, bytes round-trip, streaming never garbles."""

from __future__ import annotations

from pathlib import Path

import pytest

from statetune.errors import CheckpointError, OptionError
from statetune.tokenizer import (
    ByteTokenizer,
    StreamDecoder,
    WorldTokenizer,
    get_tokenizer,
    tokenizer_for_vocab,
)

MIXED = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "今天是美好的一天。我们一起去公园散步吧！",
    "Emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧 and a flag 🏳️‍🌈.",
    "def f(x):\n    return x ** 2  # square\n\n\tclass A:\n\t\tpass\r\n",
    "Mixed 中英 text with numbers 12345.678 and ünïcödé ÅÄÖ — “quotes” «guillemets»",
    "   leading and trailing spaces   \n\n\n",
    "control \x00\x01\x7f chars and a tab\tend",
    "Instruction: translate\n\nInput: 你好\n\nResponse: Hello",
    "User: hi\n\nAssistant: 🙂 hello!\n\n",
]


@pytest.fixture(scope="module")
def world() -> WorldTokenizer:
    return get_tokenizer("world")  # type: ignore[return-value]


@pytest.fixture(scope="module")
def reference():
    rwkv = pytest.importorskip("rwkv")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))


@pytest.mark.parametrize("text", MIXED)
def test_world_ids_equal_the_reference_tokenizer(world, reference, text):
    assert world.encode(text) == reference.encode(text)


def test_world_ids_equal_the_reference_on_all_texts_at_once(world, reference):
    text = "\n\n".join(MIXED) * 3
    assert world.encode(text) == reference.encode(text)
    assert world.decode_bytes(world.encode(text)) == reference.decodeBytes(reference.encode(text))


def test_world_basics(world):
    assert (world.name, world.vocab_size, world.eot_id) == ("world", 65536, 0)
    for text in MIXED:
        assert world.decode(world.encode(text)) == text
    assert world.encode_batch(MIXED) == [world.encode(t) for t in MIXED]
    assert world.token_bytes(0) == b""  # end of text decodes to nothing
    assert world.token_bytes(65535) == b""  # ids past the vocab file are unassigned, not errors
    with pytest.raises(ValueError, match="outside"):
        world.decode([65536])


def test_world_decode_bytes_of_a_partial_character(world):
    ids = world.encode("😀")
    assert len(ids) > 1  # the emoji spans several byte tokens
    assert world.decode_bytes(ids[:1]) == "😀".encode()[: len(world.decode_bytes(ids[:1]))]
    assert world.decode(ids[:1]) == "\ufffd"  # non-streaming decode of a fragment is explicit about it


def test_bytes_tokenizer_round_trip():
    tok = get_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("bytes", 257, 0)
    for text in MIXED:
        ids = tok.encode(text)
        assert ids == [b + 1 for b in text.encode("utf-8")]
        assert 0 not in ids  # end of text never collides with a byte, not even NUL
        assert tok.decode(ids) == text
    assert tok.encode("\x00\xff") == [1, 196, 192]
    assert tok.decode_bytes([0, 1, 256, 0]) == b"\x00\xff"
    with pytest.raises(ValueError):
        tok.decode([257])


def test_get_tokenizer_and_tokenizer_for_vocab():
    assert get_tokenizer("world") is get_tokenizer("world")
    with pytest.raises(OptionError, match="--tokenizer"):
        get_tokenizer("gpt2")
    assert tokenizer_for_vocab(65536).name == "world"
    for n in (257, 300, 512, 1024):
        assert tokenizer_for_vocab(n).name == "bytes"
    for n in (256, 1025, 50277, 65529):
        with pytest.raises(CheckpointError, match=str(n)):
            tokenizer_for_vocab(n)


@pytest.mark.parametrize("name", ["world", "bytes"])
@pytest.mark.parametrize("text", ["你好，龘靐齉𪚥！", "emoji 😀🎉👨‍👩‍👧 end", "ok 中文 and 𠀀 ünïcödé"])
def test_stream_decoder_emits_only_whole_characters(name, text):
    tok = get_tokenizer(name)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode(text)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text
    assert "" in pieces  # some token ended mid-character (rare hanzi, emoji) and was held back
    assert dec.pending == b""


def test_stream_decoder_holds_a_split_emoji_until_complete(world):
    ids = world.encode("😀")
    dec = StreamDecoder(world)
    assert [dec.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.pending
    assert dec.push(ids[-1]) == "😀"
    assert dec.push(0) == ""  # end of text adds nothing


def test_stream_decoder_invalid_and_unfinished_bytes():
    tok = get_tokenizer("bytes")
    dec = StreamDecoder(tok)
    assert dec.push(0xE4 + 1) == ""  # first byte of a 3-byte character: wait
    assert dec.push(ord("a") + 1) == "\ufffda"  # never completed: now known to be invalid
    assert dec.push(0xE4 + 1) == ""
    assert dec.flush() == "\ufffd"  # the stream ended inside a character
    assert dec.push(ord("b") + 1) == "b"  # flush resets the decoder
