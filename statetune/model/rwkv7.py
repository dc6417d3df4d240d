"""RWKV-7 "Goose" (x070): time-mix with the generalized delta rule, squared-ReLU channel-mix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from statetune.model.base import Block, RWKVBase, acc_dtype, token_shift
from statetune.model.base import mix_vector as _vec
from statetune.model.config import RWKVConfig
from statetune.model.linear import Linear
from statetune.ops import wkv7


class TimeMix7(nn.Module):
    """RWKV-7 time-mix; attribute names are the official ``blocks.{i}.att.*`` keys."""

    wkv_impl = "auto"  # which WKV path runs: see statetune.ops.dispatch

    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, _vec(C))
        lora = cfg.lora
        self.w1, self.w2 = nn.Parameter(torch.zeros(C, lora["w"])), nn.Parameter(torch.zeros(lora["w"], C))
        self.a1, self.a2 = nn.Parameter(torch.zeros(C, lora["a"])), nn.Parameter(torch.zeros(lora["a"], C))
        self.g1, self.g2 = nn.Parameter(torch.zeros(C, lora["g"])), nn.Parameter(torch.zeros(lora["g"], C))
        if layer_id > 0 or cfg.layer0_has_v:
            self.v0 = _vec(C)
            self.v1 = nn.Parameter(torch.zeros(C, lora["v"]))
            self.v2 = nn.Parameter(torch.zeros(lora["v"], C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = Linear(C, C, bias=False)
        self.key = Linear(C, C, bias=False)
        self.value = Linear(C, C, bias=False)
        self.output = Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def forward(self, x: Tensor, shift: Tensor, wkv: Tensor, v_first: Tensor | None,
                wkv_out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        dx = token_shift(x, shift)
        xr, xw, xk = x + dx * self.x_r, x + dx * self.x_w, x + dx * self.x_k
        xv, xa, xg = x + dx * self.x_v, x + dx * self.x_a, x + dx * self.x_g

        r = self.receptance(xr)
        w = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        log_w = -0.606531 * torch.sigmoid(w.to(acc_dtype(x.dtype)))  # 0.606531 = exp(-0.5)
        k = self.key(xk)
        v = self.value(xv)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, H, N)

        y, wkv = wkv7(heads(r), heads(log_w), heads(k), heads(v), -kk, kk * heads(a), wkv,
                      impl=self.wkv_impl, out=wkv_out)
        y = self.ln_x(y.to(x.dtype).reshape(B * T, C)).view(B, T, C)
        bonus = (heads(r) * heads(k) * self.r_k).sum(-1, keepdim=True) * heads(v)  # [B, T, H, N]
        y = y + bonus.reshape(B, T, C)
        return self.output(y * g), x[:, -1], wkv, v_first


class ChannelMix7(nn.Module):
    """RWKV-7 channel-mix: ``value(relu(key(x'))**2)`` with a token-shifted input."""

    def __init__(self, cfg: RWKVConfig):
        super().__init__()
        self.x_k = _vec(cfg.n_embd)
        self.key = Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.value = Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(self, x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
        k = x + token_shift(x, shift) * self.x_k
        return self.value(torch.relu(self.key(k)) ** 2), x[:, -1]


class RWKV7(RWKVBase):
    """RWKV-7 language model (official x070 checkpoints)."""

    def __init__(self, cfg: RWKVConfig):
        blocks = [Block(cfg, i, TimeMix7(cfg, i), ChannelMix7(cfg)) for i in range(cfg.n_layer)]
        super().__init__(cfg, blocks)
