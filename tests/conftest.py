"""Shared fixtures: tiny checkpoints in the official key format, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from statetune.model.random_init import random_checkpoint

# Odd low-rank widths prove that sizes are read from shapes, not from a table.
LORA = {"rwkv7": {"w": 23, "a": 19, "v": 13, "g": 37}, "rwkv6": {"maa": 17, "decay": 31}}


def write_checkpoint(path: Path, version: str, dtype: torch.dtype = torch.float32, **kw) -> Path:
    sd = random_checkpoint(version, lora=LORA[version], **kw)
    torch.save({k: v.to(dtype) for k, v in sd.items()}, path)
    return path


@pytest.fixture(scope="session")
def official_ckpt(tmp_path_factory):
    """``official_ckpt(version, dtype)`` → path of a 3-layer, 2-head x 64, vocab-65536 checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    cache: dict[tuple[str, torch.dtype], Path] = {}

    def get(version: str, dtype: torch.dtype = torch.float32) -> Path:
        key = (version, dtype)
        if key not in cache:
            name = f"{version}-{str(dtype).split('.')[-1]}.pth"
            cache[key] = write_checkpoint(root / name, version, dtype, n_layer=3, n_embd=128, head_size=64,
                                          vocab_size=65536, seed=1)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """``tiny_ckpt(version)`` → a very small checkpoint (vocab 300, 2 heads of 8) for fast tests."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, Path] = {}

    def get(version: str = "rwkv7") -> Path:
        if version not in cache:
            cache[version] = write_checkpoint(root / f"{version}.pth", version, n_layer=2, n_embd=16,
                                              head_size=8, vocab_size=300, dim_ffn=40, seed=2)
        return cache[version]

    return get


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """``(model, train data, val data)``: the small training task of the train, LR-search and lock tests."""
    from train_data import write_task

    root = tmp_path_factory.mktemp("task")
    model = write_checkpoint(root / "m.pth", "rwkv7", n_layer=2, n_embd=32, head_size=16, vocab_size=300,
                             dim_ffn=64, seed=3)
    train_path, val_path = write_task(root)
    return model, train_path, val_path
