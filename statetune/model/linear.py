"""A bias-free projection that can keep a second, blocked copy of its weight for batched decoding on CPU.

A decode step multiplies a few rows (one per sequence) by every weight matrix. CPU BLAS packs the weight
matrix afresh on every such call, so a batch of 8 rows costs three to four times the memory-bound time
(the 65,536-wide output layer of a 0.1B model: about 35 ms against 10 ms). oneDNN multiplies by a weight
reordered once into its blocked format (``torch.ops.mkldnn._reorder_linear_weight``, what
``torch.compile`` uses on CPU), which streams it at about memory speed from 4 rows on. The blocked copy
is extra memory (the size of the matrix) and is not a parameter: the checkpoint's tensor stays the one
that is saved, fingerprinted and used for everything but inference-mode single-token steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def blocked_linear_available() -> bool:
    """True when this torch build has oneDNN and the reorder / blocked-matmul ops used here."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) that can hold a oneDNN-blocked weight copy.

    After :meth:`block_weight`, single-token inputs of two or more rows (``[B, 1, in]``, ``B > 1``) run on
    the blocked copy when no gradient is recorded; every other call, and any call once the weight tensor
    was replaced or changed in place, uses the weight itself (at one row BLAS's matrix-vector product is
    as fast, and a whole step was slower through oneDNN). The two paths agree to float rounding, not bit
    for bit.
    """

    blocked: Tensor | None = None
    _blocked_from: tuple[int, int] | None = None  # (data_ptr, version) of the weight it was made from

    def block_weight(self, rows: int) -> bool:
        """Make the blocked copy, tuned for products of about ``rows`` rows; False where it cannot be used
        (not CPU float32, no oneDNN, a bias). A copy that does not reproduce ``F.linear`` is dropped."""
        w = self.weight
        if (self.bias is not None or w.device.type != "cpu" or w.dtype != torch.float32
                or not blocked_linear_available()):
            return False
        dense = w.detach().contiguous()
        try:
            blocked = torch.ops.mkldnn._reorder_linear_weight(dense, rows)
            probe = torch.linspace(-1, 1, 2 * w.shape[1], dtype=w.dtype).view(2, -1)
            got = torch.ops.mkldnn._linear_pointwise(probe, blocked, None, "none", [], "")
        except RuntimeError:
            return False
        scale = float(dense.abs().max())
        if not math.isfinite(scale):  # a damaged matrix: leave it to the plain path, whose output is checked
            return False
        if not torch.allclose(got, F.linear(probe, dense), rtol=1e-4, atol=1e-4 * scale):
            return False
        self.blocked, self._blocked_from = blocked, (w.data_ptr(), w._version)
        return True

    def forward(self, x: Tensor) -> Tensor:
        b = self.blocked
        if (b is not None and x.dim() == 3 and x.shape[1] == 1 and x.shape[0] > 1 and not torch.is_grad_enabled()
                and x.dtype == torch.float32 and x.device.type == "cpu"
                and self._blocked_from == (self.weight.data_ptr(), self.weight._version)):
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(x.shape[0], -1).contiguous(), b, None, "none", [], "")
            return y.view(x.shape[0], 1, -1)
        return F.linear(x, self.weight, self.bias)
