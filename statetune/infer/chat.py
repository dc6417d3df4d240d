"""A conversation with a model in the RWKV World chat format (``statetune chat``), the state carried across turns.

The conversation lives in the recurrent state, never in a transcript: each turn reads only the new
``User: …\\n\\nAssistant:`` text, the reply is generated until ``\\n\\n``, and whatever part of the
terminator the model did not itself feed is read afterwards, so the state is exactly as if the whole
transcript had been read. Lines starting with ``/`` are commands (``/help``); stdin may be a pipe, which
makes a conversation scriptable (one message per line, one reply per line on stdout).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from statetune.errors import OptionError, StatetuneError, explain, state_source
from statetune.infer.engine import Engine, prefill
from statetune.infer.sampling import MAX_SEED, SamplingParams
from statetune.interrupts import terminated
from statetune.model.state import RWKVState
from statetune.prompts import CHAT_END, chat_stop, chat_turn, normalize_chat, templates_for, user_prompt
from statetune.runtime import Runtime

__all__ = ["ChatSession", "converse"]
HELP = ("commands: /reset (start over), /save FILE (save the conversation state), /load FILE (continue from a "
        "state file), /quit; start a message with // to send a line beginning with /")


class ChatSession:
    """A conversation: the current state, the state it started from, and the turn loop."""

    def __init__(self, setup: Runtime, params: SamplingParams, system: str | None = None) -> None:
        self.setup, self.params = setup, params
        self.model, self.tokenizer = setup.model, setup.tokenizer
        self.engine = Engine(self.model, self.tokenizer, max_batch_size=1)
        self.start = setup.state
        if system:
            self.start = self.feed(chat_turn("system", system), self.start)
        self.state, self.turns = self.start, 0
        self.source = setup.source  # the start state, as errors name it

    def feed(self, text: str, state: RWKVState) -> RWKVState:
        """The state after reading ``text`` from ``state``."""
        ids = self.tokenizer.encode(text)
        return prefill(self.model, [ids], state)[1] if ids else state

    def reply(self, message: str, on_text: Callable[[str], None] = lambda _: None) -> str:
        """Answer one user message, streaming the reply's text to ``on_text``; returns the reply as generated
        (it usually begins with a space). On an interrupt the conversation stays as it was before the turn."""
        prompt = user_prompt(message)
        params = self.params
        if params.seed is not None:  # a different (reproducible) draw for every turn
            params = replace(params, seed=(params.seed + self.turns) % (MAX_SEED + 1))
        seq = self.engine.add(self.tokenizer.encode(prompt), self.state, params, keep_state=True,
                              source=self.source)
        done = None
        try:
            while done is None:
                for d in self.engine.step():
                    if d.text:
                        on_text(d.text)
                    done = d.completion or done
        except BaseException:
            self.engine.cancel(seq)
            raise
        # the state has read the prompt and all generated tokens but the last; read the rest of the turn
        target = (done.text + CHAT_END).encode("utf-8")
        fed = self.tokenizer.decode_bytes(done.tokens[:-1])
        try:
            rest = target[len(fed):].decode("utf-8") if target.startswith(fed) else None
        except UnicodeDecodeError:  # the reply ended inside a character: re-read the turn instead
            rest = None
        if rest is None:
            self.state = self.feed(prompt + done.text + CHAT_END, self.state)
        else:
            self.state = self.feed(rest, done.state)
        self.turns += 1
        return done.text

    def reset(self) -> None:
        self.state, self.turns, self.source = self.start, 0, self.setup.source

    def save(self, path: str) -> None:
        """Save the conversation state as a state file with chat metadata, in the format the name's extension
        picks (``.safetensors``: with token-shift states and metadata; ``.pth``: for RWKV-Runner)."""
        from statetune.tuning.formats import format_for, write_as
        from statetune.tuning.statefile import StateFile

        meta: dict[str, Any] = {k: v for k, v in self.setup.metadata.items() if k == "trained"}
        meta.update(tokenizer=self.tokenizer.name, data_format="chat", **templates_for("chat"), eos=None,
                    stop=chat_stop(self.tokenizer), conversation={"turns": self.turns})
        write_as(StateFile(self.state, meta, has_shift=True), path, format_for(path, None, "/save"), self.model)

    def load(self, path: str) -> None:
        from statetune.tuning.statefile import load_state

        sf = load_state(path, self.model)
        self.state, self.turns = sf.state, int((sf.metadata.get("conversation") or {}).get("turns", 0))
        self.source = state_source(path)


def _lines(interactive: bool):
    """The user's lines; one that is not valid UTF-8 is reported and skipped (the session goes on)."""
    number = 0
    while True:
        number += 1
        try:
            line = input("User: ") if interactive else _read_line()
        except EOFError:
            return
        except UnicodeDecodeError as e:
            print(f"error: line {number} is not valid UTF-8 (byte {e.object[e.start:e.start + 1]!r} at "
                  f"{e.start}); it was skipped", file=sys.stderr)
            yield None
            continue
        if not interactive and line is None:
            return
        yield line.rstrip("\r\n")


def _read_line() -> str | None:
    """One line of piped stdin, decoded strictly as UTF-8; None at the end of input."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # stdin replaced by a text stream (tests, embedding): already decoded
        line = sys.stdin.readline()
        return line or None
    raw = buffer.readline()
    return raw.decode("utf-8") if raw else None


def converse(session: ChatSession) -> int:
    """The turn loop over stdin (a terminal or a pipe) until /quit or end of input; returns 1 if a command or a
    line failed, else 0."""
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    status = 0
    for line in _lines(interactive):
        if line is None:  # not UTF-8: reported by _lines
            status = 1
            continue
        if line.startswith("/") and not line.startswith("//"):
            cmd, _, arg = line.partition(" ")
            try:
                if not _command(session, cmd, arg.strip()):
                    break
            except (StatetuneError, OSError) as e:  # a failed command never ends the conversation
                print(f"error: {explain(e)[0]}", file=sys.stderr)
                status = 1
            continue
        message = line[1:] if line.startswith("//") else line
        if not normalize_chat(message):
            continue
        if interactive:
            sys.stdout.write("Assistant:")
        out = _Printer(interactive)
        try:
            session.reply(message, out)
        except KeyboardInterrupt:
            if terminated():  # SIGTERM ends the session (as Ctrl-C would a command); Ctrl-C drops the turn
                raise
            print("\n[interrupted; the turn was dropped]", file=sys.stderr)
            continue
        sys.stdout.write("\n\n" if interactive else "\n")
        sys.stdout.flush()
    return status


class _Printer:
    """Writes a streamed reply to stdout; the space a reply begins with is dropped, except in a terminal."""

    def __init__(self, keep_space: bool) -> None:
        self.started = keep_space

    def __call__(self, text: str) -> None:
        if not self.started:
            text = text.lstrip(" ")
            self.started = bool(text)
        sys.stdout.write(text)
        sys.stdout.flush()


def _command(session: ChatSession, cmd: str, arg: str) -> bool:
    """Run one /command; False means quit."""
    if cmd in ("/quit", "/exit"):
        return False
    if cmd == "/reset":
        session.reset()
        print("conversation reset", file=sys.stderr)
    elif cmd in ("/save", "/load"):
        if not arg:
            raise OptionError(f"{cmd}: give a file name, e.g. {cmd} chat.safetensors")
        (session.save if cmd == "/save" else session.load)(arg)
        print(f"{'saved the conversation state to' if cmd == '/save' else 'loaded'} {arg}", file=sys.stderr)
    elif cmd == "/help":
        print(HELP, file=sys.stderr)
    else:
        raise OptionError(f"unknown command {cmd}; {HELP}")
    return True
