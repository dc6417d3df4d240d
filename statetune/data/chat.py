"""Chat messages as format pieces: the RWKV World chat template with the loss on assistant turns.

Shared by the chat format (``{"messages": [...]}``) and chat-shaped preference pairs, whose prompt turns,
assistant turns included, are context only: ``learn_from`` says where the turns to learn begin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from statetune.data.fields import RecordError, check_text, describe_type
from statetune.prompts import ASSISTANT_PROMPT, CHAT_END, CHAT_ROLES, chat_turn, normalize_chat

if TYPE_CHECKING:
    from statetune.data.formats import FormatContext, Piece

#: A message with the name errors give it (``messages[3]``, ``chosen[0]``).
Named = tuple[str, Any]


def message_list(record: dict[str, Any], name: str) -> list[Named]:
    """``record[name]`` as named messages; raises ``RecordError`` unless it is a list."""
    messages = record.get(name)
    if not isinstance(messages, list):
        raise RecordError(name, "missing" if name not in record
                          else f"expected a list of messages, got {describe_type(messages)}")
    return [(f"{name}[{k}]", msg) for k, msg in enumerate(messages)]


def checked_message(where: str, msg: Any) -> tuple[str, str]:
    """A message's role and normalized content; raises ``RecordError`` naming the message and its key."""
    if not isinstance(msg, dict):
        raise RecordError(where, f"expected an object with role and content, got {describe_type(msg)}")
    role = msg.get("role")
    if role not in CHAT_ROLES:
        raise RecordError(f"{where}.role", f"expected one of {', '.join(CHAT_ROLES)}, got {role!r}")
    if "content" not in msg:
        raise RecordError(f"{where}.content", "missing")
    if not isinstance(msg["content"], str):
        raise RecordError(f"{where}.content", f"expected a string, got {describe_type(msg['content'])}")
    check_text(f"{where}.content", msg["content"], allow_empty=True)
    return role, normalize_chat(msg["content"])


def message_pieces(messages: Sequence[Named], eos: list[Piece], learn_from: int = 0,
                   field: str = "messages") -> list[Piece]:
    """``User: …\\n\\nAssistant: …\\n\\n`` with the loss on each assistant turn from ``learn_from`` on
    (its `` content\\n\\n`` and then ``eos``); earlier turns are prompt text, joined so that the prompt
    tokenizes as one piece. Raises ``RecordError`` when no turn is left to learn."""
    pieces: list[Piece] = []
    prompt: list[str] = []
    for k, (where, msg) in enumerate(messages):
        role, content = checked_message(where, msg)
        if role == "assistant" and k >= learn_from:
            if not content:
                raise RecordError(f"{where}.content", "empty text (only whitespace)")
            prompt.append(ASSISTANT_PROMPT)
            pieces.append(("".join(prompt), 0))
            pieces.append((f" {content}{CHAT_END}", 1))
            pieces.extend(eos)
            prompt = []
        else:
            prompt.append(chat_turn(role, content))
    if not pieces:
        raise RecordError(field, "no assistant message: nothing to learn")
    if prompt:
        pieces.append(("".join(prompt), 0))
    return pieces


def chat_pieces(record: dict[str, Any], ctx: FormatContext) -> list[Piece]:
    """``{"messages": [{"role", "content"}...]}`` as ``User: …\\n\\nAssistant: …\\n\\n``.

    Loss is on each assistant turn's `` content\\n\\n``; ``\\n\\n`` is the end-of-turn marker, so contents
    are normalized like RWKV chat front-ends do (stripped, blank lines collapsed, see ``normalize_chat``).
    """
    eos: list[Piece] = [(list(ctx.eos), [1] * len(ctx.eos))] if ctx.eos else []
    return message_pieces(message_list(record, "messages"), eos)
