"""Step-wise batched decoding: many sequences, each with its own initial state and sampling parameters.

``Engine`` keeps the decoding sequences as one batch: their states concatenated along the batch
dimension and the logits of their next tokens. ``add`` queues a sequence; ``step`` prefills the queued
ones (each from its own state; prompts of equal length share a forward pass, and prompts are never padded,
which would change the state), picks one token for every sequence, and runs the model once on all the
sequences still going. Sequences join and leave between steps, which is all continuous batching needs.

Text comes out through a UTF-8-safe ``StreamDecoder``. Stop strings are searched in the decoded text:
text from the first stop string on is never emitted, and text that could be the beginning of a stop
string is held back until it is known not to be.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from statetune.infer.sampling import RowSampler, SamplingParams, sample
from statetune.model.base import acc_dtype
from statetune.model.state import RWKVState
from statetune.tokenizer import StreamDecoder, Tokenizer

STOP, LENGTH = "stop", "length"


@dataclass
class Completion:
    """A finished sequence: its text (up to any stop string), tokens, and why it ended.

    ``tokens`` are all sampled tokens, including the stop token or the token that completed a stop string;
    ``state`` (when the sequence was added with ``keep_state``) is the state after the prompt and all tokens
    but the last one (the last sampled token is never fed to the model).
    """

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    stop: str | int | None = None
    state: RWKVState | None = None


@dataclass
class Delta:
    """What one step produced for one sequence: its new text (possibly empty) and the token sampled."""

    seq_id: int
    text: str
    token: int
    finish_reason: str | None = None
    completion: Completion | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Seq:
    id: int
    prompt: list[int]
    state: RWKVState | None
    params: SamplingParams
    keep_state: bool
    sampler: RowSampler
    decoder: StreamDecoder
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0

    def accept(self, token: int) -> Delta:
        """Take a sampled token: update the text, check the stops, say what to emit."""
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
            delta.completion = Completion(self.text, self.tokens, reason, len(self.prompt), stop)
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


class Engine:
    """Batched decoding with sequences joining and leaving between steps.

    ``max_batch_size`` bounds the sequences decoded together (more wait in a queue); ``prefill_tokens``
    bounds the tokens of one prefill forward pass (long prompts are read in chunks).
    """

    def __init__(self, model, tokenizer: Tokenizer, max_batch_size: int = 64, prefill_tokens: int = 4096) -> None:
        if max_batch_size < 1 or prefill_tokens < 1:
            raise ValueError("max_batch_size and prefill_tokens must be at least 1")
        self.model, self.tokenizer = model, tokenizer
        self.vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)
        self.max_batch_size, self.prefill_tokens = max_batch_size, prefill_tokens
        self._waiting: deque[_Seq] = deque()
        self._active: list[_Seq] = []
        self._state: RWKVState | None = None
        self._logits: Tensor | None = None
        self._next_id = 0

    # -- the queue -----------------------------------------------------------------------------------------
    def add(self, prompt: list[int], state: RWKVState | None = None, params: SamplingParams | None = None,
            keep_state: bool = False) -> int:
        """Queue a sequence: ``prompt`` token ids (at least one) read from ``state`` (batch 1; None: zeros).

        Returns the sequence id used in :class:`Delta`. The caller's state is never modified. With
        ``keep_state`` the final :class:`Completion` carries the sequence's state.
        """
        params = params or SamplingParams()
        params.check_vocab(self.model.config.vocab_size)
        if not prompt:
            raise ValueError("the prompt is empty: the model needs at least one token to predict from")
        bad = [t for t in prompt if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary "
                             f"(0..{self.model.config.vocab_size - 1})")
        if state is not None and state.batch_size != 1:
            raise ValueError(f"each sequence needs a batch-1 state, got batch {state.batch_size}")
        seq = _Seq(self._next_id, list(prompt), state, params, keep_state, RowSampler(params),
                   StreamDecoder(self.tokenizer))
        self._next_id += 1
        self._waiting.append(seq)
        return seq.id

    def cancel(self, seq_id: int) -> bool:
        """Drop a queued or decoding sequence; False when there is no such (unfinished) sequence."""
        for seq in self._waiting:
            if seq.id == seq_id:
                self._waiting.remove(seq)
                return True
        for row, seq in enumerate(self._active):
            if seq.id == seq_id:
                self._keep([r for r in range(len(self._active)) if r != row])
                return True
        return False

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        return len(self._active)

    def __len__(self) -> int:
        """Unfinished sequences, queued or decoding."""
        return len(self._waiting) + len(self._active)

    # -- decoding ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Delta]:
        """Prefill what fits of the queue, then pick one token for every decoding sequence."""
        self._admit()
        if not self._active:
            return []
        tokens = sample(self._logits, [s.sampler for s in self._active], self.vocab_size)
        deltas, keep = [], []
        for row, (seq, tok) in enumerate(zip(self._active, tokens, strict=True)):
            delta = seq.accept(tok)
            if delta.completion is None:
                keep.append(row)
            elif seq.keep_state:
                delta.completion.state = self._state.select([row])
            deltas.append(delta)
        self._keep(keep)
        if keep:
            ids = torch.tensor([[tokens[r]] for r in keep], device=self.model.device)
            logits, self._state = self.model(ids, self._state)
            self._logits = logits[:, -1]
        return deltas

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self._active):
            return
        self._active = [self._active[r] for r in rows]
        if rows:
            idx = torch.tensor(rows, device=self.model.device)
            self._state, self._logits = self._state.select(idx), self._logits[idx]
        else:
            self._state = self._logits = None

    def _admit(self) -> None:
        new: list[_Seq] = []
        while self._waiting and len(self._active) + len(new) < self.max_batch_size:
            new.append(self._waiting.popleft())
        if not new:
            return
        by_len: dict[int, list[_Seq]] = {}
        for seq in new:
            by_len.setdefault(len(seq.prompt), []).append(seq)
        states, logits = [] if self._state is None else [self._state], [] if self._logits is None else [self._logits]
        for group in by_len.values():
            init = RWKVState.cat([self._initial(s.state) for s in group])
            last, st = prefill(self.model, [s.prompt for s in group], init, self.prefill_tokens)
            states.append(st)
            logits.append(last)
            self._active.extend(group)
            for s in group:
                s.state = None  # the caller's state is not kept alive
        self._state, self._logits = RWKVState.cat(states), torch.cat(logits)

    def _initial(self, state: RWKVState | None) -> RWKVState:
        m = self.model
        if state is None:
            return m.zero_state(1)
        return RWKVState(state.att_shift.to(m.device, m.dtype), state.wkv.to(m.device, acc_dtype(m.dtype)),
                         state.ffn_shift.to(m.device, m.dtype))


@torch.no_grad()
def prefill(model, prompts: list[list[int]], state: RWKVState | None, max_tokens: int = 4096
            ) -> tuple[Tensor, RWKVState]:
    """Read equal-length ``prompts`` from ``state`` (batch 1 or len(prompts); None: zeros), in chunks of
    at most ``max_tokens`` tokens per pass; returns the last position's logits ``[B, V]`` and the state."""
    tokens = torch.tensor(prompts, device=model.device)
    B, T = tokens.shape
    if T == 0:
        raise ValueError("cannot prefill an empty prompt")
    chunk = max(1, max_tokens // B)
    for start in range(0, T, chunk):
        logits, state = model(tokens[:, start:start + chunk], state, last_only=True)
    return logits[:, -1], state
