"""What state tuning trains: the initial state, directly or through a per-layer state encoder.

Whatever the parameterisation, ``TunableState()`` returns a plain batch-1 :class:`RWKVState`, and that
is what gets saved: inference never needs the encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from statetune.model.state import RWKVState
from statetune.tuning.config import Param, Scope, StateTuningConfig


class StateEncoder(nn.Module):
    """Per layer (or one shared by all layers): a learned input per head → Linear → LayerNorm → tanh →
    Linear → LayerNorm, reshaped to that head's ``N x N`` WKV matrix.

    The final LayerNorm's weight and bias start at zero, so the encoder's output starts at zero and
    training begins exactly at the initial state it is added to.
    """

    def __init__(self, n_layer: int, n_head: int, head_size: int, scope: Scope, d_in: int, d_hidden: int,
                 generator: torch.Generator):
        super().__init__()
        G = n_layer if scope == Scope.layer else 1
        N2 = head_size * head_size
        self.n_layer, self.n_head, self.head_size = n_layer, n_head, head_size

        def init(*shape: int, fan_in: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=generator) * fan_in ** -0.5)

        self.inputs = init(n_layer, n_head, d_in, fan_in=1)                 # one learned input per head
        self.w1, self.b1 = init(G, d_in, d_hidden, fan_in=d_in), nn.Parameter(torch.zeros(G, 1, d_hidden))
        self.ln1_w, self.ln1_b = nn.Parameter(torch.ones(G, 1, d_hidden)), nn.Parameter(torch.zeros(G, 1, d_hidden))
        self.w2, self.b2 = init(G, d_hidden, N2, fan_in=d_hidden), nn.Parameter(torch.zeros(G, 1, N2))
        self.ln2_w, self.ln2_b = nn.Parameter(torch.zeros(G, 1, N2)), nn.Parameter(torch.zeros(G, 1, N2))

    def forward(self) -> Tensor:
        """The encoded WKV states ``[L, H, N, N]``."""
        x = torch.baddbmm(self.b1, self.inputs, self.w1.expand(self.n_layer, -1, -1))     # [L, H, d_hidden]
        x = torch.tanh(F.layer_norm(x, x.shape[-1:]) * self.ln1_w + self.ln1_b)
        x = torch.baddbmm(self.b2, x, self.w2.expand(self.n_layer, -1, -1))              # [L, H, N*N]
        x = F.layer_norm(x, x.shape[-1:]) * self.ln2_w + self.ln2_b
        return x.view(self.n_layer, self.n_head, self.head_size, self.head_size)


class TunableState(nn.Module):
    """The trainable initial state: ``base + delta`` where ``delta`` is direct tensors or an encoder.

    ``base`` is the initialisation (zeros, a prompt's state, or a state file) and stays fixed; ``config``
    says what is trained (default: the WKV state directly). With ``config.tune_shift`` the two token-shift
    vectors per layer are trained too (always directly). With ``config.layers`` only those layers are trained
    (the parameters cover them alone) and every other layer of the produced state is exactly ``base``'s.
    ``seed`` draws the encoder's initial weights.
    """

    def __init__(self, base: RWKVState, config: StateTuningConfig | None = None, seed: int = 0):
        super().__init__()
        self.config = config = config or StateTuningConfig()
        base = base.detach()
        self.register_buffer("base_att", base.att_shift.clone().float())
        self.register_buffer("base_wkv", base.wkv.clone().float())
        self.register_buffer("base_ffn", base.ffn_shift.clone().float())
        L, _, H, N, _ = base.wkv.shape
        layers = config.layer_list(L)
        self.layers = None if layers is None else torch.tensor(layers)
        T = L if layers is None else len(layers)  # the trained layers
        self.param, self.tune_shift = config.param, config.tune_shift
        if self.param == Param.direct:
            self.wkv = nn.Parameter(torch.zeros(T, 1, H, N, N))
        else:
            g = torch.Generator().manual_seed(seed)
            self.encoder = StateEncoder(T, H, N, config.encoder_scope, config.encoder_in, config.encoder_hidden, g)
        if self.tune_shift:
            self.att_shift = nn.Parameter(torch.zeros(T, *self.base_att.shape[1:]))
            self.ffn_shift = nn.Parameter(torch.zeros(T, *self.base_ffn.shape[1:]))

    def _add(self, base: Tensor, delta: Tensor) -> Tensor:
        """``base`` plus ``delta`` on the trained layers (all of them, or ``config.layers``)."""
        if self.layers is None:
            return base + delta
        return base.index_add(0, self.layers.to(base.device), delta)

    def forward(self) -> RWKVState:
        delta = self.wkv if self.param == Param.direct else self.encoder().unsqueeze(1)
        att, ffn = self.base_att, self.base_ffn
        if self.tune_shift:
            att, ffn = self._add(att, self.att_shift), self._add(ffn, self.ffn_shift)
        return RWKVState(att, self._add(self.base_wkv, delta), ffn)

    def distance_sq(self) -> Tensor:
        """Squared distance of the produced state from ``base`` over everything trained (the WKV state, and
        the token-shift vectors with ``tune_shift``): the ``--state-l2`` penalty before its weight."""
        delta = self.wkv if self.param == Param.direct else self.encoder()
        total = delta.square().sum()
        if self.tune_shift:
            total = total + self.att_shift.square().sum() + self.ffn_shift.square().sum()
        return total

    @property
    def has_shift(self) -> bool:
        """Whether the produced state has token-shift vectors worth saving."""
        return self.tune_shift or bool(self.base_att.any() or self.base_ffn.any())

    def param_groups(self) -> list[dict]:
        """Optimizer groups: the WKV state (or encoder) at the run's rate, then the token-shift vectors (when
        trained) at ``config.shift_lr_scale`` times it; ``lr_scale`` is read by the training loop's schedule."""
        groups = [{"params": [self.wkv] if self.param == Param.direct else list(self.encoder.parameters()),
                   "lr_scale": 1.0}]
        if self.tune_shift:
            groups.append({"params": [self.att_shift, self.ffn_shift], "lr_scale": self.config.shift_lr_scale})
        return groups

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
