"""The peers' state-tuning kernels on the same GPU: RWKV-PEFT's RWKV-7 state kernel and FlashRWKV2's StateTune op.

Each peer is built from sources vendored under ``benchmarks/gpu/vendor/`` (see ``benchmarks/gpu/README.md``;
never committed) with ``torch.utils.cpp_extension.load`` and wrapped to statetune's WKV contract:
``fn(r, w, k, v, a, b, state) -> (y, final_state)``, ``[B, T, H, N]`` inputs, ``w`` the log-decay, the state
``[B, H, V, K]`` fp32. Both peers take the RWKV-7 decay *logit* ``x`` (decay ``exp(-e^-0.5 sigmoid(x))``),
so the adapter turns statetune's log-decay back into it (one elementwise pass, counted in the peer's time).
The peer then runs inside statetune's own model, in place of the WKV op, so the step compared is the same
step: same weights, same tokens, same loss; only the WKV kernel differs.

Peer code is only called, never copied here: the adapter passes tensors in the layouts the peers'
own Python wrappers pass (RWKV-PEFT ``rwkvt/operator/rwkvop.py``; FlashRWKV2
``flashrwkv2/tmix/wkv7/statetune.py``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from gpu.common import device_of, diff, fla_status, kernel_inputs, random_model, run_wkv, time_steps
from gpu.sections import pick_shapes

VENDOR = Path(os.environ.get("STATETUNE_GPU_VENDOR", Path(__file__).resolve().parent / "vendor"))
EXP_HALF = 0.6065306597126334  # e^-0.5: the largest decay rate RWKV-7 allows
CHUNK = 16  # both peers keep a state every 16 tokens for the backward pass (RWKV-PEFT needs T % 16 == 0)

PEFT_FILES = ("cuda/rwkv7_state_clampw.cu", "cuda/rwkv7_state_clampw.cpp")
FLASH_FILES = tuple(f"csrc/sm90/tmix/wkv7/statetune_recurrent_fp32io16_{d}.{x}"
                    for d in ("forward", "backward") for x in ("cu", "cpp")) + (
    "csrc/sm120/tmix/wkv7/recurrent_decay.cuh",)
PEERS = {"rwkv-peft": ("RWKV-PEFT", PEFT_FILES), "flashrwkv2": ("FlashRWKV2", FLASH_FILES)}


def missing_files(peer: str) -> list[str]:
    """The vendored files a peer needs that are absent (relative to the vendor folder)."""
    folder, files = PEERS[peer]
    return [f"{folder}/{f}" for f in files if not (VENDOR / folder / f).is_file()]


def decay_logit(w: torch.Tensor) -> torch.Tensor:
    """The RWKV-7 decay logit whose decay is ``exp(w)``; ``w`` is a log-decay in ``(-e^-0.5, 0)``."""
    return torch.logit((-w.float() / EXP_HALF).clamp(1e-6, 1 - 1e-6))


def logit_to_log_decay(x: torch.Tensor) -> torch.Tensor:
    return -EXP_HALF * torch.sigmoid(x.float())


# -- RWKV-PEFT: cuda/rwkv7_state_clampw.{cu,cpp}, torch.ops.rwkv7_state_clampw --

class _PeftState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s0, r, x, k, v, a, b):
        B, T, H, N = r.shape
        y = torch.empty_like(v)
        s = torch.empty(B, H, T // CHUNK, N, N, dtype=torch.float32, device=r.device)
        sa = torch.empty(B, T, H, N, dtype=torch.float32, device=r.device)
        torch.ops.rwkv7_state_clampw.forward(s0, r, x, k, v, a, b, y, s, sa)
        ctx.save_for_backward(r, x, k, v, a, b, s, sa)
        final = s[:, :, -1].transpose(-1, -2).contiguous()  # its checkpoints are [K, V]; ours [V, K]
        ctx.mark_non_differentiable(final)  # the kernel has no gradient for the final state
        return y, final

    @staticmethod
    def backward(ctx, dy, _dfinal):
        r, x, k, v, a, b, s, sa = ctx.saved_tensors
        grads = [torch.empty_like(t) for t in (r, x, k, v, a, b)]
        B, _, H, N = r.shape
        ds0 = torch.empty(B, H, N, N, dtype=torch.float32, device=r.device)
        torch.ops.rwkv7_state_clampw.backward(r, x, k, v, a, b, dy.contiguous(), s, sa, ds0, *grads)
        return (ds0, *grads)


def load_rwkv_peft() -> Callable:
    """Build RWKV-PEFT's bf16 state-tuning kernel (its own flags) and return it with statetune's contract."""
    from torch.utils.cpp_extension import load

    src = VENDOR / "RWKV-PEFT"
    flags = ["-res-usage", "-D_N_=64", f"-D_CHUNK_LEN_={CHUNK}", "--use_fast_math", "-O3", "-Xptxas -O3",
             "--extra-device-vectorization"]
    load(name="rwkv7_state_clampw", sources=[str(src / f) for f in PEFT_FILES], is_python_module=False,
         verbose=False, extra_cuda_cflags=flags)

    def wkv(r, w, k, v, a, b, state):
        B, T, H, N = r.shape
        if T % CHUNK:
            raise ValueError(f"RWKV-PEFT's state kernel needs T % {CHUNK} == 0, got T={T}")
        bf = [t.to(torch.bfloat16).contiguous() for t in (r, decay_logit(w), k, v, a, b)]
        s0 = state.float().expand(B, H, N, N).contiguous()
        y, final = _PeftState.apply(s0, *bf)
        return y.float(), final
    return wkv


# -- FlashRWKV2: the StateTune recurrent op, built alone (the package builds every op for two targets) --

BINDING = """#include <torch/extension.h>
void register_statetune_tmix_wkv7_recurrent_forward_bindings(py::module_& module);
void register_statetune_tmix_wkv7_recurrent_backward_bindings(py::module_& module);
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_statetune_tmix_wkv7_recurrent_forward_bindings(m);
  register_statetune_tmix_wkv7_recurrent_backward_bindings(m);
}
"""


def _chunks(B: int, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed-sequence metadata: sequence b owns chunks [b n, (b+1) n) of at most CHUNK tokens each."""
    starts = torch.arange(0, T, CHUNK)
    n = starts.numel()
    offsets = torch.arange(B + 1) * n
    starts = (starts[None, :] + torch.arange(B)[:, None] * T).flatten()
    ends = torch.minimum(starts + CHUNK, (starts // T + 1) * T)
    return tuple(t.to(device=device, dtype=torch.int32).contiguous() for t in (offsets, starts, ends))


class _FlashState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s0, r, x, k, v, a, b, meta, ext):
        state = s0.detach().clone()
        out = torch.empty_like(v)
        boundary = torch.empty(meta[1].numel(), *s0.shape[1:], dtype=torch.float32, device=s0.device)
        sda = torch.empty_like(r, dtype=torch.float32)
        ext.statetune_tmix_wkv7_recurrent_fp32io16_forward(*meta, state, r, x, k, v, a, b, out, boundary, sda, 1.0)
        ctx.save_for_backward(state, r, x, k, v, a, b, sda, boundary)
        ctx.meta, ctx.ext = meta, ext
        return out, state

    @staticmethod
    def backward(ctx, dout, dstate):
        state, r, x, k, v, a, b, sda, boundary = ctx.saved_tensors
        grads = [torch.empty_like(t) for t in (r, x, k, v, a, b, state)]
        ctx.ext.statetune_tmix_wkv7_recurrent_fp32io16_backward(
            *ctx.meta, state, r, x, k, v, a, b, sda, dout.contiguous(), dstate.contiguous(), boundary, *grads, 1.0)
        return (grads[6], *grads[:6], None, None)


def load_flashrwkv2() -> Callable:
    """Build FlashRWKV2's StateTune op (sm90 sources, its own nvcc flags) with statetune's contract."""
    from torch.utils.cpp_extension import load

    src = VENDOR / "FlashRWKV2"
    build = Path(tempfile.gettempdir()) / "statetune_gpu_check" / "flashrwkv2_statetune"
    build.mkdir(parents=True, exist_ok=True)
    (build / "binding.cpp").write_text(BINDING)
    flags = ["-O3", "--expt-relaxed-constexpr", "--expt-extended-lambda", "-lineinfo", "-D_N_=64",
             f"-D_CHUNK_LEN_={CHUNK}", "-std=c++17"]
    ext = load(name="flashrwkv2_statetune", sources=[str(build / "binding.cpp")] + [
        str(src / f) for f in FLASH_FILES if not f.endswith(".cuh")], extra_cuda_cflags=flags,
        extra_cflags=["-O3"], extra_include_paths=[str(src / "csrc")], build_directory=str(build), verbose=False)

    def wkv(r, w, k, v, a, b, state):
        B, T, H, N = r.shape
        packed = [t.to(torch.bfloat16).reshape(B * T, H, N).contiguous() for t in (r, decay_logit(w), k, v, a, b)]
        s0 = state.float().expand(B, H, N, N).transpose(-1, -2).contiguous()  # ours [V, K] -> its [K, V]
        out, final = _FlashState.apply(s0, *packed, _chunks(B, T, r.device), ext)
        return out.view(B, T, H, N).float(), final.transpose(-1, -2)
    return wkv


LOADERS = {"rwkv-peft": load_rwkv_peft, "flashrwkv2": load_flashrwkv2}
STATE_GRAD = {"rwkv-peft": False, "flashrwkv2": True}  # whether the kernel backpropagates the final state


@contextlib.contextmanager
def wkv7_replaced(fn: Callable) -> Iterator[None]:
    """Run statetune's RWKV-7 model with ``fn`` in place of its WKV op."""
    import statetune.model.rwkv7 as rwkv7

    original = rwkv7.wkv7
    rwkv7.wkv7 = lambda r, w, k, v, a, b, state, impl="auto": fn(r, w, k, v, a, b, state)
    try:
        yield
    finally:
        rwkv7.wkv7 = original


def compare(peer: str, fn: Callable, device: torch.device) -> dict[str, Any]:
    """The peer and statetune's fla path against the fp32 reference loop on one small bf16 case, on the
    decays the peer sees (its bf16 logits), with the same projection of output (and final state)."""
    B, T, H, N = 2, 64, 2, 64
    xs = kernel_inputs("rwkv7", B, T, H, N, torch.bfloat16, device, seed=3)
    xs[1] = logit_to_log_decay(decay_logit(xs[1]).to(torch.bfloat16))  # the decays both sides run on
    grad_state = STATE_GRAD[peer]
    ref = run_wkv("rwkv7", "reference", xs, grad_state)
    out: dict[str, Any] = {"shape": [B, T, H, N], "dtype": "bf16",
                           "d_state0_from": "output and final state" if grad_state else "output only"}
    impls = {peer: fn, "statetune fla": "fla" if fla_status(device) == "ok" else "chunked"}
    for name, impl in impls.items():
        got = run_wkv("rwkv7", impl, xs, grad_state)
        out[name] = {"output": diff(got[0], ref[0]), "final_state": diff(got[1], ref[1]),
                     "d_state0": diff(got[2], ref[2])}
        if not callable(impl):
            out[name]["impl"] = impl
    return out


def check_peer(peer: str, opts: Any) -> dict[str, Any]:
    """Build a peer, compare it with the reference, and time the state-tuning step with it beside
    statetune's fla path in the same process. ``status`` says why not, when it cannot run."""
    if missing := missing_files(peer):
        return {"status": f"skipped: {', '.join(missing)} absent under {VENDOR} (see benchmarks/gpu/README.md)"}
    device = device_of(opts)
    if device.type != "cuda":
        return {"status": "skipped: the peers' kernels are CUDA C++ (needs --device cuda)"}
    try:
        fn = LOADERS[peer]()
    except Exception as e:  # noqa: BLE001 (a compiler's failure is the finding)
        first = (str(e).strip().splitlines() or [""])[-1][:300]
        return {"status": f"skipped: build failed: {type(e).__name__}: {first}"}
    result: dict[str, Any] = {"status": "ok", "compare": compare(peer, fn, device), "steps": []}
    for name, (layers, width) in pick_shapes(opts.tiny, opts.shapes).items():
        model = random_model(layers, width, 1000 if opts.tiny else 65536, device, torch.bfloat16)
        tokens = torch.randint(0, model.config.vocab_size, (opts.batch, opts.seq + 1),
                               generator=torch.Generator().manual_seed(0)).to(device)
        row = {"shape": name, "dtype": "bf16", "batch": opts.batch, "seq": opts.seq}
        if fla_status(device) == "ok":
            model.set_wkv_impl("fla")
            result["steps"].append({**row, "impl": "statetune fla", **time_steps(model, tokens, device, opts.steps)})
        with wkv7_replaced(fn):
            result["steps"].append({**row, "impl": peer, **time_steps(model, tokens, device, opts.steps)})
        del model
        torch.cuda.empty_cache()
    return result


def part_rwkv_peft(opts: Any) -> dict[str, Any]:
    return check_peer("rwkv-peft", opts)


def part_flashrwkv2(opts: Any) -> dict[str, Any]:
    return check_peer("flashrwkv2", opts)
