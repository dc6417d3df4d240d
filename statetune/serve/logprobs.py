"""Token scores in OpenAI's two ``logprobs`` shapes, for whole answers and stream chunks alike.

Completions (the legacy shape lm-evaluation-harness reads): ``{"tokens", "token_logprobs", "top_logprobs",
"text_offset"}``, parallel lists; ``top_logprobs[i]`` maps token text to log-probability for the best
alternatives and the chosen token (None for an echoed prompt's first token, which nothing predicts).
Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.

A token's text is its bytes as UTF-8; a token that holds part of a character (byte-level and some World
tokens) is written with backslash escapes (``"\\xe4"``), so that different tokens never share a key. A
log-probability below ``FLOOR`` (a token the model rules out, ``-inf`` in float32) is written as ``FLOOR``:
JSON has no infinity.
"""

from __future__ import annotations

import codecs
from typing import Any

from statetune.infer.scoring import TokenScore
from statetune.tokenizer import Tokenizer

FLOOR = -9999.0


def _lp(logprob: float | None) -> float | None:
    return None if logprob is None else max(logprob, FLOOR)


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token's text: its UTF-8 bytes, with backslash escapes for bytes that are not a whole character."""
    return tokenizer.token_bytes(token).decode("utf-8", errors="backslashreplace")


class CompletionLogprobs:
    """Builds the completions shape token by token, keeping each token's character offset in the text.

    ``offset`` is where the scored text starts in the choice's ``text`` (after an echoed prompt, the
    prompt's length). ``top`` is the number of alternatives asked for.
    """

    def __init__(self, tokenizer: Tokenizer, top: int, offset: int = 0) -> None:
        self.tokenizer, self.top, self.offset = tokenizer, top, offset
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def part(self, scores: list[TokenScore]) -> dict[str, Any]:
        """The shape for ``scores`` (the next tokens of the text): a whole answer's or one chunk's."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for s in scores:
            out["tokens"].append(token_text(self.tokenizer, s.token))
            out["token_logprobs"].append(_lp(s.logprob))
            out["text_offset"].append(self.offset)
            if s.logprob is None:
                out["top_logprobs"].append(None)
            else:
                top = {token_text(self.tokenizer, t): _lp(lp) for t, lp in s.top[:self.top]}
                top.setdefault(token_text(self.tokenizer, s.token), _lp(s.logprob))
                out["top_logprobs"].append(top)
            self.offset += len(self._decoder.decode(self.tokenizer.token_bytes(s.token)))
        return out


def chat_logprobs(tokenizer: Tokenizer, scores: list[TokenScore], top: int) -> dict[str, Any]:
    """The chat shape for ``scores``: each token with its bytes and its ``top`` best alternatives."""
    return {"content": [{**_entry(tokenizer, s.token, s.logprob),
                         "top_logprobs": [_entry(tokenizer, t, lp) for t, lp in s.top[:top]]} for s in scores]}


def _entry(tokenizer: Tokenizer, token: int, logprob: float | None) -> dict[str, Any]:
    return {"token": token_text(tokenizer, token), "logprob": _lp(logprob),
            "bytes": list(tokenizer.token_bytes(token))}
