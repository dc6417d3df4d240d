"""Memory and time of state tuning at the RWKV-7 7.2B shape: 4k tokens, full BPTT through statetune's segment loop.

The model has 7.2B's shapes (32 layers, width 4096, head size 64, vocabulary 65536, FFN 4x) and random bf16
weights, built on the meta device and filled on the GPU from a 2-layer random checkpoint (layer 1's tensors
copied into layers 2-31, each layer its own copy), so that 29 GB of fp32 random numbers are never drawn on
the CPU. Values do not matter here, only shapes. One step is :func:`statetune.objective.backward_sequence`
with ``Bptt.full`` (what ``statetune train --bptt full`` runs) at each ``--ctx-len``: the gradient of one
4096-token pass at the memory of one ``ctx_len`` segment.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from gpu.common import device_of, peak_gb, reset_peak, sync

SHAPE_7B = {"layers": 32, "width": 4096, "vocab": 65536, "lora": {"w": 128, "a": 128, "v": 96, "g": 480}}
SHAPE_TINY = {"layers": 3, "width": 128, "vocab": 1000, "lora": None}


def big_model(layers: int, width: int, vocab: int, lora: dict[str, int] | None, device: torch.device,
              dtype: torch.dtype):
    """A frozen random RWKV-7 of the given shape with weights made directly on ``device``."""
    from statetune.model.checkpoint import build_model
    from statetune.model.config import infer_config
    from statetune.model.random_init import random_checkpoint

    two = random_checkpoint("rwkv7", n_layer=2, n_embd=width, head_size=64, vocab_size=vocab, seed=0, lora=lora)
    sd = {}
    for key, t in two.items():
        if not key.startswith("blocks.1."):
            sd[key] = t.to(device=device, dtype=dtype)
            continue
        for i in range(1, layers):  # one copy per layer: the memory is a real model's
            sd[key.replace("blocks.1.", f"blocks.{i}.", 1)] = t.to(device=device, dtype=dtype)
    del two
    with torch.device("meta"):
        model = build_model(infer_config(sd, "random"))
    model.load_state_dict(sd, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def bptt_step(model, tokens: torch.Tensor, ctx_len: int) -> float:
    """One state-tuning step over ``tokens`` ``[1, T+1]`` with full BPTT in ``ctx_len`` segments; the loss."""
    from statetune.model.state import RWKVState
    from statetune.objective import Bptt, backward_sequence

    z = model.zero_state(1)
    wkv = torch.zeros_like(z.wkv, requires_grad=True)
    mask = torch.ones_like(tokens)
    loss, n = backward_sequence(model, tokens, mask, RWKVState(z.att_shift, wkv, z.ffn_shift), ctx_len,
                                Bptt.full, scale=1.0 / tokens.shape[1])
    if wkv.grad is None or not torch.isfinite(wkv.grad).all():
        raise RuntimeError("the state got no finite gradient")
    return loss / n


def memory_7b(device: torch.device, tiny: bool, tokens_n: int, ctx_lens: list[int], steps: int) -> dict[str, Any]:
    """Peak memory and step time per ``ctx_len`` (an out-of-memory is a row's finding, not the part's end)."""
    shape = SHAPE_TINY if tiny else SHAPE_7B
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    model = big_model(shape["layers"], shape["width"], shape["vocab"], shape["lora"], device, dtype)
    sync(device)
    params = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"shape": "tiny" if tiny else "7.2B", "layers": shape["layers"], "width": shape["width"],
                           "params": params, "dtype": "bf16", "batch": 1, "tokens": tokens_n, "bptt": "full",
                           "build_s": time.perf_counter() - t0, "weights_gb": peak_gb(device), "rows": []}
    tokens = torch.randint(0, shape["vocab"], (1, tokens_n + 1), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    for ctx_len in ctx_lens:
        row: dict[str, Any] = {"ctx_len": ctx_len}
        try:
            bptt_step(model, tokens, ctx_len)  # warm-up: kernel compilation and autotuning
            sync(device)
            reset_peak(device)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                row["loss"] = bptt_step(model, tokens, ctx_len)
                sync(device)
                times.append(time.perf_counter() - start)
            row.update(status="ok", step_s=min(times), tokens_per_s=tokens_n / min(times), peak_gb=peak_gb(device))
        except torch.cuda.OutOfMemoryError as e:
            row["status"] = f"out of memory: {str(e).splitlines()[0][:200]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out["rows"].append(row)
    return out


def part_7b(opts: Any) -> dict[str, Any]:
    ctx = [int(c) for c in str(opts.ctx_len).split(",") if c.strip()]
    n = min(opts.long_tokens, 256) if opts.tiny else opts.long_tokens  # tiny: the same ratios, shorter
    return memory_7b(device_of(opts), opts.tiny, n, [max(1, c * n // opts.long_tokens) for c in ctx],
                     max(1, min(opts.steps, 2)))
