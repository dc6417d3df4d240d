"""The tokenizer over HTTP, in vLLM's shapes: ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``.

Evaluation clients that count tokens on their side (lm-evaluation-harness's ``tokenizer_backend=remote``)
use these so that the ids they send are the server's own. ``/tokenize`` reads the end-of-text marker
``<|endoftext|>`` in a text as id 0, as Hugging Face tokenizers read their special tokens (a client finds the
end-of-text id by tokenizing the ``eos_token`` that ``/tokenizer_info`` names), as the tokenizer files of
``model convert --to hf`` do; the completions endpoints never do, so a prompt's text is always just text there.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from statetune.model.hf_tokenizer import EOT_TOKEN
from statetune.prompts import CHAT_TEMPLATE
from statetune.serve import prompts as P
from statetune.serve.errors import ApiError
from statetune.serve.schemas import ChatMessage
from statetune.serve.service import Service
from statetune.tokenizer import Tokenizer


class TokenizeRequest(BaseModel):
    """A text (``prompt``) or a chat (``messages``, in the chat format, ending with ``Assistant:``)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = False  # RWKV adds no start token: accepted and has no effect


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[int]


def encode_special(tokenizer: Tokenizer, text: str, param: str = "prompt") -> list[int]:
    """The ids of ``text`` with each ``<|endoftext|>`` read as the end-of-text id."""
    ids: list[int] = []
    for k, piece in enumerate(text.split(EOT_TOKEN)):
        if k:
            ids.append(tokenizer.eot_id)
        if piece:
            ids += P.encode_text(tokenizer, piece, param)
    return ids


def add_tokenizer_routes(app: FastAPI, service: Service) -> None:
    """Add the three tokenizer routes over ``service``'s tokenizer."""
    tokenizer, limits = service.tokenizer, service.limits

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return {"tokenizer_class": f"statetune.{tokenizer.name}", "vocab_size": tokenizer.vocab_size,
                "eos_token": EOT_TOKEN, "eos_token_id": tokenizer.eot_id, "bos_token": None, "pad_token": EOT_TOKEN,
                "model_max_length": limits.max_prompt_tokens, "chat_template": CHAT_TEMPLATE}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send either \"prompt\" (a text) or \"messages\" (a chat)", "prompt")
        if body.prompt is not None:
            ids = encode_special(tokenizer, body.prompt)
        else:
            ids = P.chat_prompt_ids(body, tokenizer, P.Limits(max_prompt_tokens=1 << 62))
        return {"count": len(ids), "max_model_len": limits.max_prompt_tokens, "tokens": ids, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"tokens: token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                           "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}
