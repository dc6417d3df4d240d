"""The CUDA path (flash-linear-attention's Triton kernels) checked on CPU under Triton's interpreter.

Needs the ``fla-test`` extra (pinned fla and triton, see ``tests/fla_shims.py``); skipped without it. The
kernels are exact in fp32 under the interpreter, so output, final state and the gradient of every input
(the initial state's first) must agree with the reference loop to ~1e-6 relative. The dispatch tests at
the end need no extra.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest
import torch

from statetune.errors import OptionError
from statetune.model.checkpoint import load_model
from statetune.model.random_init import random_checkpoint
from statetune.model.state import RWKVState
from statetune.ops import dispatch
from statetune.ops.fla_path import wkv6_fla, wkv7_fla
from statetune.ops.reference import wkv6_reference, wkv7_reference

HAVE_FLA = all(importlib.util.find_spec(m) is not None for m in ("fla", "triton"))
# Triton reads TRITON_INTERPRET once, when its jit is first set up: in a process where another test got there
# first, fla's kernels would be GPU kernels. So the kernel tests run in a pytest process of their own, asked for
# with STATETUNE_FLA_TESTS=1 (.ci/run and the README's test command do this), and skip in the full suite.
OWN_PROCESS = os.environ.get("STATETUNE_FLA_TESTS") == "1"
needs_fla = pytest.mark.skipif(not (HAVE_FLA and OWN_PROCESS), reason=(
    "runs in a process of its own: STATETUNE_FLA_TESTS=1 python -m pytest tests/test_fla_interpret.py" if HAVE_FLA
    else "needs the fla-test extra (flash-linear-attention, triton)"))
B, T, H = 2, 21, 2  # T: not a multiple of fla's chunk sizes (16 for RWKV-7, 64 for RWKV-6)
# fla warns that fp32 is "not supported on some platforms" and that it fell back to CPU: both expected here
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning:torch"),
              pytest.mark.filterwarnings("ignore:Triton is not supported:UserWarning")]
REL = 2e-5  # observed ~1e-6; the bound leaves room for other BLAS orders, not for a wrong recurrence


@pytest.fixture(scope="module")
def interpreted_fla():
    """fla imported under Triton's interpreter; TRITON_INTERPRET stays on for this module's tests only."""
    old = os.environ.get("TRITON_INTERPRET")
    from fla_shims import import_fla_interpreted  # switches the interpreter on

    try:
        import_fla_interpreted()
    except RuntimeError as e:
        pytest.skip(str(e))
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def _inputs(version: str, N: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -torch.rand(B, T, H, N, generator=g) * 0.6 - 0.01  # log-decays in a trained model's range
    state = torch.randn(B, H, N, N, generator=g) * 0.1
    if version == "rwkv7":
        kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
        xs = [r, w, k, v, -kk, kk * torch.rand(B, T, H, N, generator=g), state]
    else:
        xs = [r, w, k, v, torch.randn(H, N, generator=g) * 0.3, state]
    return [x.requires_grad_() for x in xs]


def _run(fn, xs, seed: int):
    for x in xs:
        x.grad = None
    y, s = fn(*xs)
    g = torch.Generator().manual_seed(seed)
    # random weights on the output and the state: every element's gradient takes part
    loss = (y * torch.randn(y.shape, generator=g)).sum() + (s * torch.randn(s.shape, generator=g)).sum()
    loss.backward()
    return y.detach(), s.detach(), [x.grad.clone() for x in xs]


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < REL, f"{what}: max error {err:.2e} relative to the largest value"


@needs_fla
@pytest.mark.slow
@pytest.mark.parametrize("N", [16, 64])
@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
def test_fla_matches_reference_loop(interpreted_fla, version, N):
    fla_fn, ref_fn = (wkv7_fla, wkv7_reference) if version == "rwkv7" else (wkv6_fla, wkv6_reference)
    names = ["r", "w", "k", "v", "a", "b", "state"] if version == "rwkv7" else ["r", "w", "k", "v", "u", "state"]
    xs = _inputs(version, N, seed=N)
    y, s, grads = _run(fla_fn, xs, seed=1)
    y0, s0, grads0 = _run(ref_fn, xs, seed=1)
    _close(y, y0, "output")
    _close(s, s0, "final state")
    for name, g, g0 in zip(names, grads, grads0, strict=True):
        _close(g, g0, f"d/d{name}")


@needs_fla
@pytest.mark.slow
@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
def test_model_on_fla_matches_chunked(interpreted_fla, tmp_path, version):
    lora = {"w": 8, "a": 8, "v": 8, "g": 8} if version == "rwkv7" else {"maa": 8, "decay": 8}
    torch.save(random_checkpoint(version, n_layer=1, n_embd=32, head_size=16, vocab_size=97, seed=3, lora=lora),
               tmp_path / "m.pth")
    model = load_model(tmp_path / "m.pth")
    tokens = torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(4))
    results = []
    for impl in ("chunked", "fla"):
        model.set_wkv_impl(impl)
        z = model.zero_state(1)
        wkv = (torch.randn(z.wkv.shape, generator=torch.Generator().manual_seed(5)) * 0.1).requires_grad_()
        logits, state = model(tokens, RWKVState(z.att_shift, wkv, z.ffn_shift))
        logits.logsumexp(-1).sum().backward()
        results.append((logits.detach(), state.wkv.detach(), wkv.grad))
    (l0, s0, g0), (l1, s1, g1) = results
    _close(l1, l0, "logits")
    _close(s1, s0, "final WKV state")
    _close(g1, g0, "gradient of the initial state")


# -- the dispatch point (no extra needed) --------------------------------------------------------------------
def _xs7(N: int = 16):
    return [t.detach() for t in _inputs("rwkv7", N, seed=0)]


def test_fla_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "fla_available", lambda: True)
    from statetune.ops import wkv7

    with pytest.raises(OptionError, match="fla's kernels need CUDA tensors, got cpu.*TRITON_INTERPRET=1"):
        wkv7(*_xs7(), impl="fla")
    monkeypatch.setenv("STATETUNE_WKV", "fla")
    with pytest.raises(OptionError, match="STATETUNE_WKV=fla: fla's kernels need CUDA"):
        wkv7(*_xs7())


def test_fla_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("STATETUNE_NO_FLA", "1")
    dispatch.fla_available.cache_clear()
    try:
        from statetune.ops import wkv6

        xs = [t.detach() for t in _inputs("rwkv6", 16, seed=0)]
        with pytest.raises(OptionError, match="flash-linear-attention is not installed"):
            wkv6(*xs, impl="fla")
    finally:
        monkeypatch.delenv("STATETUNE_NO_FLA")
        dispatch.fla_available.cache_clear()


@pytest.mark.parametrize("version", ["rwkv7", "rwkv6"])
def test_bf16_model_keeps_the_decay_fp32_for_fla(monkeypatch, version):
    """Stand-ins for fla's entry points record the dtypes statetune hands them."""
    seen = {}

    def fake(**kw):
        seen.update({k: v.dtype for k, v in kw.items() if isinstance(v, torch.Tensor)})
        r = kw["r"]
        return torch.zeros_like(r), torch.zeros_like(kw["initial_state"])

    for name, attr in (("fla.ops.rwkv7", "chunk_rwkv7"), ("fla.ops.rwkv6", "chunk_rwkv6")):
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**{attr: fake}))
    xs = [t.detach().to(torch.bfloat16) for t in _inputs(version, 16, seed=0)]
    xs[-1] = xs[-1].float()
    (wkv7_fla if version == "rwkv7" else wkv6_fla)(*xs)
    assert seen["w"] == torch.float32 and seen["initial_state"] == torch.float32
    assert seen["r"] == seen["k"] == seen["v"] == torch.bfloat16
