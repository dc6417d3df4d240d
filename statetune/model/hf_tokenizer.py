"""Tokenizer files for Hugging Face model directories, so that ``AutoTokenizer.from_pretrained(DIR)`` loads a
tokenizer offline, without remote code, that gives the same ids as statetune's own.

RWKV tokenizers are greedy longest-match over byte strings (the World vocabulary) or one token per byte. In
the ``tokenizers`` library that is: a ``ByteLevel`` pre-tokenizer without its regex (bytes -> one character
each), then a ``Split`` that cuts only where no vocabulary token can span the cut, then ``WordPiece`` with no
continuation prefix, which is greedy longest-match-first within each piece. The cut is exact: if no token
contains the byte pair ``(x, y)``, no token can cover the boundary between ``x`` and ``y``, so the
whole-text greedy match has a boundary there too. Cutting keeps the pieces short: WordPiece tries every end
of a piece for each token, which costs the square of the piece length, so an uncut 20 kB text would not
finish. Pieces stay long only in runs such as thousands of one repeated letter (see docs/huggingface.md).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from statetune.errors import StatetuneError
from statetune.prompts import CHAT_TEMPLATE
from statetune.tokenizer import Tokenizer

EOT_TOKEN = "<|endoftext|>"  # id 0: end of text (the name the rwkv7-hf and fla-hub tokenizers use)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

def byte_chars() -> dict[int, str]:
    """The ``ByteLevel`` byte -> character map (GPT-2's): printable Latin-1 bytes stand for themselves, the
    rest are shifted to 256 and up, so that every byte is one visible character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    shifted = (b for b in range(256) if b not in out)
    for n, b in enumerate(shifted):
        out[b] = chr(256 + n)
    return dict(sorted(out.items()))


def _char(c: str) -> str:
    return f"\\x{{{ord(c):x}}}"  # Oniguruma's escape: safe for any character, inside a class or not


def split_pattern(table: list[bytes], chars: dict[int, str]) -> str:
    """A regex matching each character after which a cut is safe: byte ``x`` not followed by any byte that
    follows ``x`` inside some token (``x(?![...])``), or a byte that is never followed inside a token."""
    follow: dict[int, set[int]] = {b: set() for b in range(256)}
    for token in table:
        for x, y in itertools.pairwise(token):
            follow[x].add(y)
    free = [chars[b] for b in range(256) if not follow[b]]
    alternatives = ["[" + "".join(map(_char, free)) + "]"] if free else []
    for b in range(256):
        if follow[b]:
            alternatives.append(_char(chars[b]) + "(?![" + "".join(_char(chars[y]) for y in sorted(follow[b])) + "])")
    return "|".join(alternatives)


def build_tokenizer_json(tokenizer: Tokenizer) -> str:
    """``tokenizer.json`` for ``tokenizer``: same ids as ``tokenizer.encode``, ``decode`` inverting it, id 0
    the special end-of-text token."""
    try:
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise StatetuneError("writing Hugging Face tokenizer files needs the 'tokenizers' package: "
                             "pip install 'statetune[hf]' (or pass --tokenizer none)") from None
    table = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    chars = byte_chars()
    vocab = {EOT_TOKEN: 0}
    for i, raw in enumerate(table):
        if raw:
            vocab.setdefault("".join(chars[b] for b in raw), i)
    model = models.WordPiece(vocab, unk_token=EOT_TOKEN, continuing_subword_prefix="",
                             max_input_chars_per_word=2**62)  # never give up on a long piece
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        pre_tokenizers.Split(Regex(split_pattern(table, chars)), "merged_with_previous"),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    return hf.to_str()


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    """File name -> text of the tokenizer files of a model directory (``tokenizer.json``, its config with
    the chat template, the special tokens): eos = pad = id 0, no bos, nothing added around a text."""
    special = {"eos_token": EOT_TOKEN, "pad_token": EOT_TOKEN}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "bos_token": None, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000, "chat_template": CHAT_TEMPLATE,
        "statetune_tokenizer": tokenizer.name,
    }
    return {
        "tokenizer.json": build_tokenizer_json(tokenizer),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2, allow_nan=False) + "\n",
    }
