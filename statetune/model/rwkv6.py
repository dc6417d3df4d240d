"""RWKV-6 "Finch" (x060): data-dependent token-shift (``time_maa``) and decay, gated channel-mix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from statetune.model.base import Block, RWKVBase, acc_dtype, token_shift
from statetune.model.base import mix_vector as _vec
from statetune.model.config import RWKVConfig
from statetune.model.linear import Linear
from statetune.ops import wkv6


class TimeMix6(nn.Module):
    """RWKV-6 time-mix; attribute names are the official ``blocks.{i}.att.*`` keys."""

    wkv_impl = "auto"  # which WKV path runs: see statetune.ops.dispatch

    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.n_head, self.head_size = H, N
        for name in ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g",
                     "time_decay"):
            setattr(self, name, _vec(C))
        D, Dd = cfg.lora["maa"], cfg.lora["decay"]
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * D))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, D, C))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, Dd))
        self.time_decay_w2 = nn.Parameter(torch.zeros(Dd, C))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.receptance = Linear(C, C, bias=False)
        self.key = Linear(C, C, bias=False)
        self.value = Linear(C, C, bias=False)
        self.gate = Linear(C, C, bias=False)
        self.output = Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def forward(self, x: Tensor, shift: Tensor, wkv: Tensor, v_first: Tensor | None,
                wkv_out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        dx = token_shift(x, shift)
        xxx = torch.tanh((x + dx * self.time_maa_x) @ self.time_maa_w1)           # [B, T, 5*D]
        xxx = xxx.view(B * T, 5, -1).transpose(0, 1)                                # [5, B*T, D]
        mw, mk, mv, mr, mg = torch.bmm(xxx, self.time_maa_w2).view(5, B, T, C).unbind(0)

        r = self.receptance(x + dx * (self.time_maa_r + mr))
        k = self.key(x + dx * (self.time_maa_k + mk))
        v = self.value(x + dx * (self.time_maa_v + mv))
        g = F.silu(self.gate(x + dx * (self.time_maa_g + mg)))
        xw = x + dx * (self.time_maa_w + mw)
        decay = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        log_w = -torch.exp(decay.to(acc_dtype(x.dtype)))

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, H, N)

        y, wkv = wkv6(heads(r), heads(log_w), heads(k), heads(v), self.time_faaaa, wkv,
                      impl=self.wkv_impl, out=wkv_out)
        y = self.ln_x(y.to(x.dtype).reshape(B * T, C)).view(B, T, C)
        return self.output(y * g), x[:, -1], wkv, v_first


class ChannelMix6(nn.Module):
    """RWKV-6 channel-mix: ``sigmoid(receptance(x_r)) * value(relu(key(x_k))**2)``."""

    def __init__(self, cfg: RWKVConfig):
        super().__init__()
        C = cfg.n_embd
        self.time_maa_k = _vec(C)
        self.time_maa_r = _vec(C)
        self.key = Linear(C, cfg.dim_ffn, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.value = Linear(cfg.dim_ffn, C, bias=False)

    def forward(self, x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
        dx = token_shift(x, shift)
        k = torch.relu(self.key(x + dx * self.time_maa_k)) ** 2
        r = torch.sigmoid(self.receptance(x + dx * self.time_maa_r))
        return r * self.value(k), x[:, -1]


class RWKV6(RWKVBase):
    """RWKV-6 language model (official x060 checkpoints)."""

    def __init__(self, cfg: RWKVConfig):
        blocks = [Block(cfg, i, TimeMix6(cfg, i), ChannelMix6(cfg)) for i in range(cfg.n_layer)]
        super().__init__(cfg, blocks)
