"""Random weights in the official key format, for tests, the smoke run and speed benchmarks.

Values are drawn in the ranges trained models have (decays, mixing coefficients, unit-norm ``k_k``), so
that numbers stay in a realistic range; the result is a plain ``{key: tensor}`` dict an official loader
reads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from statetune.model.config import V6, V7


def random_checkpoint(version: str = V7, n_layer: int = 2, n_embd: int = 128, head_size: int = 64,
                      vocab_size: int = 65536, dim_ffn: int | None = None,
                      lora: dict[str, int] | None = None, seed: int = 0,
                      layer0_has_v: bool = True) -> dict[str, Tensor]:
    """A random RWKV-7 or RWKV-6 state dict with official key names and fp32 tensors."""
    g = torch.Generator().manual_seed(seed)
    C, F = n_embd, dim_ffn or 4 * n_embd
    H = C // head_size
    if H * head_size != C:
        raise ValueError(f"n_embd {C} is not a multiple of head_size {head_size}")

    def rn(*shape: int, std: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=g) * std

    def un(*shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    sd: dict[str, Tensor] = {"emb.weight": rn(vocab_size, C, std=0.5)}
    for i in range(n_layer):
        b = f"blocks.{i}."
        if i == 0:
            sd[b + "ln0.weight"], sd[b + "ln0.bias"] = 1 + rn(C, std=0.1), rn(C, std=0.1)
        for ln in ("ln1", "ln2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = 1 + rn(C, std=0.1), rn(C, std=0.1)
        a = b + "att."
        if version == V7:
            d = {"w": 24, "a": 20, "v": 12, "g": 36, **(lora or {})}
            for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
                sd[a + name] = un(1, 1, C)
            sd[a + "w0"] = un(1, 1, C, lo=-3.0, hi=1.0)
            sd[a + "a0"] = rn(1, 1, C, std=0.5)
            for name in ("w", "a", "g") + (("v",) if i > 0 or layer0_has_v else ()):
                sd[a + f"{name}1"] = rn(C, d[name], std=0.1)
                sd[a + f"{name}2"] = rn(d[name], C, std=0.1)
            if i > 0 or layer0_has_v:
                sd[a + "v0"] = rn(1, 1, C, std=0.5)
            sd[a + "k_k"] = 0.85 + rn(1, 1, C, std=0.05)
            sd[a + "k_a"] = 1 + rn(1, 1, C, std=0.05)
            sd[a + "r_k"] = rn(H, head_size, std=0.1)
            names = ("receptance", "key", "value", "output")
        else:
            d = {"maa": 16, "decay": 32, **(lora or {})}
            for name in ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g"):
                sd[a + name] = un(1, 1, C)
            sd[a + "time_maa_w1"] = rn(C, 5 * d["maa"], std=0.1)
            sd[a + "time_maa_w2"] = rn(5, d["maa"], C, std=0.1)
            sd[a + "time_decay"] = un(1, 1, C, lo=-6.0, hi=0.5)
            sd[a + "time_decay_w1"] = rn(C, d["decay"], std=0.1)
            sd[a + "time_decay_w2"] = rn(d["decay"], C, std=0.1)
            sd[a + "time_faaaa"] = rn(H, head_size, std=0.3)
            names = ("receptance", "key", "value", "gate", "output")
        for name in names:
            sd[a + name + ".weight"] = rn(C, C, std=C ** -0.5)
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = 1 + rn(C, std=0.1), rn(C, std=0.1)
        f = b + "ffn."
        if version == V7:
            sd[f + "x_k"] = un(1, 1, C)
        else:
            sd[f + "time_maa_k"], sd[f + "time_maa_r"] = un(1, 1, C), un(1, 1, C)
            sd[f + "receptance.weight"] = rn(C, C, std=C ** -0.5)
        sd[f + "key.weight"] = rn(F, C, std=C ** -0.5)
        sd[f + "value.weight"] = rn(C, F, std=F ** -0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = 1 + rn(C, std=0.1), rn(C, std=0.1)
    sd["head.weight"] = rn(vocab_size, C, std=C ** -0.5)
    if version not in (V6, V7):
        raise ValueError(f"unknown version {version!r}")
    return sd
