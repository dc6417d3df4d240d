"""Model sizes read from tensor shapes: no size tables, nothing assumes a head size of 64."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from statetune.errors import CheckpointError

V7, V6 = "rwkv7", "rwkv6"


@dataclass(frozen=True)
class RWKVConfig:
    """Every size of an RWKV-7 or RWKV-6 model; ``lora`` maps a low-rank name to its width."""

    version: str
    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int
    dim_ffn: int
    lora: dict[str, int]
    layer0_has_v: bool = True  # RWKV-7: whether block 0 stores the (unused) v0/v1/v2 value-residual weights


def detect_version(sd: dict[str, Tensor], where: str) -> str:
    """``rwkv7`` (x070) or ``rwkv6`` (x060), from which keys block 0 has."""
    if "blocks.0.att.r_k" in sd and "blocks.0.att.x_r" in sd:
        return V7
    if "blocks.0.att.time_maa_x" in sd and "blocks.0.att.time_faaaa" in sd:
        return V6
    sample = ", ".join(sorted(sd)[:8])
    raise CheckpointError(
        f"{where}: unknown architecture: expected RWKV-7 keys (blocks.0.att.r_k, blocks.0.att.x_r) or RWKV-6 "
        f"keys (blocks.0.att.time_maa_x, blocks.0.att.time_faaaa); found {len(sd)} keys such as: {sample}")


def _shape(sd: dict[str, Tensor], key: str, where: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{where}: missing key {key!r}, needed to read the model's sizes")
    return tuple(sd[key].shape)


def infer_config(sd: dict[str, Tensor], where: str) -> RWKVConfig:
    """Read layers, width, heads, head size, vocabulary, FFN width and low-rank widths from shapes."""
    version = detect_version(sd, where)
    vocab, C = _shape(sd, "emb.weight", where)
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    n_layer = max(layers) + 1
    if layers != set(range(n_layer)):
        raise CheckpointError(f"{where}: blocks are not numbered 0..{n_layer - 1}: missing "
                              f"{sorted(set(range(n_layer)) - layers)}")
    dim_ffn = _shape(sd, "blocks.0.ffn.key.weight", where)[0]
    if version == V7:
        H, N = _shape(sd, "blocks.0.att.r_k", where)
        lora = {name: _shape(sd, f"blocks.0.att.{name}1", where)[1] for name in ("w", "a", "g")}
        # block 0 never uses the value residual; some releases omit its weights
        v_key = "blocks.1.att.v1" if n_layer > 1 else "blocks.0.att.v1"
        lora["v"] = _shape(sd, v_key, where)[1] if v_key in sd else 1
        layer0_has_v = "blocks.0.att.v1" in sd
    else:
        H, N = _shape(sd, "blocks.0.att.time_faaaa", where)
        mix_w = _shape(sd, "blocks.0.att.time_maa_w2", where)
        lora = {"maa": mix_w[1], "decay": _shape(sd, "blocks.0.att.time_decay_w1", where)[1]}
        layer0_has_v = False
    if H * N != C:
        raise CheckpointError(f"{where}: {H} heads of size {N} do not make the width {C} of emb.weight")
    return RWKVConfig(version, n_layer, C, H, N, vocab, dim_ffn, lora, layer0_has_v)
