"""Run flash-linear-attention's Triton kernels on CPU tensors under Triton's interpreter, for tests.

``TRITON_INTERPRET=1`` makes ``@triton.jit`` build interpreted functions instead of GPU kernels, so it
must be set before fla defines its kernels (before ``import fla``): importing this module sets it (and
refuses if fla was imported without it), and :func:`import_fla_interpreted` then imports fla and applies
the shims below. Each works around one way the interpreter (triton 3.7.1) differs
from compiled Triton when running fla 0.6.0; none changes what a kernel computes. The shims live in the
tests only: statetune itself never runs fla on CPU. Import this module only where triton is installed.
"""

from __future__ import annotations

import ast
import math
import os
import sys
from types import ModuleType

_FLA_TOO_EARLY = "fla" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402  (after the switch above)
import triton.language as tl  # noqa: E402  at module level: the interpreter looks for it in a jit function's globals

PINNED = {"flash-linear-attention": "0.6.0", "fla-core": "0.6.0", "triton": "3.7.1"}


def import_fla_interpreted() -> ModuleType:
    """Import ``fla`` with Triton's interpreter on and the shims applied; return ``fla``.

    Raises RuntimeError when fla was already imported in this process without the interpreter (its
    kernels would then be GPU kernels that cannot run here).
    """
    if _FLA_TOO_EARLY:
        raise RuntimeError("fla was imported before TRITON_INTERPRET=1 was set; its kernels are GPU kernels")
    import fla.ops.rwkv6  # noqa: F401  (defines the kernels, now as interpreted functions)
    import fla.ops.rwkv7  # noqa: F401
    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interpreter

    if not isinstance(_gather, interpreter.InterpretedFunction):
        # seen when the whole suite runs: triton was set up earlier in the process with the interpreter off
        raise RuntimeError("triton's jit was set up in this process before TRITON_INTERPRET=1; run "
                           "tests/test_fla_interpret.py in a process of its own (.ci/run does)")
    _pick_config_without_benchmark(autotuner)
    _redirect_gather_aliases()
    _loop_counters_as_tensors(interpreter)
    return sys.modules["fla"]


def _pick_config_without_benchmark(autotuner: ModuleType) -> None:
    """fla's kernels are ``@triton.autotune``d; the autotuner times every config through the GPU driver's
    benchmarker, which fails with "0 active drivers" when there is no GPU. Answer without timing: the
    config with the largest blocks wins (fewest programs for the interpreter to run; all give the same
    numbers)."""

    def fake_bench(self, *args, config, **kwargs):
        blocks = [v for v in config.kwargs.values() if isinstance(v, int) and v > 1]
        return [1.0 / math.prod(blocks)] * 3

    autotuner.Autotuner._bench = fake_bench


@triton.jit
def _gather(src, index, axis):
    return tl.gather(src, index, axis)


def _redirect_gather_aliases() -> None:
    """``fla/ops/utils/op.py`` does ``gather = tl.gather`` at import time. The interpreter swaps the
    builtins of ``triton.language`` for interpreted ones while a kernel runs, but a module-level alias
    keeps pointing at the compiled-only builtin, which then fails ("Did you forget to add @triton.jit?").
    Point every such alias at a jit function that calls ``tl.gather`` through the module."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("fla.") and getattr(mod, "gather", None) is tl.gather:
            mod.gather = _gather


def _loop_counters_as_tensors(interpreter: ModuleType) -> None:
    """Compiled Triton makes the counter of ``for i in range(n)`` a tensor; the interpreter runs the loop
    in Python and hands out plain ints, so ``i_t.to(tl.int64)`` (fla's ``chunk_dplr_fwd_kernel_h``) fails
    with "'int' object has no attribute 'to'". Extend the interpreter's source rewriter to wrap such a
    counter as a tensor at the top of the loop body, as it already wraps every assigned value."""

    class Rewriter(interpreter.ASTTransformer):
        def visit_For(self, node: ast.For) -> ast.For:
            self.generic_visit(node)
            it = node.iter
            if (isinstance(node.target, ast.Name) and isinstance(it, ast.Call) and isinstance(it.func, ast.Name)
                    and it.func.id == "range"):
                to_tensor = ast.Attribute(value=ast.Name(id="interpreter_semantic", ctx=ast.Load()),
                                          attr="to_tensor", ctx=ast.Load())
                wrap = ast.Assign(targets=[ast.Name(id=node.target.id, ctx=ast.Store())],
                                  value=ast.Call(func=to_tensor, args=[ast.Name(id=node.target.id, ctx=ast.Load()),
                                                                       ast.Constant(value=False)], keywords=[]))
                node.body.insert(0, wrap)
            return node

    interpreter.FunctionRewriter.ast_transformer = Rewriter()
