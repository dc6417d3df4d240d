"""Tokenizers for RWKV models: the World tokenizer (65,536 ids) and a byte-level one (257 ids).

Both share one small interface so that data preparation, training and generation never care which one a
model uses; ``tokenizer_for_vocab`` picks the right one from a checkpoint's embedding size. Id 0 is the
end-of-text token in both and never stands for text.
"""

from __future__ import annotations

import ast
import codecs
import functools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

from statetune.errors import CheckpointError, OptionError

WORLD_VOCAB_SIZE = 65536
BYTES_VOCAB_SIZE = 257
#: Embedding sizes accepted for the byte tokenizer: 257 ids padded up to a round number by some trainers.
BYTES_VOCAB_RANGE = range(BYTES_VOCAB_SIZE, 1025)
TOKENIZER_NAMES = ("world", "bytes")


class Tokenizer(ABC):
    """Text to token ids and back; ``eot_id`` (0) marks the end of a text and decodes to nothing."""

    name: str
    vocab_size: int
    eot_id: int = 0

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` (no end-of-text token is added)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` over many texts; subclasses may do this faster."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (possibly part of a UTF-8 character); ``b""`` for end of text."""

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of a token sequence: decoding is exact at the byte level, whatever the ids split."""
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a token sequence; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def check_id(self, token_id: int) -> None:
        """Raise ``ValueError`` when ``token_id`` is outside this tokenizer's vocabulary."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(
                f"token id {token_id} is outside the {self.name} vocabulary (0..{self.vocab_size - 1})")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} vocab_size={self.vocab_size}>"


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte: byte ``b`` is id ``b + 1``, so id 0 stays free for end of text.

    For tiny test models and for languages the World vocabulary covers badly; any text round-trips exactly.
    """

    name = "bytes"
    vocab_size = BYTES_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def token_bytes(self, token_id: int) -> bytes:
        self.check_id(token_id)
        return b"" if token_id == 0 else bytes((token_id - 1,))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = bytearray()
        for i in ids:
            self.check_id(i)
            if i:
                out.append(i - 1)
        return bytes(out)


class WorldTokenizer(Tokenizer):
    """The RWKV World tokenizer (``rwkv_vocab_v20230424``), encoding through the Rust ``pyrwkv_tokenizer``.

    Its ids equal the reference ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``. Decoding goes through our own
    id-to-bytes table (built on first use) because the Rust decoder panics on a partial UTF-8 character,
    which a generated token can be.
    """

    name = "world"
    vocab_size = WORLD_VOCAB_SIZE

    def __init__(self) -> None:
        import pyrwkv_tokenizer

        self.vocab_path = Path(pyrwkv_tokenizer.__file__).parent / "rwkv_vocab_v20230424.txt"
        self._rust = pyrwkv_tokenizer.WorldTokenizer(str(self.vocab_path))

    def encode(self, text: str) -> list[int]:
        return self._rust.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._rust.encode_batch(list(texts))

    @functools.cached_property
    def _table(self) -> list[bytes]:
        return _read_vocab(self.vocab_path, self.vocab_size)

    def token_bytes(self, token_id: int) -> bytes:
        self.check_id(token_id)
        return self._table[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._table
        out = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                self.check_id(i)
            out.append(table[i])
        return b"".join(out)


def _read_vocab(path: Path, size: int) -> list[bytes]:
    """Id-to-bytes table of an RWKV vocab file (``ID REPR LENGTH`` lines); unassigned ids give ``b""``."""
    table = [b""] * size
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\r\n")
            if not line:
                continue
            first, last = line.index(" "), line.rindex(" ")
            token = ast.literal_eval(line[first + 1 : last])
            raw = token.encode("utf-8") if isinstance(token, str) else token
            if len(raw) != int(line[last + 1 :]):
                raise ValueError(f"{path}: token {line[:first]} has {len(raw)} bytes, not {line[last + 1 :]}")
            table[int(line[:first])] = raw
    return table


@functools.cache
def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called ``name`` ("world" or "bytes"); one shared instance per name."""
    if name == "world":
        return WorldTokenizer()
    if name == "bytes":
        return ByteTokenizer()
    raise OptionError(f"--tokenizer: unknown tokenizer {name!r} (choose from {', '.join(TOKENIZER_NAMES)})")


def tokenizer_name_for_vocab(vocab_size: int) -> str:
    """The tokenizer a model with ``vocab_size`` embedding rows was trained with."""
    if vocab_size == WORLD_VOCAB_SIZE:
        return "world"
    if vocab_size in BYTES_VOCAB_RANGE:
        return "bytes"
    raise CheckpointError(
        f"the model's vocabulary has {vocab_size} tokens, which matches no known tokenizer "
        f"(world: {WORLD_VOCAB_SIZE}; bytes: {BYTES_VOCAB_RANGE.start}..{BYTES_VOCAB_RANGE.stop - 1})")


def named_tokenizer(meta: dict) -> str | None:
    """The tokenizer a dataset's or state's metadata names (a string, or ``{"name": ...}``), if any."""
    named = meta.get("tokenizer")
    if isinstance(named, dict):
        named = named.get("name")
    return named if isinstance(named, str) and named else None


def tokenizer_for_vocab(vocab_size: int) -> Tokenizer:
    """The tokenizer for a model whose embedding has ``vocab_size`` rows (65536: world; 257..1024: bytes)."""
    return get_tokenizer(tokenizer_name_for_vocab(vocab_size))


class StreamDecoder:
    """Turns generated ids into text as they arrive, emitting only complete UTF-8 characters.

    A token may end in the middle of a multi-byte character (Chinese, emoji); its bytes wait for the next
    token instead of showing up as U+FFFD. Bytes that can never form a character (invalid UTF-8) do become
    U+FFFD, once they are known to be invalid; ``flush`` releases whatever is still pending at the end.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End the stream: return any pending bytes (an unfinished character becomes U+FFFD) and reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    @property
    def pending(self) -> bytes:
        """Bytes held back because they do not yet form a complete character."""
        return self._decoder.getstate()[0]
