"""Response bodies and stream chunks in the OpenAI formats, for completions and chat completions alike.

A :class:`Reply` carries what every chunk of one answer shares (id, creation time, model name, endpoint) so
that the routes only say *what* happened: some text, the end, the token counts.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from statetune.serve.registry import Entry


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"),
                                                                   allow_nan=False)
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")


class Reply:
    """The bodies of one answer: ``chat`` selects ``chat.completion`` over ``text_completion`` shapes.

    An answer has one choice per prompt and sample (``n``), each with its ``index``; ``logprobs`` are the
    shapes of :mod:`statetune.serve.logprobs`, or None when not asked for.
    """

    def __init__(self, chat: bool, model: str, prompt_tokens: int) -> None:
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(self, index: int, text: str, finish_reason: str, logprobs: dict | None = None) -> dict[str, Any]:
        """One finished choice of a whole (non-streamed) answer."""
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def body(self, choices: list[dict[str, Any]], completion_tokens: int) -> dict[str, Any]:
        """The whole (non-streamed) answer with its ``usage``."""
        return {**self._head(False), "choices": choices, "usage": usage(self.prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False, index: int = 0,
              logprobs: dict | None = None) -> dict[str, Any]:
        """One stream chunk of choice ``index``: new text (chat: a ``delta``; the first one names the role),
        its tokens' scores, and maybe the end."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, only the counts."""
        return {**self._head(True), "choices": [], "usage": usage(self.prompt_tokens, completion_tokens)}


def model_card(entry: Entry, base_name: str) -> dict[str, Any]:
    """An entry of ``GET /v1/models``; ``root`` is the base model a state runs on."""
    return {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "statetune",
            "root": base_name, "parent": None if entry.path is None else base_name,
            "prompt_template": entry.template, "token_shift": entry.has_shift, "origin": entry.origin,
            "metadata": entry.metadata}
