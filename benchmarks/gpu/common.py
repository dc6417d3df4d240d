"""What the parts of the GPU check share: random inputs and models, the state-tuning step, memory readings."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

# (layers, width) of the model families timed; vocabulary 65536, head size 64, FFN 4x
SHAPES = {"0.1B": (12, 768), "1.5B": (24, 2048)}
TINY_SHAPES = {"tiny-a": (2, 64), "tiny-b": (2, 128)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def device_of(opts: Any) -> torch.device:
    """The device a part runs on (``opts.device``, already checked by the command line), threads set."""
    if getattr(opts, "threads", None):
        torch.set_num_threads(opts.threads)
    return torch.device(opts.device)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference value."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def diff(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference, and the same relative to the largest reference value."""
    return {"max_abs": (got.float() - want.float()).abs().max().item(), "max_rel": rel(got, want)}


def fla_status(device: torch.device) -> str:
    """'ok', or why the fla rows are skipped."""
    from statetune.ops.dispatch import fla_available, triton_interpreter_on

    if not fla_available():
        return "skipped: flash-linear-attention not installed (pip install -e '.[cuda]')"
    if device.type != "cuda" and not triton_interpreter_on():
        return "skipped: fla needs CUDA"
    return "ok"


def kernel_inputs(version: str, B: int, T: int, H: int, N: int, dtype: torch.dtype, device: torch.device,
                  seed: int) -> list[torch.Tensor]:
    """Random WKV inputs in a trained model's ranges; the state (last) is fp32 and requires grad."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -torch.rand(B, T, H, N, generator=g) * 0.6 - 0.01
    state = torch.randn(B, H, N, N, generator=g) * 0.1
    if version == "rwkv7":
        kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
        xs = [r, w, k, v, -kk, kk * torch.rand(B, T, H, N, generator=g)]
    else:
        xs = [r, w, k, v, torch.randn(H, N, generator=g) * 0.3]
    # inputs rounded to the dtype under test; the decay stays fp32 as the models keep it
    xs = [x.to(device, torch.float32 if i == 1 else dtype) for i, x in enumerate(xs)]
    return [*xs, state.to(device).requires_grad_()]


def run_wkv(version: str, impl: str | Callable, xs: list[torch.Tensor], with_state_grad: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, final state and the gradient of the initial state (of a fixed random projection of the output
    and, with ``with_state_grad``, of the final state). ``impl`` names a statetune path or is a WKV function
    with statetune's contract."""
    from statetune.ops import wkv6, wkv7

    state = xs[-1]
    state.grad = None
    inputs = [x.float() for x in xs[:-1]] if impl == "reference" else xs[:-1]  # the loop: fp32, same rounding
    if callable(impl):
        y, s = impl(*inputs, state)
    else:
        y, s = (wkv7 if version == "rwkv7" else wkv6)(*inputs, state, impl=impl)
    g = torch.Generator().manual_seed(7)
    proj_y = torch.randn(y.shape, generator=g).to(y.device)
    proj_s = torch.randn(s.shape, generator=g).to(s.device)
    loss = (y.float() * proj_y).sum()
    if with_state_grad:
        loss = loss + (s.float() * proj_s).sum()
    loss.backward()
    return y.detach(), s.detach(), state.grad.detach().clone()


def random_model(layers: int, width: int, vocab: int, device: torch.device, dtype: torch.dtype):
    """A random RWKV-7 of the given shape, loaded as ``load_model`` would (frozen, official names)."""
    from statetune.model.checkpoint import build_model
    from statetune.model.config import infer_config
    from statetune.model.random_init import random_checkpoint

    sd = random_checkpoint("rwkv7", n_layer=layers, n_embd=width, head_size=64, vocab_size=vocab, seed=0,
                           lora={"w": 64, "a": 64, "v": 32, "g": 128} if width >= 1024 else None)
    model = build_model(infer_config(sd, "random"))
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def tuning_step(model, tokens: torch.Tensor, wkv: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    """Forward + backward into the state (+ the optimizer step): one step of state tuning."""
    from statetune.model.state import RWKVState

    z = model.zero_state(1)
    logits, _ = model(tokens[:, :-1], RWKVState(z.att_shift, wkv, z.ffn_shift))
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def time_steps(model, tokens: torch.Tensor, device: torch.device, steps: int) -> dict[str, Any]:
    """Warm up, then time ``steps`` state-tuning steps: the best step's seconds, tokens/s, peak memory."""
    wkv = torch.zeros_like(model.zero_state(1).wkv, requires_grad=True)
    opt = torch.optim.Adam([wkv], lr=1e-3)
    tuning_step(model, tokens, wkv, opt)  # warm-up (kernel compilation, allocator)
    sync(device)
    reset_peak(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tuning_step(model, tokens, wkv, opt)
        sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    return {"status": "ok", "step_s": best, "tokens_per_s": n / best, "peak_gb": peak_gb(device)}
