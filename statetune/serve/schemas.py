"""Request bodies of the OpenAI API, as pydantic models.

Types are strict (``"0.5"`` is not a number, ``1.0`` is not an integer), so a mistyped field is a 400 that
names it instead of a silent conversion; the ranges of the sampling values are checked once, by
:class:`~statetune.infer.sampling.SamplingParams`. Unknown fields are ignored, as OpenAI-compatible servers
do, except the few whose meaning cannot be honoured (``best_of``, ``suffix``, ``logit_bias``, ``tools``),
which are refused by :func:`statetune.serve.prompts.check_unsupported`. Scoring follows OpenAI's shapes:
``logprobs`` is a number of alternatives (0-5) on completions and a flag with ``top_logprobs`` (0-20) on chat.

Besides OpenAI's sampling fields, ``top_k``, ``repetition_penalty`` and ``stop_token_ids`` are accepted (the
``openai`` client sends them through ``extra_body``), and ``raw`` for completions (no state template).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields both endpoints share: the state, sampling, stops and streaming."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    penalty_decay: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    logit_bias: dict[str, Any] | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt (text, or token ids), continued from the named state."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    raw: bool = False


class TextPart(_Strict):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is supported."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: messages in the RWKV World chat template, from the named state."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
