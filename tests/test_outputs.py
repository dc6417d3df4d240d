"""Outputs and names: an output is never one of the command's inputs (however spelled or linked), an output
name that names a directory is refused, ``eval`` rows have distinct names, errors name the user's flag or
field, and ``prepare``'s worker processes stop without a word when the run stops early."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from abuse import fails, snapshot, unchanged
from train_data import write_task

from statetune.cli import main
from statetune.errors import OptionError
from statetune.evaluate.report import state_labels
from statetune.outpaths import check_name, check_output, same_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_ckpt):
    root = tmp_path_factory.mktemp("outputs")
    (root / "sub").mkdir()
    (root / "in.jsonl").write_text('{"p": "hi"}\n')
    train, val = write_task(root, n_train=8, n_val=4)
    state = root / "s.safetensors"
    assert main(["state", "capture", "--model", str(tiny_ckpt()), "--prompt", "hello", "--out", str(state)]) == 0
    return {"root": root, "model": tiny_ckpt(), "in": root / "in.jsonl", "val": val, "state": state}


def spellings(path: Path, tmp_path: Path) -> dict[str, Path]:
    """Other names of ``path``: relative spellings, a symbolic link and a hard link."""
    sym, hard = tmp_path / f"sym{path.suffix}", tmp_path / f"hard{path.suffix}"
    sym.symlink_to(path)
    os.link(path, hard)
    return {"same": path, "dotdot": path.parent / "sub" / ".." / path.name, "symlink": sym, "hardlink": hard}


# -- the shared checks ---------------------------------------------------------------------------------------
def test_same_file_sees_through_spellings_and_links(files, tmp_path):
    for name, other in spellings(files["in"], tmp_path).items():
        assert same_file(other, files["in"]), name
    assert not same_file(files["val"], files["in"])
    assert not same_file(tmp_path / "absent.jsonl", files["in"])


@pytest.mark.parametrize("name", ["d/", "d/.", "d/..", ".", "..", "/", "d//"])
def test_a_name_that_names_a_directory_is_refused(name):
    with pytest.raises(OptionError, match="names a directory"):
        check_name(name, "--out")


def test_an_existing_directory_is_refused_as_an_output_file(tmp_path):
    with pytest.raises(OptionError, match="is a directory"):
        check_output(tmp_path, "--out")
    check_output(tmp_path / "x.jsonl", "--out", [("--input", tmp_path / "y.jsonl"), ("--state", None)])


# -- every command with an input and an output ---------------------------------------------------------------
@pytest.mark.parametrize("how", ["same", "dotdot", "symlink", "hardlink"])
def test_generate_refuses_to_overwrite_its_input(files, tmp_path, capsys, how):
    out = spellings(files["in"], tmp_path)[how]
    before = snapshot(files["in"])
    fails(capsys, ["generate", "--model", files["model"], "--input", files["in"], "--prompt-field", "p",
                   "--out", out, "--max-tokens", "2"], 2, "--out:", "an input (--input)")
    assert unchanged(before)


def test_generate_refuses_to_overwrite_the_state_or_model(files, capsys):
    fails(capsys, ["generate", "--model", files["model"], "--state", files["state"], "--input", files["in"],
                   "--prompt-field", "p", "--out", files["state"]], 2, "an input (--state)")
    fails(capsys, ["generate", "--model", files["model"], "--input", files["in"], "--prompt-field", "p",
                   "--out", files["model"]], 2, "an input (--model)")


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_prepare_refuses_to_overwrite_its_input_however_named(files, tmp_path, capsys, how):
    out = spellings(files["in"], tmp_path)[how]
    fails(capsys, ["prepare", files["in"], "--out", out, "--tokenizer", "bytes"], 2, "an input (INPUTS)")


@pytest.mark.parametrize("out", ["d/", "d/.", "d/.jsonl", "."])
def test_prepare_refuses_an_out_that_names_a_directory(files, tmp_path, capsys, monkeypatch, out):
    (tmp_path / "d").mkdir()
    monkeypatch.chdir(tmp_path)
    fails(capsys, ["prepare", files["in"], "--out", out, "--tokenizer", "bytes", "--format", "template",
                   "--completion-template", "{p}"], 2, "--out:", "names a directory")
    assert not [p for p in tmp_path.rglob(".*")]


def test_prepare_into_a_directory_with_a_name_works(files, tmp_path, capsys):
    assert main(["prepare", str(files["in"]), "--out", str(tmp_path / "d" / "data"), "--tokenizer", "bytes",
                 "--format", "template", "--completion-template", "{p}"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["data.jsonl", "data.meta.json"]


@pytest.mark.parametrize("argv,message", [
    (["state", "convert", "{state}", "{state}"], "OUTPUT: "),
    (["state", "convert", "{state}", "{hard}"], "OUTPUT: "),
    (["state", "average", "{val_state}", "{state}", "--out", "{state}"], "an input (STATES)"),
    (["state", "merge", "--model", "{model}", "--state", "{state}", "--out", "{model}"], "an input (--model)"),
    (["state", "merge", "--model", "{model}", "--state", "{state}", "--out", "{hard}"], "an input (--state)"),
    (["state", "capture", "--model", "{model}", "--prompt", "x", "--out", "{model}"], "an input (--model)"),
    (["model", "convert", "{model}", "{model}", "--to", "pth"], "an input (INPUT)"),
    (["model", "convert", "{model}", "{model}", "--to", "hf"], "an input (INPUT)"),
    (["eval", "--model", "{model}", "--data", "{data_json}", "--out", "{data_prefix}"], "an input (--data)"),
    (["eval", "--model", "{model}", "--data", "{val}", "--out", "{root}/"], "names a directory"),
], ids=["convert", "convert-hardlink", "average", "merge-model", "merge-state", "capture", "model-pth",
        "model-hf", "eval-json", "eval-dir"])
def test_every_command_refuses_to_overwrite_an_input(files, tmp_path, capsys, argv, message):
    os.link(files["state"], tmp_path / "hard.safetensors")
    (tmp_path / "r.json").write_text(files["val"].read_text())
    (tmp_path / "v.safetensors").write_bytes(files["state"].read_bytes())
    names = {"state": files["state"], "model": files["model"], "val": files["val"], "root": tmp_path,
             "hard": tmp_path / "hard.safetensors", "val_state": tmp_path / "v.safetensors",
             "data_json": tmp_path / "r.json", "data_prefix": tmp_path / "r"}
    before = snapshot(files["state"], files["model"], tmp_path / "r.json")
    fails(capsys, [a.format(**names) for a in argv], 2, message)
    assert unchanged(before)


# -- names in reports and errors -----------------------------------------------------------------------------
def test_state_labels_are_distinct_and_recognisable():
    assert state_labels(["runs/a/best.safetensors", "runs/b/best.safetensors", "c.pth"]) == \
        ["a/best", "b/best", "c"]
    assert state_labels(["best.safetensors", "x/best.safetensors"]) == ["best", "x/best"]
    assert state_labels(["/r/s.pth", "/r/s.pth"]) == ["r/s", "r/s #2"]
    assert state_labels(["one.safetensors", "two.safetensors"]) == ["one", "two"]


def test_eval_rows_of_states_with_one_stem_have_distinct_names(files, tmp_path, capsys):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        assert main(["state", "capture", "--model", str(files["model"]), "--prompt", f"hi {d}", "--out",
                     str(tmp_path / d / "best.safetensors")]) == 0
    assert main(["eval", "--model", str(files["model"]), "--data", str(files["val"]), "--state",
                 str(tmp_path / "a" / "best.safetensors"), str(tmp_path / "b" / "best.safetensors"), "--out",
                 str(tmp_path / "r"), "--threads", "1"]) == 0
    rows = [r["name"] for r in json.loads((tmp_path / "r.json").read_text())["rows"]]
    assert rows == ["base (zero state)", "a/best", "b/best"]


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_an_unknown_stop_token_is_named_by_its_flag(files, capsys, monkeypatch, command):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # noqa: SIM115 (closed by pytest with the patch)
    extra = ["--prompt", "hi"] if command == "generate" else []
    err = fails(capsys, [command, "--model", files["model"], "--stop-token", "99999", "--max-tokens", "2", *extra],
                2, "--stop-token: token id outside the model's vocabulary", "99999")
    assert "stop_token_ids" not in err


def test_eval_names_the_meta_field_of_a_bad_stop_id(files, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(files["val"].read_text())
    (tmp_path / "d.meta.json").write_text(json.dumps({"tokenizer": "bytes", "stop": {"ids": [99999]}}))
    err = fails(capsys, ["eval", "--model", files["model"], "--data", data, "--generate", "--max-tokens", "2"], 1,
                "d.meta.json: stop.ids: 99999")
    assert "stop_token_ids" not in err


# -- worker processes ----------------------------------------------------------------------------------------
def big_jsonl(path: Path, n: int, bad_line: int | None = None) -> Path:
    """``n`` text records (about 160 bytes each; a few MB passes prepare's threshold for worker processes)."""
    row = json.dumps({"text": "a record of plain words to tokenize, long enough to make the file large " * 2})
    lines = [row] * n
    if bad_line is not None:
        lines[bad_line - 1] = '{"oops": 1}'
    path.write_text("\n".join(lines) + "\n")
    return path


def _prepare(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "statetune", "prepare", *args, "--tokenizer", "bytes"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [[], ["--workers", "3"]], ids=["default", "three"])
def test_a_bad_record_in_a_large_file_is_one_line_of_stderr(tmp_path, workers):
    data = big_jsonl(tmp_path / "big.jsonl", 60_000, bad_line=50_000)
    assert data.stat().st_size > 8 << 20  # prepare's default uses worker processes above 8 MB
    proc = _prepare([str(data), "--out", str(tmp_path / "out"), *workers])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert err.splitlines() == [f"statetune prepare: error: {data}:50000: field 'text': missing; the record "
                                f"has fields 'oops'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,line", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_stopping_prepare_while_workers_run_is_quiet(tmp_path, sig, code, line):
    """Ctrl-C reaches the whole process group (workers included); SIGTERM reaches the parent only."""
    data = big_jsonl(tmp_path / "big.jsonl", 200_000)
    proc = _prepare([str(data), "--out", str(tmp_path / "out"), "--workers", "2"], start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size for p in tmp_path.glob(".out.jsonl.*.tmp")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("prepare finished before it could be interrupted")
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.splitlines() == ([f"statetune prepare: {line}"] if line else []), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]
