"""Step-wise batched decoding: many sequences, each with its own initial state and sampling parameters.

``Engine`` keeps the decoding sequences as one batch: their states concatenated along the batch
dimension and the logits of their next tokens. ``add`` queues a sequence; ``step`` prefills the queued
ones (each from its own state; prompts of equal length share a forward pass, and prompts are never padded,
which would change the state), picks one token for every sequence, and runs the model once on all the
sequences still going. Sequences join and leave between steps, which is all continuous batching needs.
What one sequence emits (text, stops) is kept by ``statetune.infer.sequence``.

Every step checks the logits it is about to sample from (one reduction over the batch): non-finite logits
are never sampled from, they raise :class:`~statetune.errors.NonFiniteError` naming the sequence's start
state, or, with ``isolate_failures``, end that sequence alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
from torch import Tensor

from statetune.errors import NonFiniteError
from statetune.infer.sampling import RowSampler, SamplingParams, sample
from statetune.infer.scoring import score_prompt, scores_at
from statetune.infer.sequence import ERROR, LENGTH, STOP, Completion, Delta
from statetune.infer.sequence import Seq as _Seq
from statetune.model.base import acc_dtype
from statetune.model.state import RWKVState
from statetune.tokenizer import StreamDecoder, Tokenizer

__all__ = ["ERROR", "LENGTH", "STOP", "Completion", "Delta", "Engine", "decode_all", "prefill"]


class Engine:
    """Batched decoding with sequences joining and leaving between steps.

    ``max_batch_size`` bounds the sequences decoded together (more wait in a queue); ``prefill_tokens``
    bounds the tokens of one prefill forward pass (long prompts are read in chunks). With
    ``isolate_failures`` (a server's choice) a sequence whose prefill or forward pass fails, or whose logits
    are not finite, ends alone with a :class:`Delta` whose ``finish_reason`` is ``"error"`` and whose
    ``error`` says why, while the others go on; without it such a failure raises from ``step`` (non-finite
    logits as :class:`~statetune.errors.NonFiniteError`).
    """

    def __init__(self, model, tokenizer: Tokenizer, max_batch_size: int = 64, prefill_tokens: int = 4096,
                 isolate_failures: bool = False) -> None:
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
        self.isolate_failures = isolate_failures
        self._failed: list[Delta] = []
        self._done: list[Delta] = []  # prompts scored without sampling, ended by the last admission

    # -- the queue -----------------------------------------------------------------------------------------
    def add(self, prompt: list[int], state: RWKVState | None = None, params: SamplingParams | None = None,
            keep_state: bool = False, keep_prompt_state: bool = False, logprobs: int | None = None,
            prompt_logprobs: int | None = None, score_only: bool = False, source: str | None = None) -> int:
        """Queue a sequence: ``prompt`` token ids (at least one) read from ``state`` (batch 1; None: zeros).

        Returns the sequence id used in :class:`Delta`. The caller's state is never modified. With
        ``keep_state`` the final :class:`Completion` carries the sequence's state, with ``keep_prompt_state``
        the state before the prompt's last token (the prompt is then read in two passes). ``logprobs`` (the
        number of alternatives, 0 or more) scores every sampled token (:attr:`Delta.score`),
        ``prompt_logprobs`` every prompt token (:attr:`Completion.prompt_scores`; the prompt is then read
        alone, position by position); ``score_only`` ends the sequence after its prompt, sampling nothing.
        ``source`` names the start state in errors (:func:`~statetune.errors.state_source`).
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
        scoring = prompt_logprobs is not None
        seq = _Seq(self._next_id, list(prompt), state, params, keep_state, RowSampler(params),
                   StreamDecoder(self.tokenizer), keep_prompt_state=keep_prompt_state and len(prompt) > 1
                   and not scoring, logprobs=logprobs, prompt_logprobs=prompt_logprobs, score_only=score_only,
                   source=source)
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
        """Sequences queued for a place in the batch (the server's queue-length metric)."""
        return len(self._waiting)

    def __len__(self) -> int:
        """Unfinished sequences, queued or decoding."""
        return len(self._waiting) + len(self._active)

    # -- decoding ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Delta]:
        """Prefill what fits of the queue, then pick one token for every decoding sequence."""
        self._admit()
        self._check_logits()
        deltas, self._failed, self._done = self._failed + self._done, [], []
        if not self._active:
            return deltas
        tokens = sample(self._logits, [s.sampler for s in self._active], self.vocab_size)
        keep = []
        for row, (seq, tok) in enumerate(zip(self._active, tokens, strict=True)):
            score = None if seq.logprobs is None else scores_at(self._logits[row:row + 1], [tok], seq.logprobs,
                                                                 self.vocab_size)[0]
            delta = seq.accept(tok, score)
            if delta.completion is None:
                keep.append(row)
            elif seq.keep_state:
                delta.completion.state = self._state.select([row])
            deltas.append(delta)
        self._keep(keep)
        if keep:
            ids = torch.tensor([[tokens[r]] for r in keep], device=self.model.device)
            try:
                logits, self._state = self.model(ids, self._state)
                self._logits = logits[:, -1]
            except Exception:
                if not self.isolate_failures:
                    raise
                self._forward_rows(ids)
                deltas, self._failed = deltas + self._failed, []
        return deltas

    def _forward_rows(self, ids: Tensor) -> None:
        """After a batched forward pass failed: each row alone, so that only the failing rows end."""
        states, logits, bad = [], [], []
        for r in range(len(self._active)):
            try:
                out, st = self.model(ids[r:r + 1], self._state.select([r]))
                states.append(st)
                logits.append(out[:, -1])
            except Exception as e:
                bad.append((r, f"{type(e).__name__}: {e}"))
                states.append(self._state.select([r]))
                logits.append(self._logits[r:r + 1])
        self._state, self._logits = RWKVState.cat(states), torch.cat(logits)
        self._fail_rows(dict(bad))

    def _check_logits(self) -> None:
        """Non-finite logits are never sampled from: one sum over the batch's logits per step (NaN and
        infinity carry through a sum; it costs far less than ``isfinite(logits).all()``, which builds a mask:
        about 10 us against 570 us for one row of 65,536 on a CPU thread), and only when the sum is not finite
        a look at each row (each bad row's sequence ends alone, or the first one raises)."""
        if not self._active or bool(self._logits.sum().isfinite()):
            return
        bad = [r for r, ok in enumerate(self._logits.isfinite().all(-1).tolist()) if not ok]
        if not bad:  # finite logits so large that their sum overflowed
            return
        errors = {}
        for r in bad:
            seq = self._active[r]
            after = f"after {len(seq.tokens)} generated token(s)" if seq.tokens else "after reading the prompt"
            errors[r] = NonFiniteError(f"the model's output {after}", "NaN or infinite logits", seq.source)
        if not self.isolate_failures:
            raise errors[bad[0]]
        self._fail_rows({r: str(e) for r, e in errors.items()})

    def _fail_rows(self, failures: dict[int, str]) -> None:
        """End the sequences of rows ``failures`` (row -> why) with an error delta; the others go on."""
        if not failures:
            return
        for r, why in sorted(failures.items()):
            self._failed.append(Delta(self._active[r].id, "", -1, ERROR, error=why))
        self._keep([r for r in range(len(self._active)) if r not in failures])

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
        by_len: dict[tuple, list[_Seq]] = {}
        for seq in new:  # a scored prompt is read alone (its own key)
            key = (seq.id,) if seq.prompt_logprobs is not None else (len(seq.prompt), seq.keep_prompt_state,
                                                                     seq.score_only)
            by_len.setdefault(key, []).append(seq)
        states, logits = [] if self._state is None else [self._state], [] if self._logits is None else [self._logits]
        groups = list(by_len.values())
        while groups:
            group = groups.pop(0)
            try:
                last, st = self._prefill(group)
            except Exception as e:
                if not self.isolate_failures:
                    raise
                if len(group) > 1:  # find the sequence(s) that fail: each alone
                    groups[:0] = [[s] for s in group]
                else:
                    self._failed.append(Delta(group[0].id, "", -1, ERROR, error=f"{type(e).__name__}: {e}"))
                continue
            for s in group:
                s.state = None  # the caller's state is not kept alive
            if group[0].score_only:  # nothing to sample: it ends here
                self._done.extend(s.scored() for s in group)
                continue
            states.append(st)
            logits.append(last)
            self._active.extend(group)
        if logits:
            self._state, self._logits = RWKVState.cat(states), torch.cat(logits)

    def _prefill(self, group: list[_Seq]) -> tuple[Tensor, RWKVState]:
        init = RWKVState.cat([self._initial(s.state) for s in group])
        if group[0].prompt_logprobs is not None:
            seq = group[0]
            seq.prompt_scores, last, st = score_prompt(self.model, seq.prompt, init, seq.prompt_logprobs,
                                                       vocab_size=self.vocab_size, source=seq.source)
            return last, st
        if not group[0].keep_prompt_state:
            return prefill(self.model, [s.prompt for s in group], init, self.prefill_tokens)
        _, st = prefill(self.model, [s.prompt[:-1] for s in group], init, self.prefill_tokens)
        for row, s in enumerate(group):
            s.prompt_state = st.select([row])
        return prefill(self.model, [s.prompt[-1:] for s in group], st, self.prefill_tokens)

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


def decode_all(model, tokenizer: Tokenizer, prompts: list[list[int]], state: RWKVState | None,
               params: SamplingParams | Sequence[SamplingParams], batch_size: int = 32, progress=None,
               source: str | None = None) -> list[str]:
    """The text each prompt continues with from ``state``, in input order: the engine run until every prompt
    is done, ``params`` shared or one per prompt (``progress.update(1)`` as each finishes, when given);
    non-finite logits raise :class:`~statetune.errors.NonFiniteError` naming ``source``."""
    per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    ids = [engine.add(p, state, q, source=source) for p, q in zip(prompts, per_prompt, strict=True)]
    done: dict[int, str] = {}
    while len(done) < len(ids):
        for delta in engine.step():
            if delta.finished:
                done[delta.seq_id] = delta.completion.text
                if progress is not None:
                    progress.update(1)
    return [done[i] for i in ids]
