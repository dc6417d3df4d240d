"""The one home of prompt text: the RWKV World chat format, the instruction template, the templates a dataset
format implies, the template a state was trained with, and the default stops.

``prepare`` encodes training data with these strings, and ``generate``, ``chat``, ``eval`` and ``serve`` build
prompts with them, so a prompt at inference time looks exactly like the prompts a state was trained on.
This module sits below ``data`` (it imports only the error types and the tokenizer), so every floor above
can use it.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any

from statetune.errors import OptionError, RecordError
from statetune.tokenizer import Tokenizer

#: The speaker names of the RWKV World chat format, by OpenAI role.
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
#: A turn ends with a blank line; chat contents never hold one (see :func:`normalize_chat`).
CHAT_END = "\n\n"
#: What a prompt ends with for the model to answer; the answer's first token carries its leading space.
ASSISTANT_PROMPT = "Assistant:"
CHAT_PROMPT = "User: {user}" + CHAT_END + ASSISTANT_PROMPT
INSTRUCTION_PROMPT = "Instruction: {instruction}\n\nInput: {input}\n\nResponse:"
INSTRUCTION_PROMPT_NO_INPUT = "Instruction: {instruction}\n\nResponse:"
INSTRUCTION_COMPLETION = " {output}"


def normalize_chat(text: str) -> str:
    """Chat content as RWKV chat models see it: stripped, with no blank line (``\\n\\n`` ends a turn)."""
    return re.sub(r"\n{2,}", "\n", text.replace("\r\n", "\n")).strip()


def chat_turn(role: str, content: str) -> str:
    """One finished turn, ``Role: content\\n\\n``, the content normalized."""
    return f"{CHAT_ROLES[role]}: {normalize_chat(content)}{CHAT_END}"


def user_prompt(message: str) -> str:
    """A user's turn followed by the assistant's cue: the text a chat reads before each reply."""
    return chat_turn("user", message) + ASSISTANT_PROMPT


def chat_prompt(messages: Any) -> str:
    """The chat format over the messages up to the last user turn, ending with ``Assistant:``; raises
    :class:`~statetune.errors.RecordError` naming the message that is not ``{role, content}``."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RecordError("messages", "expected a list of {role, content} objects")
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages) - 1)
    turns = []
    for k, m in enumerate(messages[:last_user + 1]):
        if m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise RecordError(f"messages[{k}]", "expected a role (system, user, assistant) and a string content")
        turns.append(chat_turn(m["role"], m["content"]))
    return "".join(turns) + ASSISTANT_PROMPT


#: The chat format (chat_turn / chat_prompt) in Jinja, for Hugging Face's ``chat_template`` and serve's
#: ``/tokenizer_info``: each turn is "Role: content"
#: plus a blank line, the content stripped with blank lines collapsed (split on "\n", drop empty lines), and
#: the generation prompt is the bare "Assistant:" cue.
CHAT_TEMPLATE = (
    "{%- set names = " + json.dumps(CHAT_ROLES, allow_nan=False) + " -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in names -%}"
    "{{ raise_exception('chat roles are system, user and assistant, not ' + message['role']) }}"
    "{%- endif -%}"
    "{{ names[message['role']] + ': ' + (message['content'].replace('\\r\\n', '\\n').split('\\n')"
    " | reject('equalto', '') | join('\\n') | trim) + " + json.dumps(CHAT_END, allow_nan=False) + " }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def chat_stop(tokenizer: Tokenizer) -> dict[str, Any]:
    """The ``stop`` metadata of chat data: the end of a turn."""
    return {"ids": tokenizer.encode(CHAT_END), "text": CHAT_END}


def parse_template(source: str, flag: str) -> tuple[tuple[str, str | None], ...]:
    """A ``{field}`` template (``{{``/``}}`` for literal braces) as ``(literal, field or None)`` parts; an
    :class:`OptionError` naming ``flag`` for odd syntax (a format spec, a conversion, a non-name)."""
    try:
        parsed = list(string.Formatter().parse(source))
    except ValueError as e:
        raise OptionError(f"{flag}: invalid template {source!r}: {e}") from None
    parts = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (not name.isidentifier() or spec or conversion):
            raise OptionError(f"{flag}: placeholder {{{name}{'!' + conversion if conversion else ''}"
                              f"{':' + spec if spec else ''}}} is not a plain {{field}} name")
        parts.append((literal, name))
    return tuple(parts)


def template_fields(source: str, flag: str = "prompt template") -> list[str]:
    """The ``{field}`` names a template reads, in order of first use."""
    return list(dict.fromkeys(name for _, name in parse_template(source, flag) if name is not None))


#: Prompt, completion and no-input prompt templates implied by each dataset format (by its name).
_FORMAT_TEMPLATES: dict[str, tuple[str, str, str | None]] = {
    "prompt-completion": ("{prompt}", "{completion}", None),
    "input-output": ("{input}", "{output}", None),
    "instruction": (INSTRUCTION_PROMPT, INSTRUCTION_COMPLETION, INSTRUCTION_PROMPT_NO_INPUT),
    "chat": (CHAT_PROMPT, " {assistant}" + CHAT_END, None),
}


def templates_for(fmt: str | None, prompt_template: str | None = None,
                  completion_template: str | None = None) -> dict[str, Any]:
    """How a new input is wrapped for generation with data of format ``fmt`` (a format's name; None for mixed
    formats); ``template`` uses the given templates. The keys are those of ``prepare``'s metadata."""
    if fmt == "template":
        prompt, completion, no_input = prompt_template or "", completion_template, None
    elif fmt in _FORMAT_TEMPLATES:
        prompt, completion, no_input = _FORMAT_TEMPLATES[fmt]
    else:  # text, tokenized, mixed: no template
        return {"prompt_template": None, "prompt_template_no_input": None, "prompt_fields": [],
                "completion_template": None, "chat": None}
    chat = None
    if fmt == "chat":
        chat = {"turns": {role: f"{name}: {{content}}{CHAT_END}" for role, name in CHAT_ROLES.items()},
                "assistant_prompt": ASSISTANT_PROMPT, "turn_end": CHAT_END,
                "normalize": "strip each content, turn \\r\\n into \\n, collapse blank lines into one \\n"}
    return {"prompt_template": prompt, "prompt_template_no_input": no_input, "prompt_fields": template_fields(prompt),
            "completion_template": completion, "chat": chat}


class Prompts:
    """Wraps a prompt's text the way ``prepare`` built training prompts, from a state's (or dataset's)
    metadata: inside the template's single field (its no-input variant when there is one).

    ``template`` overrides the metadata's template; ``raw`` means no template at all.
    """

    def __init__(self, meta: dict[str, Any], template: str | None = None, raw: bool = False) -> None:
        self.raw = raw
        self.chat = meta.get("data_format") == "chat"
        if template is not None:
            self.template, self.no_input = template, None
        else:
            self.template, self.no_input = meta.get("prompt_template") or None, meta.get("prompt_template_no_input")

    def from_text(self, text: str, flag: str = "--prompt") -> str:
        """``text`` inside the template; raises :class:`OptionError` naming ``flag`` when the template needs
        several fields."""
        if self.raw or not self.template:
            return text
        for source in (self.template, self.no_input):
            if source:
                parts = parse_template(source, "prompt template")
                names = list(dict.fromkeys(name for _, name in parts if name is not None))
                if len(names) == 1:
                    value = normalize_chat(text) if self.chat else text
                    return "".join(literal + (value if name else "") for literal, name in parts)
                if not names:
                    return text
        raise OptionError(f"{flag}: the prompt template {self.template!r} needs the fields "
                          f"{', '.join(template_fields(self.template))}; use --input with such records, or --raw")


def stops(meta: dict[str, Any], tokenizer: Tokenizer, strings: list[str] | None = None,
          ids: list[int] | None = None) -> tuple[list[str], list[int]]:
    """Stop strings and ids: the given ones, else the ``stop`` metadata of the state; end of text always stops."""
    if strings is not None or ids is not None:
        out_strings, out_ids = list(strings or []), list(ids or [])
    else:
        stop = meta.get("stop") if isinstance(meta.get("stop"), dict) else {}
        text, stop_ids = stop.get("text"), [i for i in stop.get("ids") or [] if isinstance(i, int)]
        if text or len(stop_ids) > 1:
            out_strings, out_ids = [text or tokenizer.decode(stop_ids)], []
        else:
            out_strings, out_ids = [], stop_ids
    return out_strings, sorted({*out_ids, tokenizer.eot_id})
