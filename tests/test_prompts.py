"""The one prompts module: what ``prepare`` trains on and what ``generate``, ``chat`` and ``serve`` read at
inference time are the same text, and the default stops come from the state's metadata."""

from __future__ import annotations

import pytest

from statetune.data.formats import Format, RecordEncoder
from statetune.errors import OptionError, RecordError
from statetune.prompts import (
    CHAT_END,
    Prompts,
    chat_prompt,
    chat_stop,
    chat_turn,
    stops,
    templates_for,
    user_prompt,
)
from statetune.tokenizer import get_tokenizer

BYTES = get_tokenizer("bytes")
MESSAGES = [{"role": "system", "content": " Be brief.\r\n\r\n\nReally. "}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour\n\n"},
            {"role": "assistant", "content": "Red."}]


def _prompt_pieces(fmt: Format, record: dict, **templates) -> list[str]:
    """The texts of a record's no-loss pieces as ``prepare`` encodes them."""
    return [text for text, bit in RecordEncoder(BYTES, fmt, [], **templates).pieces(record)
            if isinstance(text, str) and bit == 0]


def test_chat_inference_prompts_are_the_training_prompts():
    """The prompt before each assistant turn in training is what chat_prompt builds for the conversation so
    far (the second one after the first answer and its turn end), and what a chat session reads."""
    first, second = _prompt_pieces(Format.CHAT, {"messages": MESSAGES})
    assert first == chat_prompt(MESSAGES[:2]) == chat_turn("system", MESSAGES[0]["content"]) + user_prompt("Hi")
    assert first == "System: Be brief.\nReally.\n\nUser: Hi\n\nAssistant:"
    assert chat_prompt(MESSAGES[:4]) == first + " Hello." + CHAT_END + second
    assert second == user_prompt("Name a colour")
    assert chat_prompt(MESSAGES) == chat_prompt(MESSAGES[:4])  # only the turns up to the last user message


def test_the_metadata_templates_wrap_new_inputs_like_training_prompts():
    meta = {"data_format": "instruction", **templates_for("instruction")}
    record = {"instruction": "Add", "input": "", "output": "3"}
    (trained,) = _prompt_pieces(Format.INSTRUCTION, record)
    assert Prompts(meta).from_text("Add") == trained == "Instruction: Add\n\nResponse:"
    chat = {"data_format": "chat", **templates_for("chat")}
    assert Prompts(chat).from_text(" Hi\n\n\nthere ") == user_prompt("Hi\nthere")
    assert templates_for("chat")["prompt_fields"] == ["user"]
    assert templates_for("text")["prompt_template"] is None and templates_for(None)["chat"] is None
    own = templates_for("template", "Q: {q}\n", " {a}")
    assert own["prompt_fields"] == ["q"] and own["completion_template"] == " {a}"


def test_prompt_overrides_and_errors():
    meta = {"prompt_template": "Input: {mr}\n\nResponse:"}
    assert Prompts(meta, raw=True).from_text("x") == "x"
    assert Prompts(meta, template="<{q}>").from_text("x") == "<x>"
    assert Prompts({}).from_text("x") == "x"
    with pytest.raises(OptionError, match="--prompt-field: the prompt template .* needs the fields a, b"):
        Prompts({"prompt_template": "{a} {b}"}).from_text("x", "--prompt-field")
    with pytest.raises(OptionError, match=r"placeholder \{0\} is not a plain"):  # a damaged state's metadata
        Prompts({"prompt_template": "Q {0}"}).from_text("x")
    assert Prompts({"prompt_template": "{{{q}}}"}).from_text("x") == "{x}"
    with pytest.raises(RecordError, match=r"messages\[0\]"):
        chat_prompt([{"role": "robot", "content": "x"}])


def test_default_stops_come_from_the_state_metadata():
    eot = BYTES.eot_id
    assert stops({}, BYTES) == ([], [eot])
    assert stops({"stop": {"ids": [5], "text": None}}, BYTES) == ([], sorted({5, eot}))
    assert stops({"stop": chat_stop(BYTES)}, BYTES) == ([CHAT_END], [eot])
    several = BYTES.encode("END")
    assert stops({"stop": {"ids": several, "text": None}}, BYTES) == (["END"], [eot])
    # given stops replace the metadata's; end of text always stops
    assert stops({"stop": chat_stop(BYTES)}, BYTES, ["x"], None) == (["x"], [eot])
    assert stops({"stop": chat_stop(BYTES)}, BYTES, None, [7]) == ([], sorted({7, eot}))
