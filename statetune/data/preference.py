"""Preference pairs: a prompt with a chosen and a rejected completion, each side encoded as an SFT record.

The record shapes are those of TRL and the public preference sets:

- text: ``{"prompt": str, "chosen": str, "rejected": str}``; the prompt through ``--prompt-template`` when
  given (any fields), each completion through ``--completion-template`` when given (``{completion}`` stands
  for the side's text);
- chat with an explicit prompt: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``;
- chat with an implicit prompt: ``{"chosen": [messages], "rejected": [messages]}``, whose shared beginning
  is the prompt and whose remaining (assistant) turns are the completions.

Each side is prompt (mask 0) + completion (mask 1, end marker included), tokenized like the SFT formats, so
both sides start with the same prompt tokens. A file holds one style (text or chat), fixed by its first pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from statetune.data.chat import Named, checked_message, message_list, message_pieces
from statetune.data.fields import RecordError, Template, describe_type, field_names, text_field
from statetune.data.formats import Encoded, Piece, assemble, detect_format
from statetune.errors import OptionError
from statetune.tokenizer import Tokenizer

SIDES = ("chosen", "rejected")
#: The completion template's name for the side being encoded.
COMPLETION_FIELD = "completion"


def preference_style(record: Any) -> str:
    """``"text"`` when ``chosen`` is a string, ``"chat"`` when it is a list of messages; raises
    ``RecordError`` for a missing side or another type, or a record that is not a preference pair."""
    if not isinstance(record, dict):
        raise RecordError("record", f"expected a JSON object, got {describe_type(record)}")
    if not any(side in record for side in SIDES):
        fmt = detect_format(record)
        if fmt is not None:
            raise RecordError("record", f"a {fmt.value} record in a file of preference pairs; preference pairs "
                                        "and SFT records cannot share a file")
    for side in SIDES:
        if side not in record:
            raise RecordError(side, f"missing; the record has {field_names(record)}")
    chosen = record["chosen"]
    if isinstance(chosen, str):
        return "text"
    if isinstance(chosen, list):
        return "chat"
    raise RecordError("chosen", f"expected a string or a list of messages, got {describe_type(chosen)}")


class PairEncoder:
    """Preference records of one style to two ``(ids, mask)`` sides, with a given end-of-completion marker."""

    def __init__(self, tokenizer: Tokenizer | None, style: str, eos: list[int],
                 prompt_template: str | None = None, completion_template: str | None = None) -> None:
        if style not in ("text", "chat"):
            raise ValueError(f"unknown preference style {style!r}")
        self.tokenizer = tokenizer
        self.style = style
        self.eos: list[Piece] = [(list(eos), [1] * len(eos))] if eos else []
        self.prompt = Template(prompt_template, "--prompt-template") if prompt_template is not None else None
        self.completion = (Template(completion_template, "--completion-template")
                           if completion_template is not None else None)
        if self.completion is not None and set(SIDES) & set(self.completion.fields):
            raise OptionError("--completion-template: with preference pairs, write the completion as "
                              "{completion}; it stands for chosen and rejected in turn")

    def pair(self, record: Any) -> tuple[list[Piece], list[Piece]]:
        """The chosen and rejected pieces of a record; raises ``RecordError`` naming the bad field."""
        style = preference_style(record)
        if style != self.style:
            found = "a list of messages" if style == "chat" else "a string"
            raise RecordError("chosen", f"{found} in a file of {self.style} pairs (its first pair sets the style; "
                                        "put text and chat pairs in separate files)")
        sides = self._chat(record) if style == "chat" else self._text(record)
        if sides[0] == sides[1]:
            raise RecordError("rejected", "identical to 'chosen' once formatted: a preference pair must differ")
        return sides

    def encode(self, record: Any) -> tuple[Encoded, Encoded]:
        """Token ids and loss masks of the chosen and the rejected side."""
        assert self.tokenizer is not None, "encoding needs a tokenizer"
        chosen, rejected = self.pair(record)
        return assemble(chosen, self.tokenizer.encode), assemble(rejected, self.tokenizer.encode)

    def _text(self, record: dict[str, Any]) -> tuple[list[Piece], list[Piece]]:
        prompt = self.prompt.render(record) if self.prompt else text_field(record, "prompt", allow_empty=True)
        values = []
        for side in SIDES:
            if not isinstance(record[side], str):
                raise RecordError(side, f"expected a string like 'chosen', got {describe_type(record[side])}")
            values.append(text_field(record, side))
        if values[0] == values[1]:
            raise RecordError("rejected", "identical to 'chosen': a preference pair must differ")
        if self.completion is not None:
            values = [self.completion.render({**record, COMPLETION_FIELD: v}, required=True) for v in values]
        return tuple([(prompt, 0), (v, 1), *self.eos] for v in values)  # type: ignore[return-value]

    def _chat(self, record: dict[str, Any]) -> tuple[list[Piece], list[Piece]]:
        chosen, rejected = (message_list(record, side) for side in SIDES)
        for side, messages in zip(SIDES, (chosen, rejected), strict=True):
            if not messages:
                raise RecordError(side, "empty: no messages")
        turns = [[checked_message(where, msg) for where, msg in side] for side in (chosen, rejected)]
        if turns[0] == turns[1]:
            raise RecordError("rejected", "identical to 'chosen': a preference pair must differ")
        if "prompt" in record:
            prompt = message_list(record, "prompt")
            return (message_pieces(prompt + chosen, self.eos, len(prompt), "chosen"),
                    message_pieces(prompt + rejected, self.eos, len(prompt), "rejected"))
        shared = _shared_prompt(chosen, rejected, turns)
        return (message_pieces(chosen, self.eos, shared, "chosen"),
                message_pieces(rejected, self.eos, shared, "rejected"))


def _shared_prompt(chosen: Sequence[Named], rejected: Sequence[Named], turns: list[list[tuple[str, str]]]) -> int:
    """How many messages the two sides share; the rest of each must be its own assistant reply."""
    shared = 0
    while shared < min(len(turns[0]), len(turns[1])) and turns[0][shared] == turns[1][shared]:
        shared += 1
    if shared == 0:
        raise RecordError("rejected", "shares no prompt with 'chosen': the conversations differ from their first "
                                      "message (expected the same messages up to the last assistant reply)")
    for side, messages, side_turns in zip(SIDES, (chosen, rejected), turns, strict=True):
        if len(side_turns) == shared:
            other = SIDES[1 - SIDES.index(side)]
            raise RecordError(side, f"empty: nothing after the {shared} message(s) it shares with '{other}' "
                                    "(no assistant reply of its own)")
        for k in range(shared, len(side_turns)):
            if side_turns[k][0] != "assistant":
                raise RecordError(messages[k][0], f"a {side_turns[k][0]} turn after chosen and rejected differ "
                                  f"(at message {shared}): the two sides must share every message up to the "
                                  "last assistant reply")
    return shared


def preference_prompt(record: Any) -> str:
    """The text a preference record prompts with (what both sides share), for generating from such records."""
    style = preference_style(record)
    chosen, _ = PairEncoder(None, style, []).pair(record)
    first = chosen[0]
    return first[0] if first[1] == 0 and isinstance(first[0], str) else ""
