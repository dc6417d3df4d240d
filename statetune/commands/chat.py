"""``statetune chat``: talk to a model in the RWKV World chat format, carrying the state across turns."""

from __future__ import annotations

from dataclasses import dataclass, field

from statetune.errors import OptionError
from statetune.infer.chat import ChatSession, converse
from statetune.infer.sampling import SamplingOptions
from statetune.options import h
from statetune.prompts import CHAT_END, normalize_chat, stops
from statetune.runtime import ModelOptions, StateOption, check_state_scale, check_stop_tokens, load_runtime

__all__ = ["ChatOptions", "chat"]


@dataclass(kw_only=True)
class ChatOptions(SamplingOptions, StateOption, ModelOptions):
    """Chat with a model in the RWKV World template (User: ... / Assistant: ...), the state carried across
    turns. Reads one message per line from stdin (a terminal or a pipe); /help lists the commands."""

    system: str | None = field(default=None, metadata=h("A system prompt read before the first turn."))
    top_p: float = field(default=0.5, metadata=h("Nucleus sampling: keep the most likely tokens that cover this "
                                                 "much probability (1 = off)."))
    max_tokens: int = field(default=1024, metadata=h("Most tokens per reply."))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_model_options()
        check_state_scale(self.state_scale)
        if self.system is not None and not normalize_chat(self.system):
            raise OptionError("--system: empty")


def chat(opts: ChatOptions) -> int:
    """Run ``statetune chat`` until /quit or end of input; returns 1 if a command failed, else 0."""
    rt = load_runtime(opts, opts.state, opts.state_scale)
    check_stop_tokens(opts.stop_token, rt.model.config.vocab_size)
    rt.model.use_decode_layout()  # one conversation: faster matrix-vector products on CPU
    strings, ids = stops({}, rt.tokenizer, *opts.stop_lists())
    session = ChatSession(rt, opts.sampling_params(sorted({CHAT_END, *strings}), ids), opts.system)
    return converse(session)
