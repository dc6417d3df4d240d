"""Dataset record formats: one function per format turns a record into token ids and a loss mask.

Each format function returns *pieces* — ``(text, mask_bit)`` for text still to tokenize, or ``(ids, mask)``
for tokens already known — and ``RecordEncoder`` tokenizes the text pieces separately and concatenates.
Tokenizing the prompt apart from the completion keeps the boundary exact: the mask never splits a token.
Templates put the space that follows ``Response:`` / ``Assistant:`` at the start of the completion because
World tokens carry their leading space (`` There`` is one token, ``": "`` is not), so the prompt for a new
input ends in ``:`` and the model's first token is the one it saw in training.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from statetune.data.chat import chat_pieces
from statetune.data.fields import RecordError, Template, describe_type, field_names, text_field, unescape
from statetune.errors import OptionError
from statetune.prompts import INSTRUCTION_COMPLETION, INSTRUCTION_PROMPT, INSTRUCTION_PROMPT_NO_INPUT
from statetune.tokenizer import Tokenizer

Piece = tuple[str, int] | tuple[list[int], list[int]]
Encoded = tuple[list[int], list[int]]


class Format(enum.StrEnum):
    """How a record's fields become model input; ``auto`` detects it per file from the first record."""

    AUTO = "auto"
    TEXT = "text"
    TOKENIZED = "tokenized"
    PROMPT_COMPLETION = "prompt-completion"
    INPUT_OUTPUT = "input-output"
    INSTRUCTION = "instruction"
    CHAT = "chat"
    TEMPLATE = "template"
    PREFERENCE = "preference"


# -- one function per format -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatContext:
    """What format functions need besides the record: token ids to end a completion, vocabulary, templates."""

    eos: list[int]
    vocab_size: int
    prompt: Template | None = None
    completion: Template | None = None


def text_pieces(record: Mapping[str, Any], ctx: FormatContext) -> list[Piece]:
    """``{"text": "..."}``: plain text, loss everywhere."""
    if isinstance(record.get("text"), list):
        raise RecordError("text", "expected a string, got a list (token ids? use --format tokenized)")
    if "mask" in record:
        raise RecordError("mask", "a mask goes with text as token ids, not with text as a string")
    return _with_eos([(text_field(record, "text"), 1)], ctx)


def tokenized_pieces(record: Mapping[str, Any], ctx: FormatContext) -> list[Piece]:
    """``{"text": [ids], "mask": [0/1...]}``: already tokenized; checked and passed through."""
    if "text" not in record:
        raise RecordError("text", f"missing; the record has {field_names(record)}")
    ids = record["text"]
    if not isinstance(ids, list):
        raise RecordError("text", f"expected a list of token ids, got {describe_type(ids)}")
    if not ids:
        raise RecordError("text", "empty text (no token ids)")
    for k, i in enumerate(ids):
        if type(i) is not int or not 0 <= i < ctx.vocab_size:
            raise RecordError("text", f"item {k} is {i!r}, not a token id in 0..{ctx.vocab_size - 1}")
    mask = record.get("mask")
    if mask is None:
        mask = [1] * len(ids)
    elif not isinstance(mask, list):
        raise RecordError("mask", f"expected a list of 0/1, got {describe_type(mask)}")
    elif len(mask) != len(ids):
        raise RecordError("mask", f"has {len(mask)} values but text has {len(ids)} token ids")
    else:
        for k, m in enumerate(mask):
            if type(m) is not int or m not in (0, 1):
                raise RecordError("mask", f"item {k} is {m!r}; mask values must be 0 or 1")
    return _with_eos([(ids, mask)], ctx)


def prompt_completion_pieces(record: Mapping[str, Any], ctx: FormatContext) -> list[Piece]:
    """``{"prompt", "completion"}``: no loss on the prompt, loss on the completion (+ eos)."""
    return _pair(record, ctx, "prompt", "completion")


def input_output_pieces(record: Mapping[str, Any], ctx: FormatContext) -> list[Piece]:
    """``{"input", "output"}``: no loss on the input, loss on the output (+ eos)."""
    return _pair(record, ctx, "input", "output")


def _pair(record: Mapping[str, Any], ctx: FormatContext, prompt: str, completion: str) -> list[Piece]:
    p = text_field(record, prompt, allow_empty=True)
    c = text_field(record, completion)
    return _with_eos([(p, 0), (c, 1)], ctx)


def instruction_pieces(record: Mapping[str, Any], ctx: FormatContext) -> list[Piece]:
    """``{"instruction", "input", "output"}`` in the RWKV instruction template; loss on `` {output}``."""
    instruction = text_field(record, "instruction")
    inp = text_field(record, "input", allow_empty=True, optional=True)
    output = text_field(record, "output")
    if inp:
        prompt = INSTRUCTION_PROMPT.format(instruction=instruction, input=inp)
    else:
        prompt = INSTRUCTION_PROMPT_NO_INPUT.format(instruction=instruction)
    return _with_eos([(prompt, 0), (INSTRUCTION_COMPLETION.format(output=output), 1)], ctx)


def template_pieces(record: Mapping[str, Any], ctx: FormatContext) -> list[Piece]:
    """Any fields through ``--prompt-template`` (no loss) and ``--completion-template`` (loss, + eos)."""
    assert ctx.completion is not None, "the template format needs a completion template"
    prompt = ctx.prompt.render(record) if ctx.prompt else ""
    completion = ctx.completion.render(record, required=True)
    if not completion:
        raise RecordError(", ".join(ctx.completion.fields) or "completion", "empty completion")
    return _with_eos([(prompt, 0), (completion, 1)], ctx)


def _with_eos(pieces: list[Piece], ctx: FormatContext) -> list[Piece]:
    if ctx.eos:
        pieces.append((ctx.eos, [1] * len(ctx.eos)))
    return pieces


FORMAT_FUNCTIONS: dict[Format, Callable[[Mapping[str, Any], FormatContext], list[Piece]]] = {
    Format.TEXT: text_pieces,
    Format.TOKENIZED: tokenized_pieces,
    Format.PROMPT_COMPLETION: prompt_completion_pieces,
    Format.INPUT_OUTPUT: input_output_pieces,
    Format.INSTRUCTION: instruction_pieces,
    Format.CHAT: chat_pieces,
    Format.TEMPLATE: template_pieces,
}

#: Formats whose completions end with end-of-text (id 0) unless ``--eos`` says otherwise.
EOS_BY_DEFAULT = frozenset(
    {Format.PROMPT_COMPLETION, Format.INPUT_OUTPUT, Format.INSTRUCTION, Format.TEMPLATE})

DETECTABLE = ("fields chosen + rejected (preference pairs); text; text (token ids) + mask; prompt + completion; "
              "input + output; instruction + output; or messages")


def detect_format(record: Any) -> Format | None:
    """The format a record's fields indicate, or None; the first match wins in the order listed."""
    if not isinstance(record, dict):
        return None
    if "chosen" in record and "rejected" in record:
        return Format.PREFERENCE
    if "messages" in record:
        return Format.CHAT
    if "text" in record:
        return Format.TOKENIZED if isinstance(record["text"], list) else Format.TEXT
    if "instruction" in record and "output" in record:
        return Format.INSTRUCTION
    if "prompt" in record and "completion" in record:
        return Format.PROMPT_COMPLETION
    if "input" in record and "output" in record:
        return Format.INPUT_OUTPUT
    return None


def resolve_eos(fmt: Format, eos: str | None, tokenizer: Tokenizer) -> tuple[list[int], str | None]:
    """The ids (and text, when given as text) appended after each completion for ``--eos``.

    ``None`` means the format's default (end-of-text for completion formats, nothing otherwise); ``"none"``
    means nothing; an integer is a token id; anything else is text (with ``\\n`` escapes) to tokenize.
    """
    if eos is None:
        return ([tokenizer.eot_id], None) if fmt in EOS_BY_DEFAULT else ([], None)
    if eos.strip().lower() == "none":
        return [], None
    if re.fullmatch(r"\s*-?\d+\s*", eos):
        token = int(eos)
        if not 0 <= token < tokenizer.vocab_size:
            raise OptionError(f"--eos: token id {token} is outside the {tokenizer.name} vocabulary "
                              f"(0..{tokenizer.vocab_size - 1})")
        return [token], None
    text = unescape(eos)
    if not text:
        raise OptionError("--eos: empty; use 'none' for no end marker")
    return tokenizer.encode(text), text


class RecordEncoder:
    """Records of one format to ``(ids, mask)`` with a given tokenizer and end-of-completion marker."""

    def __init__(self, tokenizer: Tokenizer, fmt: Format, eos: list[int],
                 prompt_template: str | None = None, completion_template: str | None = None) -> None:
        if fmt in (Format.AUTO, Format.PREFERENCE):
            raise ValueError(f"RecordEncoder encodes one sequence per record, not the {fmt.value} format")
        if fmt is Format.TEMPLATE and completion_template is None:
            raise OptionError("--completion-template: required by the template format")
        self.tokenizer = tokenizer
        self.format = fmt
        self.ctx = FormatContext(
            eos=list(eos), vocab_size=tokenizer.vocab_size,
            prompt=Template(prompt_template, "--prompt-template") if prompt_template is not None else None,
            completion=(Template(completion_template, "--completion-template")
                        if completion_template is not None else None))
        self._pieces = FORMAT_FUNCTIONS[fmt]

    def pieces(self, record: Any) -> list[Piece]:
        """The record's pieces before tokenization; raises ``RecordError`` naming the bad field."""
        if not isinstance(record, dict):
            raise RecordError("record", f"expected a JSON object, got {describe_type(record)}")
        if "chosen" in record and "rejected" in record and self.format is not Format.TEMPLATE:
            raise RecordError("record", f"a preference pair (chosen, rejected) in a file of {self.format.value} "
                                        "records; preference pairs and SFT records cannot share a file")
        return self._pieces(record, self.ctx)

    def encode(self, record: Any) -> Encoded:
        """Token ids and loss mask (1 = learn this token) of one record."""
        return assemble(self.pieces(record), self.tokenizer.encode)


def assemble(pieces: Sequence[Piece], encode: Callable[[str], list[int]]) -> Encoded:
    """Concatenate pieces, tokenizing text pieces one by one; empty text pieces contribute nothing."""
    ids: list[int] = []
    mask: list[int] = []
    for content, bits in pieces:
        if isinstance(content, str):
            if not content:
                continue
            part = encode(content)
            ids += part
            mask += [bits] * len(part)  # type: ignore[list-item]
        else:
            ids += content
            mask += bits  # type: ignore[arg-type]
    return ids, mask
