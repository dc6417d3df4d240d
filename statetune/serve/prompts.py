"""From a validated request to what the engine decodes: prompt token ids and :class:`SamplingParams`.

Prompts are built with :mod:`statetune.prompts`, as ``generate`` builds them, so a server answers exactly
as ``statetune generate`` does for the same state: a completion prompt is wrapped in the state's training
template (unless ``"raw": true``, ``"echo": true`` or the prompt is token ids: what is scored or echoed is
exactly what was sent) and stops at the state's stop metadata unless the request gives stops; a chat is
``System: …\\n\\nUser: …\\n\\nAssistant:`` (``chat_prompt``) and its reply ends at ``\\n\\n``.
Every problem is an :class:`ApiError` (400) naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from statetune.errors import OptionError, RecordError
from statetune.infer.sampling import SamplingError, SamplingParams
from statetune.prompts import CHAT_END, chat_prompt
from statetune.serve.errors import ApiError
from statetune.serve.registry import Entry
from statetune.serve.schemas import ChatRequest, CompletionRequest, _Sampling
from statetune.tokenizer import Tokenizer

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 16  # stop strings are searched at every token: a long list would slow the whole batch down
MAX_STOP_CHARS = 1000
MAX_STOP_IDS = 1024
MAX_CHOICES = 128  # prompts x n of one request: each is a sequence in the batch
MAX_LOGPROBS = 5  # completions' logprobs, as OpenAI's
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI's


@dataclass(frozen=True)
class Limits:
    """The server's bounds on a request."""

    max_tokens: int = 1024
    max_prompt_tokens: int = 4096
    vocab_size: int = 65536


def check_unsupported(req: _Sampling) -> None:
    """Refuse the OpenAI fields this server cannot honour, rather than silently ignore them."""
    if req.n is not None and not 1 <= req.n <= MAX_CHOICES:
        raise ApiError(400, f"n: must be in 1..{MAX_CHOICES}, got {req.n}", "n")
    if req.logit_bias:
        raise ApiError(400, "logit_bias: not supported by this server", "logit_bias")
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"logprobs: must be in 0..{MAX_LOGPROBS}, got {req.logprobs}", "logprobs")
        if req.best_of not in (None, 1):
            raise ApiError(400, f"best_of: only 1 is supported, got {req.best_of}", "best_of")
        if req.suffix:
            raise ApiError(400, "suffix: not supported by this server (RWKV reads left to right)", "suffix")
    if isinstance(req, ChatRequest):
        if req.tools:
            raise ApiError(400, "tools: tool calling is not supported by this server", "tools")
        if req.top_logprobs is not None:
            if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
                raise ApiError(400, f"top_logprobs: must be in 0..{MAX_TOP_LOGPROBS}, got {req.top_logprobs}",
                               "top_logprobs")
            if not req.logprobs:
                raise ApiError(400, "top_logprobs: needs \"logprobs\": true", "top_logprobs")


def completion_prompts(req: CompletionRequest, entry: Entry, tokenizer: Tokenizer, limits: Limits
                       ) -> list[list[int]]:
    """The token ids of each of a completion's prompts (a text, ids, or a list of either)."""
    prompt = req.prompt
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if len(prompts) * (req.n or 1) > MAX_CHOICES:
        raise ApiError(400, f"prompt: {len(prompts)} prompts x n={req.n or 1} choices is over {MAX_CHOICES} per "
                       "request", "prompt")
    return [completion_prompt(req, p, entry, tokenizer, limits, f"prompt[{k}]" if len(prompts) > 1 else "prompt")
            for k, p in enumerate(prompts)]


def completion_prompt(req: CompletionRequest, prompt: str | list[int], entry: Entry, tokenizer: Tokenizer,
                      limits: Limits, param: str = "prompt") -> list[int]:
    """The token ids of one prompt: text through the state's template (unless raw or echo), or ids as given."""
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, f"{param}: empty; the model needs at least one token to continue from", param)
        check_text(prompt, param)
        text = prompt
        if not (req.raw or req.echo):
            try:
                text = entry.prompts.from_text(prompt)
            except OptionError:
                raise ApiError(400, f"{param}: the prompt template of {entry.name!r} ({entry.template!r}) needs "
                               "several fields; send the whole prompt text with \"raw\": true", param) from None
        ids = encode_text(tokenizer, text, param)
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise ApiError(400, f"{param}: token id {bad[0]} is outside the vocabulary (0..{limits.vocab_size - 1})",
                           param)
    return _check_length(ids, limits, param)


def chat_prompt_ids(req: ChatRequest, tokenizer: Tokenizer, limits: Limits) -> list[int]:
    """The token ids of the chat template over the messages, ending with ``Assistant:``."""
    if not req.messages:
        raise ApiError(400, "messages: empty; send at least one message", "messages")
    messages = []
    for k, m in enumerate(req.messages):
        role = ROLES.get(m.role)
        if role is None:
            raise ApiError(400, f"messages[{k}].role: expected one of {', '.join(ROLES)}, got {m.role!r}",
                           f"messages[{k}].role")
        if isinstance(m.content, list):
            if any(p.type != "text" or p.text is None for p in m.content):
                raise ApiError(400, f"messages[{k}].content: only text parts are supported", f"messages[{k}].content")
            content = "\n".join(p.text for p in m.content)
        else:
            content = m.content or ""
        check_text(content, f"messages[{k}].content")
        messages.append({"role": role, "content": content})
    try:
        text = chat_prompt(messages)
    except RecordError as e:
        raise ApiError(400, f"{e.field}: {e.detail}", e.field) from None
    return _check_length(encode_text(tokenizer, text, "messages"), limits, "messages")


def check_text(text: str, param: str) -> None:
    """A 400 naming ``param`` unless ``text`` is valid Unicode (JSON can carry a lone surrogate, ``"\\ud800"``,
    which no UTF-8 text and no tokenizer can hold)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{param}: not valid Unicode text: {e.reason} (U+{ord(text[e.start]):04X} at "
                       f"character {e.start})", param) from None


def encode_text(tokenizer: Tokenizer, text: str, param: str) -> list[int]:
    """The token ids of ``text``; text the tokenizer cannot encode is a 400 naming ``param``, not a 500."""
    check_text(text, param)
    try:
        return tokenizer.encode(text)
    except (ValueError, UnicodeError) as e:
        raise ApiError(400, f"{param}: the tokenizer cannot encode this text: {e}", param) from None


def _check_length(ids: list[int], limits: Limits, param: str) -> list[int]:
    if not ids:
        raise ApiError(400, f"{param}: the prompt is empty; the model needs at least one token", param)
    if len(ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"{param}: the prompt has {len(ids)} tokens; this server accepts at most "
                       f"{limits.max_prompt_tokens} (--max-prompt-tokens)", param, code="context_length_exceeded")
    return ids


def sampling_params(req: _Sampling, stop_strings: list[str], stop_ids: list[int], limits: Limits,
                    max_tokens: int | None = None) -> SamplingParams:
    """The request's sampling values (OpenAI's defaults where absent) with the given stops.

    ``max_tokens`` defaults to the server's limit and is capped by it; a completion's 0 (score the prompt,
    generate nothing) becomes 1 here and is honoured by the caller (:func:`score_only`).
    """
    wanted = max_tokens if max_tokens is not None else req.max_tokens
    if isinstance(req, CompletionRequest) and wanted is not None and wanted <= 0:
        if wanted < 0:
            raise ApiError(400, f"max_tokens: must be 0 (score the prompt only) or more, got {wanted}", "max_tokens")
        wanted = 1
    values = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
              "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
              "penalty_decay": req.penalty_decay, "repetition_penalty": req.repetition_penalty, "seed": req.seed}
    try:
        params = SamplingParams(**{k: v for k, v in values.items() if v is not None},
                                max_tokens=limits.max_tokens if wanted is None else wanted,
                                stop=stop_strings, stop_token_ids=stop_ids)
        params.check_vocab(limits.vocab_size)
    except SamplingError as e:
        raise ApiError(400, f"{e.field}: {e.detail}, got {e.value!r}", e.field) from None
    params.max_tokens = min(params.max_tokens, limits.max_tokens)
    return params


def score_only(req: _Sampling) -> bool:
    """A completion with ``max_tokens`` 0: its prompt is scored (with ``echo`` and ``logprobs``), nothing is
    generated."""
    return isinstance(req, CompletionRequest) and req.max_tokens == 0


def completion_stops(req: CompletionRequest, entry: Entry, tokenizer: Tokenizer) -> tuple[list[str], list[int]]:
    """The request's stops (plus end of text) if it gives any, else the state's default stops."""
    if req.stop is None and req.stop_token_ids is None:
        return list(entry.stop_strings), list(entry.stop_ids)
    return _stop_list(req.stop), _stop_ids(req.stop_token_ids, tokenizer)


def chat_stops(req: ChatRequest, tokenizer: Tokenizer) -> tuple[list[str], list[int]]:
    """A reply ends at the end of its turn (``\\n\\n``), at the request's stops, or at end of text."""
    return sorted({CHAT_END, *_stop_list(req.stop)}), _stop_ids(req.stop_token_ids, tokenizer)


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        check_text(s, "stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop: stop strings must not be empty", "stop")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters", "stop")
    return stops


def _stop_ids(ids: list[int] | None, tokenizer: Tokenizer) -> list[int]:
    if ids is not None and len(ids) > MAX_STOP_IDS:
        raise ApiError(400, f"stop_token_ids: at most {MAX_STOP_IDS} ids, got {len(ids)}", "stop_token_ids")
    return sorted({*(ids or []), tokenizer.eot_id})
