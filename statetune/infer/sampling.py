"""Sampling parameters with validation, and batched next-token selection where each row has its own.

Penalties count the tokens a sequence has generated so far (not its prompt), as the RWKV pipeline and the
OpenAI API do: ``repetition_penalty`` divides a positive logit (multiplies a negative one) of every token
seen at least once; ``presence_penalty`` subtracts a constant from them; ``frequency_penalty`` subtracts
that much per occurrence. With ``penalty_decay`` below 1 every count fades by that factor per generated
token (the RWKV pipeline's 0.996: a token seen long ago is penalised less, and presence fades with it).
Then ``temperature`` (0: greedy), ``top_k`` and ``top_p`` shape the distribution.
Each row draws its random numbers from its own generator, so a seeded sequence gives the same tokens
whether it is decoded alone or in a batch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from statetune.errors import OptionError
from statetune.options import flag, h

MAX_SEED = 2**63 - 1


class SamplingError(OptionError, ValueError):
    """An invalid sampling parameter; ``field`` names it (the CLI turns it into its flag)."""

    def __init__(self, field: str, detail: str, value: Any) -> None:
        super().__init__(f"{field}: {detail}, got {value!r}")
        self.field, self.detail, self.value = field, detail, value


def _number(name: str, value: Any, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool):
        raise SamplingError(name, "expected an integer" if integer else "expected a number", value)
    if not integer and not math.isfinite(value):
        raise SamplingError(name, "must be a finite number", value)
    return value


@dataclass
class SamplingParams:
    """How one sequence picks its tokens and when it ends; validated on construction."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if _number("temperature", self.temperature) < 0:
            raise SamplingError("temperature", "must be 0 (greedy) or more", self.temperature)
        if not 0 < _number("top_p", self.top_p) <= 1:
            raise SamplingError("top_p", "must be in (0, 1]", self.top_p)
        if _number("top_k", self.top_k, integer=True) < 0:
            raise SamplingError("top_k", "must be 0 (off) or more", self.top_k)
        if _number("repetition_penalty", self.repetition_penalty) <= 0:
            raise SamplingError("repetition_penalty", "must be above 0 (1 = off)", self.repetition_penalty)
        _number("presence_penalty", self.presence_penalty)
        _number("frequency_penalty", self.frequency_penalty)
        if not 0 < _number("penalty_decay", self.penalty_decay) <= 1:
            raise SamplingError("penalty_decay", "must be in (0, 1] (1 = counts never fade)", self.penalty_decay)
        if _number("max_tokens", self.max_tokens, integer=True) < 1:
            raise SamplingError("max_tokens", "must be at least 1", self.max_tokens)
        if self.seed is not None and not 0 <= _number("seed", self.seed, integer=True) <= MAX_SEED:
            raise SamplingError("seed", f"must be in 0..{MAX_SEED}", self.seed)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list | tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError("stop", "expected a list of non-empty strings", self.stop)
        if not isinstance(self.stop_token_ids, list | tuple):
            raise SamplingError("stop_token_ids", "expected a list of token ids", self.stop_token_ids)
        for t in self.stop_token_ids:
            if _number("stop_token_ids", t, integer=True) < 0:
                raise SamplingError("stop_token_ids", "token ids must be 0 or more", t)
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise :class:`SamplingError` for a stop token id outside a vocabulary of ``vocab_size``."""
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise SamplingError("stop_token_ids", f"token id outside the vocabulary (0..{vocab_size - 1})", t)

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small that float32 (the dtype logits are scaled in) rounds it to 0."""
        return float(torch.tensor(self.temperature, dtype=torch.float32)) == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


class RowSampler:
    """The sampling state of one sequence: its parameters, counts of generated tokens, its generator.

    With ``penalty_decay`` below 1 the counts are kept in units that grow by ``1 / decay`` per token (so
    fading them all costs nothing); :meth:`weights` gives the faded counts.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._counts: Counter[int] = Counter()
        self._unit = 1.0  # what one occurrence now adds; a stored count over it is the faded count
        seed = params.seed if params.seed is not None else int(torch.randint(0, MAX_SEED, (), dtype=torch.int64))
        self.generator = torch.Generator().manual_seed(seed)

    def observe(self, token: int) -> None:
        """Count a generated token (for the penalties); earlier counts fade by ``penalty_decay``."""
        decay = self.params.penalty_decay
        if decay != 1.0:
            self._unit /= decay
            if self._unit > 1e200:  # rescale long before float64 overflows
                self._counts = Counter({t: c / self._unit for t, c in self._counts.items()})  # faded already
                self._unit = 1.0
        self._counts[token] += self._unit

    @property
    def counts(self) -> dict[int, float]:
        """Token -> occurrences so far, each faded by ``penalty_decay`` per token generated since."""
        return {t: c / self._unit for t, c in self._counts.items()}

    def uniform(self) -> float:
        """The next random number in [0, 1) of this row."""
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))


def penalize(logits: Tensor, rows: Sequence[RowSampler]) -> Tensor:
    """``logits [B, V]`` (float) with each row's penalties applied to the tokens it generated (a new tensor)."""
    logits = logits.clone()
    r_idx, t_idx, counts, rep, pres, freq = [], [], [], [], [], []
    for r, row in enumerate(rows):
        p = row.params
        if not p.penalized:
            continue
        for tok, n in row.counts.items():
            if tok < logits.shape[1]:
                r_idx.append(r), t_idx.append(tok), counts.append(n)
                rep.append(p.repetition_penalty), pres.append(p.presence_penalty), freq.append(p.frequency_penalty)
    if not r_idx:
        return logits
    dev, dt = logits.device, logits.dtype
    ri, ti = torch.tensor(r_idx, device=dev), torch.tensor(t_idx, device=dev)
    vals = logits[ri, ti]
    rp = torch.tensor(rep, device=dev, dtype=dt)
    vals = torch.where(vals > 0, vals / rp, vals * rp)
    vals = vals - torch.tensor(pres, device=dev, dtype=dt) - torch.tensor(counts, device=dev, dtype=dt) * torch.tensor(
        freq, device=dev, dtype=dt)
    logits[ri, ti] = vals
    return logits


def probabilities(logits: Tensor, rows: Sequence[RowSampler]) -> tuple[Tensor, Tensor]:
    """Per-row distributions over tokens sorted by logit: ``(probs [B, V], token ids [B, V])``.

    ``logits`` are already penalized; temperature, top-k and top-p are applied here. Rows must not be greedy.
    """
    dev = logits.device
    temp = torch.tensor([r.params.temperature for r in rows], device=dev, dtype=logits.dtype)
    # shift by the row maximum first so that a tiny temperature gives -inf, never inf - inf
    scaled = (logits - logits.max(-1, keepdim=True).values) / temp[:, None]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    V = logits.shape[1]
    top_k = torch.tensor([r.params.top_k or V for r in rows], device=dev)
    ranks = torch.arange(V, device=dev)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], -math.inf)
    probs = torch.softmax(sorted_logits, dim=-1)
    top_p = torch.tensor([r.params.top_p if r.params.top_p < 1 else math.inf for r in rows], device=dev,
                         dtype=probs.dtype)
    before = probs.cumsum(-1) - probs  # mass of the better tokens: keep a token until top_p is covered
    probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    return probs / probs.sum(-1, keepdim=True), order


def sample(logits: Tensor, rows: Sequence[RowSampler], vocab_size: int | None = None) -> list[int]:
    """One next token per row of ``logits [B, V]``, each row by its own parameters and generator.

    Only ids below ``vocab_size`` can be chosen (a model's vocabulary may be padded past the tokenizer's).
    """
    logits = logits[:, :vocab_size].float()
    if any(r.params.penalized for r in rows):  # else no copy: nothing below writes into the logits
        logits = penalize(logits, rows)
    out = logits.argmax(-1).tolist()
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        sub = [rows[i] for i in sampled]
        probs, order = probabilities(logits[sampled], sub)
        cdf = probs.cumsum(-1)
        u = torch.tensor([r.uniform() for r in sub], device=cdf.device, dtype=cdf.dtype)
        pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[1] - 1)
        for i, tok in zip(sampled, order.gather(1, pos)[:, 0].tolist(), strict=True):
            out[i] = tok
    return out


@dataclass(kw_only=True)
class SamplingOptions:
    """The sampling flags ``generate`` and ``chat`` share; checked by building a :class:`SamplingParams`."""

    temperature: float = field(default=1.0, metadata=h("Sampling temperature; 0 = greedy (always the most "
                                                        "likely token)."))
    top_p: float = field(default=0.85, metadata=h("Nucleus sampling: keep the most likely tokens that cover "
                                                   "this much probability (1 = off)."))
    top_k: int = field(default=0, metadata=h("Keep only the K most likely tokens (0 = off)."))
    repetition_penalty: float = field(default=1.0, metadata=h(
        "Divide the positive logits (multiply the negative ones) of tokens already generated (1 = off)."))
    presence_penalty: float = field(default=0.0, metadata=h("Subtract from the logit of every token already "
                                                             "generated."))
    frequency_penalty: float = field(default=0.0, metadata=h("Subtract this times the number of times a token "
                                                              "was generated from its logit."))
    penalty_decay: float = field(default=1.0, metadata=h("Fade every count by this factor per generated "
                                                         "token (RWKV's usual 0.996; 1 = never)."))
    max_tokens: int = field(default=256, metadata=h("Most tokens to generate per answer."))
    seed: int | None = field(default=None, metadata=h("Random seed, for reproducible sampling."))
    stop: list[str] | None = field(default=None, metadata=h(
        r"Stop strings, e.g. --stop '\n\n' 'User:' (\n is a newline); the answer ends before them."))
    stop_token: list[int] | None = field(default=None, metadata=h("Stop token ids, e.g. --stop-token 0 261."))

    def __post_init__(self) -> None:
        self.sampling_params(list(self.stop or []), list(self.stop_token or []))

    def sampling_params(self, stop: list[str], stop_ids: list[int], seed_offset: int = 0) -> SamplingParams:
        """These flags as :class:`SamplingParams` with the given stops; errors name the flag."""
        try:
            return SamplingParams(
                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, penalty_decay=self.penalty_decay,
                max_tokens=self.max_tokens,
                seed=self._seed(seed_offset),
                stop=stop, stop_token_ids=stop_ids)
        except SamplingError as e:
            name = {"stop_token_ids": "stop_token"}.get(e.field, e.field)
            raise OptionError(f"{flag(name)}: {e.detail}, got {e.value!r}") from None

    def _seed(self, offset: int) -> int | None:
        """``--seed`` moved on by ``offset`` (wrapping round); an out-of-range seed is passed on as given, to
        be refused (``--seed -1`` must not silently wrap to the largest seed)."""
        if self.seed is None or not 0 <= self.seed <= MAX_SEED:
            return self.seed
        return (self.seed + offset) % (MAX_SEED + 1)

    def stop_lists(self) -> tuple[list[str] | None, list[int] | None]:
        """``--stop`` (escapes such as ``\\n`` turned into characters) and ``--stop-token``, None when not given."""
        from statetune.data.fields import unescape

        return (None if self.stop is None else [unescape(s) for s in self.stop]), self.stop_token
