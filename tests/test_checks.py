"""One check per rule, the same wherever the rule applies: a state's metadata (``state info`` says what
``generate`` will do), typed options in every TOML a run reads (``--config`` and a resumed run's own
``config.toml``, which must also agree with its checkpoint), model weights that are not real floating point,
standard JSON in every file of user data, and the record shapes docs/generate.md promises.

Each failure is checked for its exit status, a message naming the file and the line, key, tensor or flag,
no traceback, and files left as they were.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from abuse import fails, snapshot, unchanged
from conftest import write_checkpoint
from train_data import write_task

import statetune
from statetune.cli import main
from statetune.data.loader import TokenDataset
from statetune.errors import CheckpointError, DataError, StateFileError
from statetune.infer.generate import RecordPrompts
from statetune.model.checkpoint import read_weights
from statetune.prompts import INSTRUCTION_PROMPT, INSTRUCTION_PROMPT_NO_INPUT
from statetune.runtime import dataset_meta
from statetune.serve.index import index_state
from statetune.strict_json import StrictJSONError, loads

USAGE, RUNTIME = 2, 1


# -- 1. a state's metadata: state info --model runs the checks that loading it for use runs ---------------------
BAD_METADATA = {
    "unclosed_brace": ({"prompt_template": "Input: {mr\n\nResponse:"}, "metadata prompt_template: invalid"),
    "positional_field": ({"prompt_template": "Input: {0}"}, "metadata prompt_template: placeholder {0}"),
    "format_spec": ({"prompt_template": "{x:>9}"}, "metadata prompt_template: placeholder {x:>9}"),
    "not_text": ({"prompt_template": 5}, "metadata prompt_template: expected a template string, found 5"),
    "no_input_variant": ({"prompt_template": "{a}", "prompt_template_no_input": "{"},
                         "metadata prompt_template_no_input: invalid"),
    "unknown_tokenizer": ({"tokenizer": "klingon"}, "metadata tokenizer: unknown tokenizer 'klingon'"),
    "tokenizer_too_big": ({"tokenizer": "world"}, "metadata tokenizer: world has 65536 ids"),
    "stop_not_object": ({"stop": "oops"}, "metadata stop: expected"),
    "stop_id_outside": ({"stop": {"ids": [70000], "text": None}}, "metadata stop: expected"),
    "eos_text_number": ({"eos": {"ids": [0], "text": 3}}, "metadata eos: expected"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    return write_checkpoint(root / "m.pth", "rwkv7", n_layer=2, n_embd=16, head_size=8, vocab_size=300,
                            dim_ffn=40, seed=2)


def _state(model_path: Path, path: Path, meta: dict) -> Path:
    model = statetune.load_model(model_path)
    statetune.save_state(path, model.zero_state(1), model, meta)
    return path


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_state_info_refuses_what_generate_refuses_naming_the_file(tiny, tmp_path, capsys, case):
    meta, message = BAD_METADATA[case]
    state = _state(tiny, tmp_path / "s.safetensors", meta)
    before = snapshot(state)
    capsys.readouterr()
    assert main(["state", "info", str(state), "--model", str(tiny)]) == RUNTIME
    out = capsys.readouterr().out
    assert f"fits {tiny}: no: {state}: {message}" in out, out
    fails(capsys, ["generate", "--model", tiny, "--state", state, "--prompt", "hi", "--max-tokens", "2"], RUNTIME,
          f"{state}: {message}")
    model = statetune.load_model(tiny)
    with pytest.raises(StateFileError, match="metadata"):  # chat /load, eval, train --init: the same reader
        statetune.load_state(state, model)
    with pytest.raises(StateFileError, match="metadata"):  # serve's header-only index too
        index_state(state, model, model.fingerprint())
    assert unchanged(before)


def test_usable_metadata_fits_and_generates(tiny, tmp_path, capsys):
    state = _state(tiny, tmp_path / "s.safetensors", {"prompt_template": "Q: {q}\n\nA:", "tokenizer": "bytes",
                                                      "stop": {"ids": [10], "text": "\n"}})
    assert main(["state", "info", str(state), "--model", str(tiny)]) == 0
    assert f"fits {tiny}: yes" in capsys.readouterr().out
    assert main(["generate", "--model", str(tiny), "--state", str(state), "--prompt", "hi", "--max-tokens", "2",
                 "--temperature", "0"]) == 0


# -- 2. typed options in every TOML, and a resumed run's config.toml against its checkpoint ----------------------
@pytest.mark.parametrize("text,key,detail", [
    ("batch_size = true\n", "batch_size", "expected int, got bool"),
    ("[optim]\nlr_search_rates = [1.0, \"ten\"]\n", "optim.lr_search_rates", "item 1: expected float, got str"),
    ("max-steps = 2.5\n", "max-steps", "expected int, got float"),
])
def test_config_flag_types_are_checked_naming_file_and_key(tiny, tmp_path, capsys, text, key, detail):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    fails(capsys, ["train", "--config", cfg, "--model", tiny, "--train-data", tmp_path / "t.jsonl", "--out",
                   tmp_path / "run"], USAGE, f"(key {key!r} of {cfg})", detail)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    """A 2-step run with a checkpoint at step 2 (batch size 2)."""
    root = tmp_path_factory.mktemp("run")
    train, _ = write_task(root, n_train=8, n_val=0)
    run = root / "run"
    assert main(["train", "--model", str(tiny), "--train-data", str(train), "--out", str(run), "--batch-size", "2",
                 "--max-steps", "2", "--save-every", "2", "--samples", "0", "--no-progress", "--threads", "1"]) == 0
    return run


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def _edit(run: Path, old: str, new: str) -> None:
    cfg = run / "config.toml"
    assert old in cfg.read_text()
    cfg.write_text(cfg.read_text().replace(old, new))


@pytest.mark.parametrize("old,new,messages", [
    ("batch_size = 2", "batch_size = true",
     ("config.toml is damaged: --batch-size: invalid value True: expected int, got bool (key 'batch_size' of",)),
    ("batch_size = 2", "batch_size = 5", ("config.toml: batch_size = 5 differs from 2", "step-00000002.pt")),
    ("lr = 1.0", "lr = 0.25", ("config.toml: lr = 0.25 differs from 1.0",)),
    ("seed = 0", "seed = 7", ("config.toml: seed = 7 differs from 0",)),
], ids=["bool_for_int", "batch_size_changed", "lr_changed", "seed_changed"])
def test_resume_refuses_a_hand_edited_config(run, capsys, old, new, messages):
    _edit(run, old, new)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    fails(capsys, ["train", "--resume", run, "--max-steps", "3", "--threads", "1"], RUNTIME, *messages)
    assert unchanged(before) and sorted(p for p in run.rglob("*") if p.is_file()) == sorted(before)


def test_resume_accepts_an_edit_of_what_may_change(run, capsys):
    _edit(run, "max_steps = 2", "max_steps = 3")
    assert main(["train", "--resume", str(run), "--threads", "1"]) == 0, capsys.readouterr().err
    assert (run / "checkpoints" / "step-00000003.pt").is_file()


# -- 3. model weights that are not real floating point ----------------------------------------------------------
@pytest.mark.parametrize("dtype,kind", [(torch.complex64, "complex"), (torch.bool, "boolean"),
                                        (torch.int32, "integer")])
def test_non_float_weights_are_refused_naming_file_and_tensor(tiny, tmp_path, capsys, recwarn, dtype, kind):
    sd = read_weights(tiny)
    sd["blocks.1.ffn.key.weight"] = sd["blocks.1.ffn.key.weight"].to(dtype)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(CheckpointError, match=rf"{bad}: 1 tensor\(s\) hold {kind}.* blocks\.1\.ffn\.key\.weight"):
        statetune.load_model(bad)
    fails(capsys, ["generate", "--model", bad, "--prompt", "hi"], RUNTIME, f"{bad}: ", "blocks.1.ffn.key.weight")
    assert not [w for w in recwarn if "complex" in str(w.message).lower()]  # refused, not cast with a warning


# -- 4. standard JSON only, in every reader of user data --------------------------------------------------------
NON_STANDARD = {
    "nan": (b'{"text": NaN}', "NaN is not a JSON number"),
    "infinity": (b'{"text": -Infinity}', "-Infinity is not a JSON number"),
    "overflow": (b'{"text": 1e999}', "the number 1e999 is too large for a float"),
    "duplicate_key": (b'{"text": "a", "text": "b"}', "key 'text' appears twice"),
    "nested_duplicate": (b'{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}',
                         "key 'role' appears twice"),
}


@pytest.mark.parametrize("case", sorted(NON_STANDARD))
def test_the_json_reader_refuses_what_python_json_lets_through(case):
    line, message = NON_STANDARD[case]
    json.loads(line)  # the standard library reads it silently: the reason for the shared reader
    with pytest.raises(StrictJSONError, match=message):
        loads(line)


@pytest.mark.parametrize("case", sorted(NON_STANDARD))
def test_prepare_refuses_non_standard_json_naming_file_and_line(tmp_path, capsys, case):
    line, message = NON_STANDARD[case]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "fine text to learn"}\n' + line + b"\n")
    fails(capsys, ["prepare", src, "--out", tmp_path / "out"], RUNTIME, f"{src}:2: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("case", ["nan", "duplicate_key"])
def test_generate_input_refuses_non_standard_json(tiny, tmp_path, capsys, case):
    line, message = NON_STANDARD[case]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"prompt": "a"}\n' + line.replace(b'"text"', b'"prompt"') + b"\n")
    fails(capsys, ["generate", "--model", tiny, "--input", src, "--out", tmp_path / "out.jsonl"], RUNTIME,
          f"{src}:2: {message.replace('text', 'prompt')}")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("line,message", [(b'{"text": [1, 2], "mask": [NaN, 1]}', "NaN is not a JSON number"),
                                          (b'{"text": [1, 2], "text": [3]}', "key 'text' appears twice")])
def test_tokenized_data_refuses_non_standard_json(tmp_path, line, message):
    src = tmp_path / "d.jsonl"
    src.write_bytes(b'{"text": [1, 2]}\n' + line + b"\n")
    with pytest.raises(DataError, match=rf"d\.jsonl:2: {message}"):
        TokenDataset(src)


@pytest.mark.parametrize("text,message", [('{"format": "chat", "format": "text"}', "key 'format' appears twice"),
                                          ('{"stop": {"ids": [Infinity]}}', "Infinity is not a JSON number"),
                                          ('[1]', "expected a JSON object")])
def test_dataset_metadata_refuses_non_standard_json(tmp_path, text, message):
    (tmp_path / "d.meta.json").write_text(text)
    with pytest.raises(Exception, match=rf"d\.meta\.json: {message}"):
        dataset_meta(tmp_path / "d.jsonl")


# -- 5. the record shapes of docs/generate.md ------------------------------------------------------------------
SHAPES = {
    "prompt": ({"prompt": "Tell me"}, "Tell me"),
    "prompt_completion": ({"prompt": "Tell me", "completion": "ignored"}, "Tell me"),
    "input": ({"input": "x=1"}, "x=1"),
    "input_output": ({"input": "x=1", "output": "y"}, "x=1"),
    "instruction": ({"instruction": "Add"}, INSTRUCTION_PROMPT_NO_INPUT.format(instruction="Add")),
    "instruction_empty_input": ({"instruction": "Add", "input": ""},
                                INSTRUCTION_PROMPT_NO_INPUT.format(instruction="Add")),
    "instruction_input": ({"instruction": "Add", "input": "1 2"},
                          INSTRUCTION_PROMPT.format(instruction="Add", input="1 2")),
    "messages": ({"messages": [{"role": "user", "content": "Hi"}]}, "User: Hi\n\nAssistant:"),
}


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_each_documented_record_shape_has_a_prompt(case):
    record, prompt = SHAPES[case]
    assert RecordPrompts({}).from_record(record) == prompt


def test_generate_input_reads_every_documented_shape(tiny, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r, _ in SHAPES.values()))
    assert main(["generate", "--model", str(tiny), "--input", str(src), "--out", str(out), "--max-tokens", "2",
                 "--temperature", "0"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "generated"} for r in rows] == [r for r, _ in SHAPES.values()]


def test_an_undocumented_shape_is_refused_naming_the_line(tiny, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a"}\n{"question": "q"}\n')
    fails(capsys, ["generate", "--model", tiny, "--input", src, "--out", tmp_path / "o.jsonl"], RUNTIME,
          f"{src}:2: cannot tell the prompt from fields 'question'", "--prompt-field")


def test_a_safetensors_state_whose_length_starts_like_a_pickle_keeps_its_metadata(tiny, tmp_path):
    """The header length is little-endian: a low byte of 0x80 is the first byte of a pickle too. Told apart by
    the header's ``{`` after the length, such a file is read as safetensors (its metadata kept), not through
    torch.load (which returned its tensors and dropped the template, tokenizer and fingerprint)."""
    model = statetune.load_model(tiny)
    path = tmp_path / "s.safetensors"
    for pad in range(256):
        statetune.save_state(path, model.zero_state(1), model, {"prompt_template": "{q}", "note": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    meta = statetune.load_state(path, model).metadata
    assert meta["prompt_template"] == "{q}" and meta["model_fingerprint"] == model.fingerprint()


@pytest.mark.parametrize("mask", ["[0, 1.0]", "[0, true]"])
def test_tokenized_data_takes_masks_by_prepares_rule(tmp_path, mask):
    src = tmp_path / "d.jsonl"
    src.write_text(f'{{"text": [1, 2], "mask": {mask}}}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'mask' must hold only 0 and 1"):
        TokenDataset(src)


def test_a_complex_state_is_refused_naming_the_key(tiny, tmp_path, capsys):
    state = tmp_path / "c.pth"
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(2, 8, 8, dtype=torch.complex64) for i in range(2)}, state)
    fails(capsys, ["state", "info", state], RUNTIME, f"{state}: blocks.0.att.time_state: expected a floating-point "
          "tensor, found torch.complex64")
