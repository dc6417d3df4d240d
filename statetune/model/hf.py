"""Hugging Face model directories of RWKV-7: ``config.json`` plus ``model.safetensors`` or safetensors
shards listed in ``model.safetensors.index.json``, in either layout of :mod:`statetune.model.hf_layouts`
(flash-linear-attention's ``RWKV7ForCausalLM`` or the transformers-native ``Rwkv7ForCausalLM``), told apart
by ``config.json``.

Reading renames the tensors to the official names and cross-checks ``config.json`` against the sizes read
from the shapes; writing does the reverse (with tokenizer files beside the weights when given), so that
statetune can convert in both directions. Only safetensors are read: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from statetune.errors import CheckpointError
from statetune.fileio import atomic_dir
from statetune.model.config import V7, RWKVConfig, infer_config
from statetune.model.hf_layouts import DEFAULT_LAYOUT, LAYOUTS, Layout, detect_layout

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_config(root: Path) -> dict[str, Any]:
    """``config.json`` of a model directory, checked to describe an RWKV-7 model."""
    p = root / CONFIG
    if not p.is_file():
        raise CheckpointError(f"{root}: a model directory needs {CONFIG} (Hugging Face layout); none found")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p}: expected a JSON object, found {type(cfg).__name__}")
    if cfg.get("model_type") != V7:
        raise CheckpointError(f"{p}: model_type is {cfg.get('model_type')!r}; statetune reads Hugging Face "
                              f"directories of RWKV-7 (model_type 'rwkv7') only")
    return cfg


def _load_safetensors(p: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p}: not a readable safetensors file: {e}") from None


def read_hf_tensors(root: Path) -> dict[str, Tensor]:
    """Every tensor of the directory, under its HF name; a shard missing or disagreeing with the index is
    an error naming it."""
    index = root / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map': {e}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(str(shard), []).append(name)
        sd: dict[str, Tensor] = {}
        for shard, names in sorted(shards.items()):
            sp = root / shard
            if Path(shard).name != shard or not sp.is_file():
                raise CheckpointError(f"{index}: shard {shard!r} (holding {names[0]} and {len(names) - 1} more) "
                                      f"is missing from {root}")
            part = _load_safetensors(sp)
            absent = sorted(set(names) - set(part))
            extra = sorted(set(part) - set(names))
            if absent or extra:
                raise CheckpointError(f"{sp}: does not match {INDEX}: "
                                      + (f"missing {', '.join(absent[:5])} " if absent else "")
                                      + (f"not in the index: {', '.join(extra[:5])}" if extra else ""))
            sd.update(part)
        return sd
    single = root / SINGLE
    if single.is_file():
        return _load_safetensors(single)
    found = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "nothing"
    raise CheckpointError(f"{root}: no {SINGLE} or {INDEX} (only safetensors weights are read); found {found}")


def check_config(config: dict[str, Any], cfg: RWKVConfig, where: str, layout: Layout) -> None:
    """Every size ``config.json`` states must equal the one read from the tensor shapes."""
    wrong = layout.check(config, cfg)
    if wrong:
        raise CheckpointError(f"{where}/{CONFIG} disagrees with the weights: " + "; ".join(wrong))


def hf_vocab_size(path: str | Path) -> int:
    """Rows of the embedding of an HF model directory, read from the tensor header without loading it."""
    from safetensors import safe_open

    root = Path(path)
    name, shard = detect_layout(read_config(root), str(root / CONFIG)).embedding, root / SINGLE
    if (root / INDEX).is_file():
        try:
            shard = root / json.loads((root / INDEX).read_text(encoding="utf-8"))["weight_map"][name]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{root / INDEX}: no shard listed for {name}: {e}") from None
    if not shard.is_file():
        raise CheckpointError(f"{root}: {shard.name}, which should hold {name}, is missing")
    with safe_open(str(shard), framework="pt") as f:
        if name not in f.keys():
            raise CheckpointError(f"{shard}: missing key {name!r}")
        return f.get_slice(name).get_shape()[0]


def read_hf_dir(path: str | Path) -> dict[str, Tensor]:
    """The tensors of an HF model directory (either layout) under official names, its ``config.json``
    cross-checked."""
    root = Path(path)
    config = read_config(root)
    layout = detect_layout(config, str(root / CONFIG))
    sd = layout.to_official(read_hf_tensors(root), str(root))
    check_config(config, infer_config(sd, str(root)), str(root), layout)
    return sd


def write_hf_dir(sd: dict[str, Tensor], out: str | Path, max_shard_bytes: int | None = None,
                 layout: str = DEFAULT_LAYOUT, files: dict[str, str] | None = None) -> Path:
    """Write an official RWKV-7 state dict as an HF model directory in ``layout`` (shards above
    ``max_shard_bytes``), with ``files`` (name -> text, e.g. the tokenizer's) beside the weights.

    The directory is assembled beside ``out`` and renamed into place, so a failure leaves nothing half
    written; an existing non-empty ``out`` is refused rather than mixed with.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists; choose a new directory for the Hugging Face model")
    cfg = infer_config(sd, str(out))
    if cfg.version != V7:
        raise CheckpointError(f"{out}: the Hugging Face layout is written for RWKV-7 only, not {cfg.version}")
    spec = LAYOUTS[layout]
    hf = spec.to_hf(sd, str(out))
    dtype = hf[spec.embedding].dtype
    shards = _split(hf, max_shard_bytes)
    with atomic_dir(out) as tmp:
        config = json.dumps(spec.config(cfg, dtype), indent=2, allow_nan=False)
        (tmp / CONFIG).write_text(config + "\n", encoding="utf-8")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, part in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(part, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(part, name))
            total = sum(t.numel() * t.element_size() for t in hf.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return out


def _split(sd: dict[str, Tensor], max_bytes: int | None) -> list[dict[str, Tensor]]:
    """Group tensors, in name order, into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(sd):
        t = sd[name].contiguous()
        n = t.numel() * t.element_size()
        if t.storage_offset() != 0 or t.untyped_storage().nbytes() != n:  # a view: safetensors wants its own
            t = t.clone()
        if max_bytes is not None and shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards
