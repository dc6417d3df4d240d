"""The LR finder picks a rate in the right decade where the best rate is known: analytically on a quadratic,
and by a fine sweep (done here) for a tiny RWKV-7's state; plus its documented rule and errors."""

from __future__ import annotations

import math

import pytest
import torch

from statetune.model.checkpoint import load_model
from statetune.model.state import RWKVState
from statetune.objective import masked_lm_loss
from statetune.train.lr_finder import LRSearchError, find_lr, log_rates

CURVATURES = (1.0, 4.0)


def quadratic_trial(lr: float, steps: int) -> float:
    """Gradient descent on f(x) = sum(h_i x_i^2) / 2 from x = 1; returns f after ``steps`` steps.

    Each coordinate shrinks by |1 - lr h_i| per step, so the fastest rate is 2 / (h_min + h_max) = 0.4
    and any rate above 2 / h_max = 0.5 diverges.
    """
    h = torch.tensor(CURVATURES, dtype=torch.float64)
    x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([x], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (h * x * x).sum()).backward()
        opt.step()
    return float(0.5 * (h * x.detach() * x.detach()).sum())


def test_quadratic_picks_the_analytic_decade() -> None:
    best = 2 / (min(CURVATURES) + max(CURVATURES))
    search = find_lr(quadratic_trial, low=1e-3, high=10.0, steps=20)
    assert 0.1 <= best < 1 and 0.1 <= search.lr < 1, search.log()
    # the decade grid was tried first, then the midpoints either side of its best (0.1)
    assert [t.lr for t in search.trials][:5] == [0.001, 0.01, 0.1, 1.0, 10.0]
    assert {t.lr for t in search.trials[5:]} == {0.0316228, 0.316228}
    start = quadratic_trial(0.0, 0)
    assert search.trials[3].loss > start and search.trials[4].loss > start  # above 0.5: growing, not shrinking
    assert search.best_loss == min(t.loss for t in search.trials)


def tiny_trial(model, train: list[torch.Tensor], held_out: list[torch.Tensor]):
    """Adam on the WKV state of ``model`` from zeros for ``steps`` steps over ``train``; held-out loss."""

    def trial(lr: float, steps: int) -> float:
        zero = model.zero_state(1)
        wkv = torch.nn.Parameter(zero.wkv.clone())
        opt = torch.optim.Adam([wkv], lr=lr)
        for i in range(steps):
            tokens = train[i % len(train)]
            state = RWKVState(zero.att_shift, wkv, zero.ffn_shift)
            loss, n, _ = masked_lm_loss(model, tokens, torch.ones_like(tokens), state)
            opt.zero_grad()
            (loss / n).backward()
            opt.step()
        with torch.no_grad():
            state = RWKVState(zero.att_shift, wkv.detach(), zero.ffn_shift)
            total = sum(float(masked_lm_loss(model, t, torch.ones_like(t), state)[0]) for t in held_out)
            count = sum(t.numel() - t.shape[0] for t in held_out)
        return total / count

    return trial


def test_tiny_rwkv_state_lands_in_the_fine_sweeps_decade(tiny_ckpt) -> None:
    torch.manual_seed(0)
    model = load_model(tiny_ckpt("rwkv7"))
    model.requires_grad_(False)
    # a task a state can learn: text drawn from a skewed distribution over a few tokens
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    draw = lambda: 40 + torch.multinomial(probs, 4 * 16, replacement=True).view(4, 16)  # noqa: E731
    train, held_out = [draw() for _ in range(4)], [draw() for _ in range(2)]
    trial = tiny_trial(model, train, held_out)
    steps = 8
    fine = {lr: trial(lr, steps) for lr in log_rates(1e-2, 1e2, per_decade=2)}
    fine_best = min(fine, key=fine.get)
    # the fine sweep has an interior optimum (too low learns nothing, too high overshoots)
    assert min(fine) < fine_best < max(fine), fine
    assert fine[fine_best] < fine[min(fine)] - 0.05 and fine[fine_best] < fine[max(fine)] - 0.05, fine
    search = find_lr(trial, low=1e-2, high=1e2, steps=steps)
    assert abs(math.log10(search.lr / fine_best)) <= 0.5, (search.log(), fine)
    assert len(search.trials) == 7  # five decades, then two midpoints: a handful of trials


def test_ties_go_to_the_smaller_rate_and_divergence_is_skipped() -> None:
    def trial(lr: float, steps: int) -> float:
        if lr >= 10:
            raise FloatingPointError("overflow")
        return 1.0 if lr >= 0.1 else 2.0

    search = find_lr(trial, rates=[0.01, 0.1, 1.0, 10.0], steps=3, refine=False)
    assert search.lr == 0.1 and search.trials[-1].diverged and search.log()[-1]["loss"] is None
    assert "lowest held-out loss after 3 steps over 4 rates" == search.rule
    assert find_lr(trial, rates=[0.1, 1.0], steps=3, refine=False, shrink=2).lr == 0.05


@pytest.mark.parametrize("kwargs, message", [
    ({"rates": [0.1, -1.0]}, "positive finite"), ({"steps": 0}, "at least 1"), ({"low": 1.0, "high": 0.1}, "low <="),
    ({"shrink": 0.0}, "positive factor")])
def test_bad_settings_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(LRSearchError, match=message):
        find_lr(quadratic_trial, **kwargs)


def test_all_diverged_is_an_error() -> None:
    with pytest.raises(LRSearchError, match="every learning rate tried diverged"):
        find_lr(lambda lr, steps: math.nan, rates=[1.0, 10.0], steps=2)


def test_log_rates_spans_the_range() -> None:
    assert log_rates(0.1, 100.0) == [0.1, 1.0, 10.0, 100.0]
    assert log_rates(1.0, 100.0, per_decade=2) == [1.0, 3.16228, 10.0, 31.6228, 100.0]
