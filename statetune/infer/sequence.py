"""One decoding sequence's bookkeeping: its text, stops and what each step emits (used by ``Engine``).

Text comes out through a UTF-8-safe ``StreamDecoder``. Stop strings are searched in the decoded text:
text from the first stop string on is never emitted, and text that could be the beginning of a stop
string is held back until it is known not to be.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from statetune.infer.sampling import RowSampler, SamplingParams
from statetune.infer.scoring import TokenScore
from statetune.model.state import RWKVState
from statetune.tokenizer import StreamDecoder

STOP, LENGTH, ERROR = "stop", "length", "error"


@dataclass
class Completion:
    """A finished sequence: its text (up to any stop string), tokens, and why it ended.

    ``tokens`` are all sampled tokens, including the stop token or the token that completed a stop string;
    ``state`` (when the sequence was added with ``keep_state``) is the state after the prompt and all tokens
    but the last one (the last sampled token is never fed to the model); ``prompt_state`` (added with
    ``keep_prompt_state``, prompts of two tokens or more) the state after all of the prompt but its last token.
    ``scores`` (a sequence added with ``logprobs``) holds one :class:`TokenScore` per sampled token,
    ``prompt_scores`` (added with ``prompt_logprobs``) one per prompt token.
    """

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    stop: str | int | None = None
    state: RWKVState | None = None
    prompt_state: RWKVState | None = None
    scores: list[TokenScore] | None = None
    prompt_scores: list[TokenScore] | None = None


@dataclass
class Delta:
    """What one step produced for one sequence: its new text (possibly empty) and the token sampled
    (-1 when none was: a failure, or a prompt scored without generating), with its score when asked for."""

    seq_id: int
    text: str
    token: int
    finish_reason: str | None = None
    completion: Completion | None = None
    error: str | None = None
    score: TokenScore | None = None
    prompt_scores: list[TokenScore] | None = None  # a scored prompt's, on the sequence's first delta

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Seq:
    id: int
    prompt: list[int]
    state: RWKVState | None
    params: SamplingParams
    keep_state: bool
    sampler: RowSampler
    decoder: StreamDecoder
    keep_prompt_state: bool = False
    source: str | None = None  # the start state, as errors name it
    prompt_state: RWKVState | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    score_only: bool = False
    scores: list[TokenScore] | None = None
    prompt_scores: list[TokenScore] | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0

    def accept(self, token: int, score: TokenScore | None = None) -> Delta:
        """Take a sampled token (and its score): update the text, check the stops, say what to emit."""
        if score is not None:
            self.scores = [*(self.scores or []), score]
        first = not self.tokens
        delta = self._accept(token)
        delta.score = score
        if first:
            delta.prompt_scores = self.prompt_scores
        return delta

    def scored(self) -> Delta:
        """The end of a sequence that only scores its prompt: no token, reason ``length``."""
        delta = Delta(self.id, "", -1, LENGTH, prompt_scores=self.prompt_scores)
        delta.completion = Completion("", [], LENGTH, len(self.prompt), prompt_scores=self.prompt_scores,
                                      scores=[])
        return delta

    def _accept(self, token: int) -> Delta:
        p = self.params
        self.tokens.append(token)
        self.sampler.observe(token)
        if token in p.stop_token_ids:
            return self._emit(self.decoder.flush(), token, final=True, reason=STOP, stop=token)
        final = len(self.tokens) >= p.max_tokens
        new = self.decoder.push(token) + (self.decoder.flush() if final else "")
        return self._emit(new, token, final, reason=LENGTH if final else None)

    def _emit(self, new: str, token: int, final: bool, reason: str | None, stop: str | int | None = None) -> Delta:
        self.text += new
        hit = min(((i, s) for s in self.params.stop if (i := self.text.find(s, self.emitted)) >= 0), default=None)
        if hit is not None:
            end, stop, reason = hit[0], hit[1], STOP
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held()
        delta = Delta(self.id, self.text[self.emitted:end], token, reason)
        self.emitted = max(self.emitted, end)
        if reason is not None:
            self.text = self.text[:self.emitted]
            delta.completion = Completion(self.text, self.tokens, reason, len(self.prompt), stop,
                                          prompt_state=self.prompt_state, scores=self.scores,
                                          prompt_scores=self.prompt_scores)
        return delta

    def _held(self) -> int:
        """Length of the longest end of the unemitted text that begins some stop string."""
        tail = len(self.text) - self.emitted
        best = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, tail), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
