"""The tiny model's shape and its training initialisation (after the official RWKV-7 trainer)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from statetune.model.base import RWKVBase
from statetune.model.checkpoint import build_model
from statetune.model.config import V7, RWKVConfig


def lora_dim(C: int, factor: float) -> int:
    """The official low-rank width suggestion: ``factor * sqrt(C)`` rounded to a multiple of 32, at least 32."""
    return max(32, int(round(factor * C ** 0.5 / 32)) * 32)


def make_config(n_layer: int, n_embd: int, head_size: int, vocab_size: int, ffn_mult: float) -> RWKVConfig:
    """An RWKV-7 config with the official low-rank widths and an FFN width rounded to a multiple of 32."""
    if n_embd % head_size:
        raise SystemExit(f"--n-embd {n_embd} is not a multiple of --head-size {head_size}")
    lora = {"w": lora_dim(n_embd, 2.5), "a": lora_dim(n_embd, 2.5), "v": lora_dim(n_embd, 1.7),
            "g": lora_dim(n_embd, 5.0)}
    dim_ffn = int(n_embd * ffn_mult) // 32 * 32
    return RWKVConfig(V7, n_layer, n_embd, n_embd // head_size, head_size, vocab_size, dim_ffn, lora, True)


def _orthogonal(rows: int, cols: int, gain: float, g: torch.Generator) -> Tensor:
    """A ``[rows, cols]`` matrix with orthonormal rows or columns (whichever are fewer), times ``gain``."""
    a = torch.randn(max(rows, cols), min(rows, cols), generator=g)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)   # a uniformly random orthogonal basis
    return (q if rows >= cols else q.T).contiguous() * gain


def init_weights(cfg: RWKVConfig, seed: int) -> dict[str, Tensor]:
    """A training initialisation of RWKV-7 in the official key format (fp32).

    What it does and why (after the official trainer):
    * token-shift mixes ``x_*`` go from strong mixing in early layers to little in late ones, and vary
      over channels, so layers start with different views of the previous token;
    * decay speeds ``w0`` span slow (about -6, long memory) to fast across channels, with a zigzag inside
      each head so that every head holds a range of time scales;
    * output projections (``att.output``, ``ffn.value``) start at zero, so every block starts as the
      identity and the residual stream is stable in the first steps;
    * ``receptance``/``value`` are orthogonal, ``key`` orthogonal at 0.1 (small keys: gentle state writes);
    * low-rank adapters start with a zero first factor and an orthogonal second factor at 0.1;
    * ``k_k`` about 0.7 (the delta-rule removal key), ``k_a`` about 1, bonus ``r_k`` -0.04;
    * ``ln_x`` (per-head GroupNorm) weight grows with depth, ``((1 + i) / L) ** 0.7``;
    * the embedding is tiny (±1e-4: ``ln0`` normalises it) and the head orthogonal at 0.5.
    """
    g = torch.Generator().manual_seed(seed)
    L, C, H, N, V, Fd = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size, cfg.dim_ffn
    sd: dict[str, Tensor] = {"emb.weight": (torch.rand(V, C, generator=g) * 2 - 1) * 1e-4}
    ddd = torch.arange(C, dtype=torch.float64) / C                    # 0 .. 1 over channels
    n = torch.arange(C, dtype=torch.float64)
    linear = n / (C - 1) - 0.5                                        # -0.5 .. 0.5
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()                                    # -1 .. 1 inside each head

    def vec(t: Tensor) -> Tensor:
        return t.reshape(1, 1, C).float()

    for i in range(L):
        b, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        ratio_0_to_1 = i / (L - 1) if L > 1 else 0.0
        ratio_1_to_0 = 1.0 - i / L
        lns = ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2")
        for ln in lns:
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = torch.ones(C), torch.zeros(C)
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            sd[a + name] = vec(1.0 - ddd ** (power * ratio_1_to_0))
        www = -6 + 6 * (n / (C - 1)) ** (1 + 1 * ratio_0_to_1 ** 0.3)
        sd[a + "w0"] = vec(www + 0.5 + zigzag * 2.5)
        sd[a + "a0"] = vec(-0.19 + zigzag * 0.3 + linear * 0.4)
        sd[a + "v0"] = vec(0.73 - linear * 0.4)
        for name in ("w", "a", "v", "g"):
            d = cfg.lora[name]
            sd[a + f"{name}1"] = torch.zeros(C, d)
            sd[a + f"{name}2"] = _orthogonal(d, C, 0.1, g)
        sd[a + "k_k"] = vec(0.71 - linear * 0.1)
        sd[a + "k_a"] = vec(torch.full((C,), 1.02, dtype=torch.float64))
        sd[a + "r_k"] = torch.full((H, N), -0.04)
        sd[a + "receptance.weight"] = _orthogonal(C, C, 1.0, g)
        sd[a + "key.weight"] = _orthogonal(C, C, 0.1, g)
        sd[a + "value.weight"] = _orthogonal(C, C, 1.0, g)
        sd[a + "output.weight"] = torch.zeros(C, C)
        sd[a + "ln_x.weight"] = torch.full((C,), ((1 + i) / L) ** 0.7)
        sd[a + "ln_x.bias"] = torch.zeros(C)
        sd[f + "x_k"] = vec(1.0 - ddd ** (ratio_1_to_0 ** 4))
        sd[f + "key.weight"] = _orthogonal(Fd, C, 1.0, g)
        sd[f + "value.weight"] = torch.zeros(C, Fd)
    sd["ln_out.weight"], sd["ln_out.bias"] = torch.ones(C), torch.zeros(C)
    sd["head.weight"] = _orthogonal(V, C, 0.5 * math.sqrt(V / C) if V > C else 0.5, g)
    return sd


def new_model(cfg: RWKVConfig, seed: int, device: str) -> RWKVBase:
    """statetune's RWKV-7 with the training initialisation, trainable, in fp32 on ``device``."""
    model = build_model(cfg)
    model.load_state_dict(init_weights(cfg, seed), strict=True)
    return model.to(device).requires_grad_(True).train()


def export_state_dict(model: RWKVBase, dtype: torch.dtype) -> dict[str, Tensor]:
    """The official checkpoint dict: every parameter by its official key, contiguous, in ``dtype``."""
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
