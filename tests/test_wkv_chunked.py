"""Chunked WKV kernels (RWKV-7 and RWKV-6) against the sequential reference loop.

The chunked path runs in fp32; the reference runs on the same values in float64, i.e. it is the exact
recurrence, so the tolerance (relative error of whole tensors, ``<= 1e-4``) measures the chunked
kernel's own error. Outputs, final states and the gradients of every input, initial state included, are
compared, for several lengths (chunk multiples or not), chunk sizes, and decays from ``w ~ -1e-6`` (no
decay) to ``w ~ -30`` per token (the state is wiped every token).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from statetune.ops.chunked6 import wkv6_chunked
from statetune.ops.chunked7 import wkv7_chunked
from statetune.ops.reference import wkv6_reference, wkv7_reference

TOL = 1e-4


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error of a whole tensor."""
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def log_decays(shape: tuple[int, ...], mode: str, g: torch.Generator) -> torch.Tensor:
    """Log-decays ``w <= 0`` of a given regime."""
    u = torch.rand(shape, generator=g)
    if mode == "normal":        # RWKV-7's range, w in [-0.61, 0]
        return -0.6065306597126334 * u
    if mode == "strong":        # decay factor ~1e-9 .. 1e-13 per token
        return -20.0 - 10.0 * u
    if mode == "weak":          # decay factor ~ 1 - 1e-5
        return -1e-5 * u - 1e-6
    if mode == "mixed":         # every regime at once, per channel and token
        return -torch.exp(torch.empty(shape).uniform_(-14.0, 3.4, generator=g))
    raise ValueError(mode)


def make_inputs(B: int, T: int, H: int, N: int, mode: str = "normal", seed: int = 0,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random inputs with realistic RWKV-7 ``a = -kk``, ``b = kk * gate`` and a nonzero initial state."""
    g = torch.Generator().manual_seed(seed)
    kk = F.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    x = {
        "r": torch.randn(B, T, H, N, generator=g),
        "w": log_decays((B, T, H, N), mode, g),
        "k": torch.randn(B, T, H, N, generator=g) * 0.5,
        "v": torch.randn(B, T, H, N, generator=g),
        "a": -kk,
        "b": kk * torch.rand(B, T, H, N, generator=g),
        "u": torch.randn(H, N, generator=g) * 0.5,
        "state": torch.randn(B, H, N, N, generator=g),
    }
    return {k: v.to(dtype) for k, v in x.items()}


ARGS7 = ("r", "w", "k", "v", "a", "b", "state")
ARGS6 = ("r", "w", "k", "v", "u", "state")


def compare(version: int, x: dict[str, torch.Tensor], chunk_size: int) -> dict[str, float]:
    """Relative errors of chunked (fp32) vs reference (float64): y, final state, every gradient."""
    names, chunked, reference = (ARGS7, wkv7_chunked, wkv7_reference) if version == 7 else \
        (ARGS6, wkv6_chunked, wkv6_reference)
    xs = [x[n].clone().requires_grad_() for n in names]
    xd = [x[n].double().requires_grad_() for n in names]
    y, s = chunked(*xs, chunk_size=chunk_size)
    yr, sr = reference(*xd)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert y.shape == yr.shape and s.shape == sr.shape
    g = torch.Generator().manual_seed(1)
    gy, gs = torch.randn(yr.shape, generator=g, dtype=torch.float64), torch.randn(sr.shape, generator=g,
                                                                               dtype=torch.float64)
    grads = torch.autograd.grad((y * gy.float()).sum() + (s * gs.float()).sum(), xs)
    grads_ref = torch.autograd.grad((yr * gy).sum() + (sr * gs).sum(), xd)
    errs = {"y": rel(y, yr), "state": rel(s, sr)}
    errs.update({f"d{n}": rel(a, b) for n, a, b in zip(names, grads, grads_ref, strict=True)})
    return errs


CASES = [
    # (B, T, H, N, decay mode, chunk size)
    (2, 1, 3, 16, "normal", 32),
    (2, 17, 3, 16, "normal", 32),
    (2, 17, 3, 16, "mixed", 4),
    (2, 64, 3, 16, "normal", 16),
    (2, 64, 3, 16, "strong", 32),
    (2, 64, 3, 16, "weak", 64),
    (2, 100, 3, 16, "normal", 32),
    (2, 100, 3, 16, "mixed", 32),
    (2, 100, 3, 16, "strong", 16),
    (2, 100, 3, 16, "weak", 32),
    (1, 70, 1, 64, "normal", 32),
    (1, 40, 1, 64, "mixed", 64),
    (1, 1000, 2, 8, "normal", 32),
    (1, 1000, 1, 16, "mixed", 64),
]


@pytest.mark.parametrize("version", [7, 6])
@pytest.mark.parametrize("B,T,H,N,mode,chunk", CASES)
def test_chunked_matches_reference(version: int, B: int, T: int, H: int, N: int, mode: str,
                                   chunk: int) -> None:
    errs = compare(version, make_inputs(B, T, H, N, mode, seed=T + N), chunk)
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad} (all: {errs})"


@pytest.mark.parametrize("version", [7, 6])
@pytest.mark.parametrize("w", [-80.0, -1000.0])
def test_decay_underflows(version: int, w: float) -> None:
    """exp(w) at or below fp32's smallest normal number: still finite, still accurate."""
    x = make_inputs(2, 40, 2, 8, seed=1)
    x["w"] = torch.full_like(x["w"], w)
    errs = compare(version, x, 16)
    assert all(v <= TOL for v in errs.values()), errs


@pytest.mark.parametrize("version", [7, 6])
def test_default_chunk_size_and_fp32_reference(version: int) -> None:
    """Default chunk size; also within tolerance of the fp32 reference loop itself."""
    x = make_inputs(2, 70, 2, 32, "normal", seed=3)
    if version == 7:
        y, s = wkv7_chunked(*(x[n] for n in ARGS7))
        yr, sr = wkv7_reference(*(x[n] for n in ARGS7))
    else:
        y, s = wkv6_chunked(*(x[n] for n in ARGS6))
        yr, sr = wkv6_reference(*(x[n] for n in ARGS6))
    assert rel(y, yr) <= TOL and rel(s, sr) <= TOL


@pytest.mark.parametrize("version", [7, 6])
@pytest.mark.parametrize("T,chunk", [(5, 2), (7, 4), (9, 4), (9, 8), (1, 2)])
def test_gradcheck_float64(version: int, T: int, chunk: int) -> None:
    x = make_inputs(1, T, 2, 4, "mixed" if T == 9 else "normal", seed=T, dtype=torch.float64)
    if version == 7:
        names, fn = ARGS7, lambda *a: wkv7_chunked(*a, chunk_size=chunk)
    else:
        names, fn = ARGS6, lambda *a: wkv6_chunked(*a, chunk_size=chunk)
    xs = [x[n].requires_grad_() for n in names]
    out = fn(*xs)
    assert all(o.dtype == torch.float64 for o in out)
    # the longest case checks random projections of the Jacobian (fast mode) to keep the file quick
    assert torch.autograd.gradcheck(fn, xs, fast_mode=T >= 9)


@pytest.mark.parametrize("version", [7, 6])
def test_bfloat16_inputs_computed_in_fp32(version: int) -> None:
    x = {k: v if k == "state" else v.bfloat16() for k, v in make_inputs(1, 33, 2, 16, seed=2).items()}
    names, chunked, reference = (ARGS7, wkv7_chunked, wkv7_reference) if version == 7 else \
        (ARGS6, wkv6_chunked, wkv6_reference)
    y, s = chunked(*(x[n] for n in names))
    yr, sr = reference(*(x[n] for n in names))
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel(y, yr) <= TOL and rel(s, sr) <= TOL


@pytest.mark.parametrize("version", [7, 6])
def test_state_only_gradient(version: int) -> None:
    """State tuning: only the initial state requires grad (the inputs come from a frozen model)."""
    x = make_inputs(2, 50, 2, 16, "mixed", seed=4)
    names, chunked, reference = (ARGS7, wkv7_chunked, wkv7_reference) if version == 7 else \
        (ARGS6, wkv6_chunked, wkv6_reference)
    s = x["state"].clone().requires_grad_()
    sd = x["state"].double().requires_grad_()
    y, st = chunked(*(s if n == "state" else x[n] for n in names), chunk_size=16)
    yr, str_ = reference(*(sd if n == "state" else x[n].double() for n in names))
    gy = torch.randn(yr.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad((y * gy.float()).sum() + st.square().sum(), [s])
    (gr,) = torch.autograd.grad((yr * gy).sum() + str_.square().sum(), [sd])
    assert rel(g, gr) <= TOL


@pytest.mark.parametrize("version", [7, 6])
def test_inputs_not_modified(version: int) -> None:
    x = make_inputs(2, 37, 2, 8, "normal", seed=5)
    before = {k: v.clone() for k, v in x.items()}
    xs = {k: v.requires_grad_() for k, v in x.items()}
    if version == 7:
        y, s = wkv7_chunked(*(xs[n] for n in ARGS7), chunk_size=8)
    else:
        y, s = wkv6_chunked(*(xs[n] for n in ARGS6), chunk_size=8)
    (y.sum() + s.sum()).backward()
    for k, v in x.items():
        assert torch.equal(v.detach(), before[k]), f"{k} was modified"
    assert s.data_ptr() != xs["state"].data_ptr()


def test_bad_chunk_size() -> None:
    x = make_inputs(1, 8, 1, 4)
    with pytest.raises(ValueError):
        wkv7_chunked(*(x[n] for n in ARGS7), chunk_size=24)


def test_dispatch_chunked_path() -> None:
    """The public dispatchers route ``impl="chunked"`` here."""
    from statetune.ops.wkv6 import wkv6
    from statetune.ops.wkv7 import wkv7

    x = make_inputs(1, 40, 2, 8, "normal", seed=9)
    y, s = wkv7(*(x[n] for n in ARGS7), impl="chunked")
    yr, sr = wkv7_reference(*(x[n] for n in ARGS7))
    assert rel(y, yr) <= TOL and rel(s, sr) <= TOL
    y, s = wkv6(*(x[n] for n in ARGS6), impl="chunked")
    yr, sr = wkv6_reference(*(x[n] for n in ARGS6))
    assert rel(y, yr) <= TOL and rel(s, sr) <= TOL


def _fla_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    from statetune.ops.dispatch import fla_available

    return fla_available()


@pytest.mark.skipif(not _fla_usable(), reason="needs CUDA and flash-linear-attention")
@pytest.mark.parametrize("version", [7, 6])
def test_fla_matches_chunked_on_gpu(version: int) -> None:
    from statetune.ops.fla_path import wkv6_fla, wkv7_fla

    x = {k: v.cuda() for k, v in make_inputs(2, 200, 4, 64, "normal", seed=11).items()}
    names, fla, chunked = (ARGS7, wkv7_fla, wkv7_chunked) if version == 7 else (ARGS6, wkv6_fla, wkv6_chunked)
    xs = [x[n].clone().requires_grad_() for n in names]
    xc = [x[n].clone().requires_grad_() for n in names]
    y, s = fla(*xs)
    yc, sc = chunked(*xc)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    # fla may use TF32 matmuls for fp32 inputs, hence the looser tolerance
    assert rel(y, yc) <= 5e-3 and rel(s, sc) <= 5e-3
    gy, gs = torch.randn_like(yc), torch.randn_like(sc)
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), xs)
    grads_c = torch.autograd.grad((yc * gy).sum() + (sc * gs).sum(), xc)
    for n, a, b in zip(names, grads, grads_c, strict=True):
        assert rel(a, b) <= 5e-3, n
