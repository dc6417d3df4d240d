"""Functional WKV ops: no modules, no I/O. One dispatch function per RWKV version."""

from statetune.ops.wkv6 import wkv6
from statetune.ops.wkv7 import wkv7

__all__ = ["wkv6", "wkv7"]
