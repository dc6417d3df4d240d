"""Every file and directory a command writes gets the mode an ordinary write gives under the umask (files
``0666``, directories ``0777``, less the umask), never ``mkstemp``'s ``0600`` or ``mkdtemp``'s ``0700``: a
server running as another user must be able to read states, datasets and converted models (docs/errors.md).

Each command writes into a folder that does not exist yet, so the folders it creates are checked too; the
inputs live elsewhere, and everything under the output folder must have been written by the command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from train_data import write_task

from statetune.cli import main
from statetune.fileio import AtomicGroup, atomic_dir, atomic_write
from statetune.filemodes import give_normal_modes, umask

MASKS = [0o022, 0o027]


@pytest.fixture(params=MASKS, ids=lambda m: f"umask{m:03o}")
def mask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def wrong_modes(root: Path, mask: int) -> list[str]:
    """Entries under ``root`` (``root`` included) whose permission bits differ from an ordinary write's."""
    want = {True: 0o777 & ~mask, False: 0o666 & ~mask}
    wrong = []
    for p in [root, *sorted(root.rglob("*"))]:
        got = p.stat().st_mode & 0o777
        if got != want[p.is_dir()]:
            wrong.append(f"{p.relative_to(root.parent)}: {got:o}, expected {want[p.is_dir()]:o}")
    return wrong


def run(*argv: object) -> None:
    assert main([str(a) for a in argv]) == 0


def test_umask_is_read_without_changing_it(mask):
    assert umask() == mask and umask() == mask


def test_safetensors_written_atomically_is_not_0600(tmp_path, mask):
    """safetensors writes its own temporary file and renames it over ours: the mode is set after it."""
    out = tmp_path / "out"
    atomic_write(out / "a.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, tmp))
    atomic_write(out / "b.pt", lambda tmp: torch.save({"x": torch.zeros(2)}, tmp))
    with AtomicGroup([out / "c.txt", out / "d.txt"]) as group:
        for t in group.temps:
            save_file({"x": torch.zeros(1)}, str(t))
    assert not wrong_modes(out, mask)


def test_atomic_dir_gives_every_entry_normal_modes(tmp_path, mask):
    out = tmp_path / "made" / "model"
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        save_file({"x": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))
        (tmp / "config.json").write_text("{}")
    assert not wrong_modes(tmp_path / "made", mask)
    assert not [p for p in (tmp_path / "made").iterdir() if p.name.endswith(".tmp")]


def test_give_normal_modes_leaves_link_targets_alone(tmp_path, mask):
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    outside.chmod(0o600)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link").symlink_to(outside)
    give_normal_modes(tmp_path / "d")
    assert outside.stat().st_mode & 0o777 == 0o600


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_ckpt):
    """Raw records, tokenized train/validation files and a state, written before any umask is set."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "raw.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" a{i}"}) + "\n"
                                            for i in range(40)))
    train, val = write_task(root, n_train=16, n_val=8)
    state = root / "s.safetensors"
    assert main(["state", "capture", "--model", str(tiny_ckpt()), "--prompt", "hello", "--out", str(state)]) == 0
    return {"root": root, "model": tiny_ckpt(), "train": train, "val": val, "state": state}


def test_prepare(inputs, tmp_path, mask):
    run("prepare", inputs["root"] / "raw.jsonl", "--out", tmp_path / "out" / "deep" / "data", "--model",
        inputs["model"], "--val-fraction", "0.25")
    assert sorted(p.name for p in (tmp_path / "out" / "deep").iterdir()) == \
        ["data.jsonl", "data.meta.json", "data.val.jsonl"]
    assert not wrong_modes(tmp_path / "out", mask)


def test_train_with_checkpoints(inputs, tmp_path, mask):
    run("train", "--model", inputs["model"], "--train-data", inputs["train"], "--val-data", inputs["val"],
        "--out", tmp_path / "run", "--max-steps", "2", "--batch-size", "8", "--eval-every", "1",
        "--save-every", "1", "--no-progress", "--threads", "1")
    names = {p.name for p in (tmp_path / "run").rglob("*")}
    assert {"state-best.safetensors", "state-final.safetensors", "checkpoints"} <= names
    assert any(n.endswith(".pt") for n in names)
    assert not wrong_modes(tmp_path / "run", mask)
    run("eval", "plot", tmp_path / "run")  # curves.png into the run directory
    assert (tmp_path / "run" / "curves.png").exists() and not wrong_modes(tmp_path / "run", mask)


def test_state_commands(inputs, tmp_path, mask):
    m, s, out = inputs["model"], inputs["state"], tmp_path / "out"
    run("state", "capture", "--model", m, "--prompt", "hi", "--out", out / "cap" / "c.safetensors")
    run("state", "capture", "--model", m, "--prompt", "hi", "--out", out / "cap" / "c.pth")
    run("state", "average", s, out / "cap" / "c.safetensors", "--out", out / "avg" / "a.safetensors")
    run("state", "average", s, s, "--out", out / "avg" / "a.pth")
    for fmt, ext in [("statetune", "safetensors"), ("pth", "pth"), ("list", "pth"), ("ai00", "st")]:
        run("state", "convert", s, out / "conv" / f"{fmt}.{ext}", "--to", fmt)
    run("state", "merge", "--model", m, "--state", s, "--out", out / "merged" / "m.pth")
    run("state", "merge", "--model", m, "--state", s, "--out", out / "merged" / "m.safetensors")
    assert len(list(out.rglob("*.*"))) == 10
    assert not wrong_modes(out, mask)


def test_model_convert(inputs, tmp_path, mask):
    out = tmp_path / "out"
    run("model", "convert", inputs["model"], out / "hf", "--to", "hf")
    run("model", "convert", inputs["model"], out / "sharded", "--to", "hf", "--max-shard-size", "20KB")
    assert len(list((out / "sharded").glob("model-*.safetensors"))) > 1
    run("model", "convert", out / "hf", out / "back" / "m.pth", "--to", "pth")
    run("model", "convert", out / "hf", out / "back" / "m.safetensors", "--to", "pth")
    assert not wrong_modes(out, mask)


def test_eval_and_generate_outputs(inputs, tmp_path, mask):
    out = tmp_path / "out"
    run("eval", "--model", inputs["model"], "--data", inputs["val"], "--state", inputs["state"],
        "--out", out / "report" / "r", "--threads", "1")
    assert sorted(p.name for p in (out / "report").iterdir()) == ["r.json", "r.md"]
    prompts = inputs["root"] / "prompts.jsonl"
    prompts.write_text('{"p": "hi"}\n{"p": "yo"}\n')
    run("generate", "--model", inputs["model"], "--input", prompts, "--prompt-field", "p", "--out",
        out / "gen" / "g.jsonl", "--max-tokens", "2", "--threads", "1")
    assert not wrong_modes(out, mask)
