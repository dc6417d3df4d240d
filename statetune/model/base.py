"""What RWKV-7 and RWKV-6 share: embedding, the block loop over an explicit state, the output head."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from statetune.model.config import RWKVConfig
from statetune.model.linear import Linear
from statetune.model.state import RWKVState


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype WKV states and decays are kept in: fp32, or float64 for float64 models (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mix_vector(C: int) -> nn.Parameter:
    """A per-channel coefficient in the official ``[1, 1, C]`` shape."""
    return nn.Parameter(torch.zeros(1, 1, C))


def token_shift(x: Tensor, prev: Tensor) -> Tensor:
    """``prev_t - x_t`` where ``prev_t`` is the previous token's input (``prev`` [B, C] before t=0)."""
    # x [B, T, C], prev [B, C]
    if x.shape[1] == 1:  # decoding: nothing to concatenate
        return prev.unsqueeze(1) - x
    return torch.cat((prev.unsqueeze(1), x[:, :-1]), dim=1) - x


class Block(nn.Module):
    """One residual block: ``ln0`` (block 0 only), time-mix over ``ln1(x)``, channel-mix over ``ln2(x)``."""

    def __init__(self, cfg: RWKVConfig, layer_id: int, att: nn.Module, ffn: nn.Module):
        super().__init__()
        C = cfg.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = att
        self.ffn = ffn
        self.layer_id = layer_id

    def forward(self, x: Tensor, att_shift: Tensor, wkv: Tensor, ffn_shift: Tensor, v_first: Tensor | None,
                wkv_out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """``wkv_out`` (no autograd) receives the new WKV state, which is also returned."""
        if self.layer_id == 0:
            x = self.ln0(x)
        a, att_shift, wkv, v_first = self.att(self.ln1(x), att_shift, wkv, v_first, wkv_out)
        x = x + a
        f, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + f, att_shift, wkv, ffn_shift, v_first


class RWKVBase(nn.Module):
    """An RWKV language model whose recurrent state is an explicit argument and result.

    Parameters carry the official checkpoint key names and are frozen: state tuning trains only the state.
    ``model(tokens, None)`` always starts from zeros; ``default_state`` holds a state merged into the
    checkpoint (``blocks.{i}.att.time_state``), which commands use when no state file is given.
    """

    def __init__(self, cfg: RWKVConfig, blocks: list[Block]):
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(blocks)
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.default_state: RWKVState | None = None
        self.requires_grad_(False)

    def set_wkv_impl(self, impl: str) -> None:
        """Force a WKV implementation ("auto", "reference", "chunked", "fla") in every layer."""
        for block in self.blocks:
            block.att.wkv_impl = impl

    def use_decode_layout(self) -> RWKVBase:
        """Store every projection matrix in ``[in, out]`` memory order on CPU; values, shapes and names stay.

        Decoding one sequence multiplies one row vector by every matrix, and CPU BLAS streams that order
        faster than the checkpoint's ``[out, in]`` (decode about 1.2x on 0.1B shapes:
        ``benchmarks/bench_model.py``); from about 4 rows per product on, the checkpoint's order is faster
        again. So only commands that own their model and decode one sequence call this (``generate`` with
        one prompt, ``chat``): training keeps the checkpoint's order, and a changed order can change the
        last bit of a result, which exact resume must not see.
        """
        if self.device.type == "cpu":
            for module in self.modules():
                if isinstance(module, nn.Linear) and module.weight.is_contiguous():
                    module.weight.data = module.weight.data.t().contiguous().t()
        return self

    def use_batch_layout(self, rows: int = 8) -> bool:
        """Keep a oneDNN-blocked copy of every projection matrix for batched decode steps on CPU.

        A step of B sequences multiplies B rows by each matrix; CPU BLAS repacks the matrix on every call
        and runs at a third of memory speed for 4 to 16 rows, while a copy blocked once streams (the
        0.1B head at 8 rows: about 16 instead of 35 ms; :mod:`statetune.model.linear`). Only inference-mode
        single-token calls of two or more rows use the copies, so prefill, training and one-sequence steps
        are untouched; the copies cost the matrices' memory once more. Commands that own their model and
        decode batches call this (``generate --input``, ``serve``, ``eval --generate``); ``rows`` is the
        batch the blocking is tuned for. Returns False, changing nothing, where it does not apply (not CPU
        float32, or no oneDNN in this torch).
        """
        done = [m.block_weight(rows) for m in self.modules() if isinstance(m, Linear)]
        return bool(done) and all(done)

    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.emb.weight.dtype

    def zero_state(self, batch_size: int = 1) -> RWKVState:
        """An all-zero state for ``batch_size`` sequences on the model's device."""
        cfg, dev = self.config, self.device
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        return RWKVState(
            att_shift=torch.zeros(L, batch_size, C, device=dev, dtype=self.dtype),
            wkv=torch.zeros(L, batch_size, H, N, N, device=dev, dtype=acc_dtype(self.dtype)),
            ffn_shift=torch.zeros(L, batch_size, C, device=dev, dtype=self.dtype),
        )

    def _check_state(self, state: RWKVState, batch_size: int) -> RWKVState:
        want = self.zero_state(0)
        for name, have, ref in zip(("att_shift", "wkv", "ffn_shift"), state.tensors(), want.tensors(),
                                   strict=True):
            if have.shape[0] != ref.shape[0] or have.shape[2:] != ref.shape[2:]:
                raise ValueError(f"state.{name} has shape {tuple(have.shape)}, expected "
                                 f"[{ref.shape[0]}, B, {', '.join(map(str, ref.shape[2:]))}]")
        if state.batch_size == 1 and batch_size > 1:
            state = state.map(lambda t: t.expand(t.shape[0], batch_size, *t.shape[2:]))
        elif state.batch_size != batch_size:
            raise ValueError(f"state batch size {state.batch_size} does not match tokens batch {batch_size}")
        return RWKVState(state.att_shift.to(self.dtype), state.wkv.to(acc_dtype(self.dtype)),
                         state.ffn_shift.to(self.dtype))

    def hidden(self, tokens: Tensor, state: RWKVState | None = None,
               checkpoint: bool = False) -> tuple[Tensor, RWKVState]:
        """Final hidden states ``[B, T, C]`` (after ``ln_out``) and the state after the last token.

        A batch-1 ``state`` is broadcast over the batch. ``checkpoint`` recomputes each block in the
        backward pass instead of keeping its activations (for long contexts).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        B = tokens.shape[0]
        state = self.zero_state(B) if state is None else self._check_state(state, B)
        x = self.emb(tokens)
        v_first = None
        att_s, wkv_s, ffn_s = [], [], []
        # without autograd, each layer writes its WKV state into the result: no stacking copy of B*L*H*N*N
        wkv_out = None if torch.is_grad_enabled() else state.wkv.new_empty((len(self.blocks), *state.wkv.shape[1:]))
        for i, block in enumerate(self.blocks):
            args = (x, state.att_shift[i], state.wkv[i], state.ffn_shift[i], v_first)
            if checkpoint and torch.is_grad_enabled():
                x, a, w, f, v_first = activation_checkpoint(block, *args, use_reentrant=False)
            else:
                x, a, w, f, v_first = block(*args, None if wkv_out is None else wkv_out[i])
            att_s.append(a)
            wkv_s.append(w)
            ffn_s.append(f)
        wkv = torch.stack(wkv_s) if wkv_out is None else wkv_out
        new_state = RWKVState(torch.stack(att_s), wkv, torch.stack(ffn_s))
        return self.ln_out(x), new_state

    def forward(self, tokens: Tensor, state: RWKVState | None = None,
                last_only: bool = False) -> tuple[Tensor, RWKVState]:
        """``(logits [B, T, V], new_state)``; the caller's state tensors are never modified.

        ``last_only`` computes logits for the last position only (``[B, 1, V]``): prefill needs no more, and
        the output layer is the largest matmul of a small model.
        """
        h, new_state = self.hidden(tokens, state)
        if last_only:
            h = h[:, -1:]
        return self.head(h), new_state

    def fingerprint(self) -> str:
        """A hash of fixed slices of base tensors, rounded to bf16 so that it does not depend on the
        dtype the model was stored or loaded in; ``time_state`` never takes part."""
        h = hashlib.sha256()
        h.update(f"{self.config.version}:{self.config.n_layer}:{self.config.n_embd}:"
                 f"{self.config.vocab_size}".encode())
        for name in ("emb.weight", "blocks.0.att.receptance.weight", "blocks.0.ffn.key.weight", "head.weight"):
            t = self.get_parameter(name).detach()[:16, :64].to("cpu", torch.bfloat16).contiguous()
            h.update(t.view(torch.int16).numpy().tobytes())
        return h.hexdigest()[:16]
