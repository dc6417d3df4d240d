"""``statetune prepare``: every input format, the split, the report, and every kind of bad input."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from statetune.cli import main
from statetune.commands.prepare import PrepareOptions, prepare
from statetune.data import prepare as prepare_mod
from statetune.data.formats import Format, RecordEncoder
from statetune.data.pipeline import in_val, mask_json
from statetune.data.report import percentile
from statetune.errors import DataError, OptionError
from statetune.tokenizer import get_tokenizer

W = get_tokenizer("world")
SEED_DIRS = [Path(__file__).parents[2] / "shared/data/seed", Path(__file__).parent / "data"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(tmp_path: Path, inputs: list[Path], **kw) -> tuple[list[dict], dict]:
    assert prepare(PrepareOptions(inputs=[str(p) for p in inputs], out=str(tmp_path / "out"), **kw)) == 0
    return read_jsonl(tmp_path / "out.jsonl"), json.loads((tmp_path / "out.meta.json").read_text())


def run_one(tmp_path: Path, record: dict, **kw) -> tuple[list[int], list[int]]:
    rows, _ = run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", [record])], **kw)
    assert len(rows) == 1
    return rows[0]["text"], rows[0]["mask"]


def loss_text(ids: list[int], mask: list[int]) -> str:
    return W.decode([i for i, m in zip(ids, mask, strict=True) if m])


# -- formats -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed_dir", SEED_DIRS, ids=["shared", "tests-data"])
def test_seed_sample_reproduces_exactly(tmp_path, seed_dir):
    if not (seed_dir / "e2e_sample_raw.jsonl").is_file():
        pytest.skip(f"no seed data in {seed_dir}")
    run(tmp_path, [seed_dir / "e2e_sample_raw.jsonl"])
    assert (tmp_path / "out.jsonl").read_bytes() == (seed_dir / "e2e_sample_rwkvtok.jsonl").read_bytes()


def test_text_format_has_loss_everywhere_and_nothing_appended(tmp_path):
    ids, mask = run_one(tmp_path, {"text": "Hello 你好 😀\n\ndef f(): pass"})
    assert ids == W.encode("Hello 你好 😀\n\ndef f(): pass")
    assert mask == [1] * len(ids)
    line = (tmp_path / "out.jsonl").read_text()
    assert line == json.dumps({"text": ids, "mask": mask}) + "\n"


def test_tokenized_records_pass_through(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": [5, 6, 7], "mask": [0, 1, 1]}, {"text": [8, 9]}])
    rows, meta = run(tmp_path, [path])
    assert rows == [{"text": [5, 6, 7], "mask": [0, 1, 1]}, {"text": [8, 9], "mask": [1, 1]}]
    assert meta["format"] == "tokenized"


@pytest.mark.parametrize("keys", [("prompt", "completion"), ("input", "output")])
def test_prompt_completion_formats(tmp_path, keys):
    prompt, completion = "Translate to French: cat ->", " chat 猫"
    ids, mask = run_one(tmp_path, {keys[0]: prompt, keys[1]: completion})
    p, c = W.encode(prompt), W.encode(completion)
    assert ids == p + c + [0]  # tokenized separately, end of text appended
    assert mask == [0] * len(p) + [1] * (len(c) + 1)


def test_prompt_may_be_empty(tmp_path):
    ids, mask = run_one(tmp_path, {"prompt": "", "completion": "just text"})
    assert ids == W.encode("just text") + [0] and all(mask)


@pytest.mark.parametrize("inp", ["a table of 3 rows", "", None])
def test_instruction_format(tmp_path, inp):
    record = {"instruction": "Summarize the input.", "output": "Three rows."}
    if inp is not None:
        record["input"] = inp
    ids, mask = run_one(tmp_path, record)
    prompt = ("Instruction: Summarize the input.\n\n" + (f"Input: {inp}\n\n" if inp else "") + "Response:")
    assert ids[: mask.index(1)] == W.encode(prompt)
    assert W.decode(ids) == prompt + " Three rows."
    assert loss_text(ids, mask) == " Three rows." and ids[-1] == 0 and mask[-1] == 1


def test_chat_format_learns_assistant_turns_only(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "Four.\n\n\nDone. "}]
    ids, mask = run_one(tmp_path, {"messages": messages})
    expected = ("System: Be brief.\n\nUser: Hi!\n\nAssistant: Hello.\n\n"
                "User: 2+2?\n\nAssistant: Four.\nDone.\n\n")
    assert W.decode(ids) == expected  # blank lines inside a turn collapse: "\n\n" ends a turn
    assert loss_text(ids, mask) == " Hello.\n\n Four.\nDone.\n\n"
    assert 0 not in ids and mask[-1] == 1


def test_chat_with_explicit_eos_appends_it_after_each_assistant_turn(tmp_path):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ids, mask = run_one(tmp_path, {"messages": messages}, eos="0")
    assert ids.count(0) == 2 and ids[-1] == 0
    assert W.decode(ids) == "User: a\n\nAssistant: b\n\nUser: c\n\nAssistant: d\n\n"


def e2e_fields(seed_dir: Path) -> list[dict]:
    out = []
    for line in (seed_dir / "e2e_sample_raw.jsonl").read_text(encoding="utf-8").splitlines():
        head, ref = json.loads(line)["text"].split("\n\nResponse: ", 1)
        out.append({"mr": head.removeprefix("Input: "), "ref": ref})
    return out


def test_templates_on_csv_match_the_seed_tokens(tmp_path):
    seed_dir = next(d for d in SEED_DIRS if (d / "e2e_sample_raw.jsonl").is_file())
    records = e2e_fields(seed_dir)
    with (tmp_path / "e2e.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["mr", "ref"])
        writer.writeheader()
        writer.writerows(records)
    rows, meta = run(tmp_path, [tmp_path / "e2e.csv"], prompt_template=r"Input: {mr}\n\nResponse:",
                     completion_template=" {ref}")
    expected = read_jsonl(seed_dir / "e2e_sample_rwkvtok.jsonl")
    assert len(rows) == len(expected) == len(records)
    for row, exp, rec in zip(rows, expected, records, strict=True):
        assert row["text"] == exp["text"] + [0]  # the prompt/completion split does not change tokens
        n_prompt = len(W.encode(f"Input: {rec['mr']}\n\nResponse:"))
        assert row["mask"] == [0] * n_prompt + [1] * (len(row["text"]) - n_prompt)
    assert meta["format"] == "template"
    assert meta["prompt_template"] == "Input: {mr}\n\nResponse:" and meta["prompt_fields"] == ["mr"]
    assert meta["completion_template"] == " {ref}" and meta["stop"] == {"ids": [0], "text": None}


def test_template_numbers_and_literal_braces(tmp_path):
    ids, mask = run_one(tmp_path, {"q": "2+2", "a": 4}, prompt_template=r"Q {{x}}: {q}\nA:",
                        completion_template=" {a}", eos="none")
    assert W.decode(ids) == "Q {x}: 2+2\nA: 4" and loss_text(ids, mask) == " 4"


@pytest.mark.parametrize(("eos", "expected", "text"), [
    ("none", [], None), ("261", [261], None), (r"\n\n", [261], "\n\n"), ("</s>", W.encode("</s>"), "</s>")])
def test_eos_option(tmp_path, eos, expected, text):
    ids, mask = run_one(tmp_path, {"prompt": "p", "completion": "c"}, eos=eos)
    assert ids == W.encode("p") + W.encode("c") + expected and mask[-1] == 1
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["eos"] == ({"ids": expected, "text": text} if expected else None)
    assert meta["eos_option"] == eos


def test_eos_outside_the_vocabulary_is_an_option_error(tmp_path):
    with pytest.raises(OptionError, match="--eos"):
        run_one(tmp_path, {"prompt": "p", "completion": "c"}, eos="70000")


def test_format_is_detected_per_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "plain text"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "i", "output": "o"}])
    rows, meta = run(tmp_path, [a, b])
    assert rows[0]["text"] == W.encode("plain text") and rows[1]["text"][-1] == 0
    assert meta["format"] == "mixed" and meta["prompt_template"] is None
    assert [(i["format"], i["records"]) for i in meta["inputs"]] == [("text", 1), ("instruction", 1)]


def test_forced_format_overrides_detection(tmp_path):
    ids, mask = run_one(tmp_path, {"instruction": "ignored", "input": "in", "output": "out"},
                        format="input-output")
    assert ids == W.encode("in") + W.encode("out") + [0]


def test_meta_describes_how_to_prompt_new_inputs(tmp_path):
    _, meta = run(tmp_path, [write_jsonl(tmp_path / "i.jsonl", [{"instruction": "i", "output": "o"}])])
    assert meta["schema"] == "statetune.prepare/1"
    assert meta["tokenizer"] == {"name": "world", "vocab_size": 65536, "eot_id": 0}
    assert meta["prompt_template"] == "Instruction: {instruction}\n\nInput: {input}\n\nResponse:"
    assert meta["prompt_template_no_input"] == "Instruction: {instruction}\n\nResponse:"
    assert meta["eos"] == meta["stop"] == {"ids": [0], "text": None}
    chat = [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    _, meta = run(tmp_path, [write_jsonl(tmp_path / "c.jsonl", chat)])
    assert meta["prompt_template"] == "User: {user}\n\nAssistant:" and meta["eos"] is None
    assert meta["stop"] == {"ids": [261], "text": "\n\n"}


# -- split, lengths, report --------------------------------------------------------------------------------


def grouped_records(n: int = 240, groups: int = 40) -> list[dict]:
    return [{"text": f"group {i % groups} item {i}", "g": i % groups} for i in range(n)]


def groups_of(path: Path) -> list[int]:
    return [int(W.decode(r["text"]).split()[1]) for r in read_jsonl(path)]


def test_split_keeps_groups_together_and_is_deterministic(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", grouped_records())
    _, meta = run(tmp_path, [src], val_fraction=0.3, split_by="g")
    train, val = groups_of(tmp_path / "out.jsonl"), groups_of(tmp_path / "out.val.jsonl")
    assert train and val and not set(train) & set(val)
    assert len(train) + len(val) == 240 == meta["counts"]["records"]
    assert meta["counts"]["val_records"] == len(val) and meta["split"]["split_by"] == "g"
    first = (tmp_path / "out.val.jsonl").read_bytes()
    run(tmp_path, [src], val_fraction=0.3, split_by="g")
    assert (tmp_path / "out.val.jsonl").read_bytes() == first
    run(tmp_path, [src], val_fraction=0.3, split_by="g", seed=1)
    assert (tmp_path / "out.val.jsonl").read_bytes() != first


def test_split_without_field_hashes_the_record():
    keys = [json.dumps({"text": f"r{i}"}) for i in range(2000)]
    share = sum(in_val(k, 0, 0.25) for k in keys) / len(keys)
    assert 0.2 < share < 0.3
    assert [in_val(k, 0, 0.25) for k in keys] == [in_val(k, 0, 0.25) for k in keys]


def test_max_len_counts_long_records_and_never_truncates(tmp_path, capsys):
    texts = ["short one", "a much longer record than the limit allows for sure", "tiny bit"]
    rows, meta = run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])], max_len=4)
    assert [W.decode(r["text"]) for r in rows] == texts
    assert meta["counts"]["over_max_len"] == 1
    err = capsys.readouterr().err
    assert "longer than --max-len 4: 1 records" in err and "in.jsonl:2:" in err


def test_summary_goes_to_stderr(tmp_path, capsys):
    run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", [{"text": "a b c"}, {"text": "d e f g h"}])])
    err = capsys.readouterr().err
    for word in ("2 records", "loss tokens", "p50", "p90", "p99", "max", "skipped: 0"):
        assert word in err


def test_percentile_and_mask_json():
    from collections import Counter

    hist = Counter({1: 50, 2: 40, 10: 9, 100: 1})
    assert [percentile(hist, q) for q in (50, 90, 99, 100)] == [1, 2, 10, 100]
    assert mask_json([(0, 2), (1, 3)]) == json.dumps([0, 0, 1, 1, 1])


def test_parallel_workers_give_identical_output(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "CHUNK_ITEMS", 7)
    records = grouped_records(100) + [{"text": "bad", "g": None, "extra": [1]}]
    src = write_jsonl(tmp_path / "in.jsonl", records[:50] + [{"text": 5}] + records[50:])
    outs = []
    for workers in (1, 2):
        run(tmp_path, [src], val_fraction=0.2, split_by="g", skip_invalid=True, workers=workers)
        outs.append([(tmp_path / f"out{s}").read_bytes() for s in (".jsonl", ".val.jsonl", ".meta.json")])
    assert outs[0] == outs[1]
    with pytest.raises(DataError, match=r"in\.jsonl:51: field 'text'"):
        run(tmp_path, [src], workers=2)


# -- bad input -----------------------------------------------------------------------------------------------

GOOD = b'{"text": "fine text"}\n'
ERRORS = {
    "invalid json": (GOOD + b'{"text": "a"\n', {}, 2, "invalid JSON"),
    "not an object": (GOOD + b'["text"]\n', {}, 2, "expected a JSON object"),
    "missing field": (b'{"prompt": "p", "completion": "c d"}\n{"prompt": "p"}\n', {}, 2,
                      "'completion': missing"),
    "mistyped field": (GOOD + b'{"text": 5}\n', {}, 2, "'text': expected a string"),
    "mask length": (b'{"text": [1, 2], "mask": [1]}\n', {}, 1, "'mask': has 1 values but text has 2"),
    "mask values": (b'{"text": [1, 2], "mask": [1, 2]}\n', {}, 1, "'mask': item 1 is 2"),
    "id outside vocab": (b'{"text": [1, 65536]}\n', {}, 1, "'text': item 1 is 65536"),
    "negative id": (b'{"text": [-1, 2]}\n', {}, 1, "'text': item 0 is -1"),
    "empty text": (GOOD + b'\n{"text": ""}\n', {}, 3, "'text': empty text"),
    "empty ids": (b'{"text": []}\n', {}, 1, "'text': empty text"),
    "invalid utf-8": (GOOD + b'{"text": "caf\xe9"}\n', {}, 2, "invalid UTF-8"),
    "lone surrogate": (GOOD + b'{"text": "a\\ud800b"}\n', {}, 2, "'text': invalid UTF-8"),
    "template field": (b'{"mr": "x"}\n', {"completion_template": " {ref}"}, 1, "'ref': missing"),
    "undetectable": (b'{"question": "q", "answer": "a"}\n', {}, 1, "cannot tell the format"),
    "no assistant": (b'{"messages": [{"role": "user", "content": "hi"}]}\n', {}, 1, "no assistant"),
    "bad role": (b'{"messages": [{"role": "bot", "content": "hi"}]}\n', {}, 1, "'messages[0].role'"),
    "empty output": (b'{"instruction": "i", "output": ""}\n', {}, 1, "'output': empty text"),
    "nothing to learn": (b'{"text": [5, 6], "mask": [1, 0]}\n', {}, 1, "nothing to learn"),
    "split field": (GOOD, {"val_fraction": 0.5, "split_by": "group"}, 1, "'group': missing"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_names_file_line_and_field_and_writes_nothing(tmp_path, case):
    content, kw, line, message = ERRORS[case]
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    (tmp_path / "out.jsonl").write_text("previous\n")
    with pytest.raises(DataError) as e:
        prepare(PrepareOptions(inputs=[str(src)], out=str(tmp_path / "out"), **kw))
    assert f"in.jsonl:{line}: " in str(e.value) and message in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # no temporary or partial file left
    assert (tmp_path / "out.jsonl").read_text() == "previous\n"


@pytest.mark.parametrize(("name", "content"),
                         [("in.jsonl", b""), ("in.jsonl", b"\n \n"), ("in.csv", b"a,b\n")])
def test_empty_file_is_an_error(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match="empty file"):
        prepare(PrepareOptions(inputs=[str(tmp_path / name)], out=str(tmp_path / "out"), format="text"))
    with pytest.raises(DataError, match="empty file"):
        prepare(PrepareOptions(inputs=[str(tmp_path / name)], out=str(tmp_path / "out")))


def test_skip_invalid_counts_and_lists_bad_records(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"not json\n" + GOOD + b'{"text": 1}\n' * 6 + b'{"text": "ok then"}\n')
    rows, meta = run(tmp_path, [src], skip_invalid=True)
    assert [W.decode(r["text"]) for r in rows] == ["fine text", "ok then"]
    assert meta["counts"]["skipped"] == 7 and meta["inputs"][0]["skipped"] == 7
    err = capsys.readouterr().err
    assert "skipped: 7 invalid records" in err and "in.jsonl:1: invalid JSON" in err
    assert "in.jsonl:3: field 'text'" in err and "... and 2 more" in err


def test_skip_invalid_with_no_valid_record_is_an_error(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": 1}\n{"foo": 2}\n')
    with pytest.raises(DataError, match="no valid records"):
        run(tmp_path, [src], skip_invalid=True)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_csv_line_numbers_count_multiline_fields(tmp_path):
    src = tmp_path / "in.csv"
    src.write_bytes(b'\xef\xbb\xbfprompt,completion\n"a\nb",c\n"x,y"\n"",\n')
    with pytest.raises(DataError, match=r"in\.csv:4: has 1 columns, the header has 2"):
        run(tmp_path, [src])
    src.write_bytes(b'prompt,completion\n"a\nb",c\nq,\n')
    with pytest.raises(DataError, match=r"in\.csv:4: field 'completion': empty text"):
        run(tmp_path, [src])


def test_tsv_and_csv_invalid_utf8(tmp_path):
    src = tmp_path / "in.tsv"
    src.write_bytes(b"text\tother\nhello, world\t\xff\n")
    rows, _ = run(tmp_path, [src])  # the bad byte is in a column nobody reads
    assert W.decode(rows[0]["text"]) == "hello, world"
    src.write_bytes(b"text\tother\ncaf\xe9\tx\n")
    with pytest.raises(DataError, match=r"in\.tsv:2: field 'text': invalid UTF-8"):
        run(tmp_path, [src])


# -- options and CLI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "flag"), [
    ({"val_fraction": 1.0}, "--val-fraction"), ({"split_by": "g"}, "--split-by"),
    ({"max_len": 0}, "--max-len"), ({"format": "text", "completion_template": "{a}"}, "--prompt-template"),
    ({"format": "template"}, "--completion-template"), ({"prompt_template": "{a}"}, "--completion-template"),
    ({"completion_template": "{a.b}"}, "--completion-template"),
    ({"completion_template": "{0}"}, "--completion-template"), ({"completion_template": "{a"}, "--complet"),
    ({"format": "yaml"}, "--format"), ({"tokenizer": "gpt2"}, "--tokenizer"), ({"workers": -1}, "--workers")])
def test_bad_options_name_the_flag(kw, flag):
    with pytest.raises(OptionError, match=flag):
        PrepareOptions(inputs=["x.jsonl"], out="out", **kw)


def test_output_names_and_inputs(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "x y"}])
    assert prepare(PrepareOptions(inputs=[str(src)], out=str(tmp_path / "sub" / "o.jsonl"))) == 0
    assert sorted(os.listdir(tmp_path / "sub")) == ["o.jsonl", "o.meta.json"]
    with pytest.raises(OptionError, match="--out"):
        prepare(PrepareOptions(inputs=[str(src)], out=str(tmp_path / "in")))
    with pytest.raises(OptionError, match="no such file"):
        prepare(PrepareOptions(inputs=[str(tmp_path / "missing.jsonl")], out=str(tmp_path / "o")))


def test_tokenizer_follows_the_model(tmp_path, tiny_ckpt):
    ckpt = str(tiny_ckpt("rwkv7"))  # vocabulary of 300: the byte tokenizer
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "hé"}])
    rows, meta = run(tmp_path, [src], model=ckpt)
    assert rows[0]["text"] == [ord("h") + 1, 0xC3 + 1, 0xA9 + 1] and meta["tokenizer"]["name"] == "bytes"
    with pytest.raises(OptionError, match="--tokenizer: world does not fit"):
        run(tmp_path, [src], model=ckpt, tokenizer="world")


def test_record_encoder_api_matches_the_output(tmp_path):
    record = {"instruction": "i", "input": "x", "output": "o"}
    ids, mask = run_one(tmp_path, record)
    assert RecordEncoder(W, Format.INSTRUCTION, [0]).encode(record) == (ids, mask)


def test_cli_smoke(tmp_path, capsys):
    src = write_jsonl(tmp_path / "e2e.jsonl", [{"mr": "name[Alimentum]", "ref": "Alimentum is nice."}])
    out = tmp_path / "e2e_tok"
    code = main(["prepare", str(src), "--out", str(out), "--prompt-template", r"Input: {mr}\n\nResponse:",
                 "--completion-template", " {ref}", "--val-fraction", "0.1", "--seed", "3",
                 "--max-len", "64"])
    assert code == 0
    row = read_jsonl(tmp_path / "e2e_tok.jsonl") + read_jsonl(tmp_path / "e2e_tok.val.jsonl")
    assert W.decode(row[0]["text"]) == "Input: name[Alimentum]\n\nResponse: Alimentum is nice."
    assert "p50" in capsys.readouterr().err
    assert main(["prepare", str(src), "--out", str(out), "--completion-template", " {missing}"]) == 1
    assert "e2e.jsonl:1: field 'missing'" in capsys.readouterr().err


def test_text_with_a_mask_is_an_error_not_ignored(tmp_path):
    with pytest.raises(DataError, match="field 'mask': a mask goes with text as token ids"):
        run_one(tmp_path, {"text": "a b", "mask": [1, 1]})
    with pytest.raises(DataError, match="field 'text': expected a string, got a list"):
        run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", [{"text": [1, 2]}])], format="text")


def test_unreadable_model_names_the_flag(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a b"}])
    with pytest.raises(OptionError, match="--model"):
        run(tmp_path, [src], model=str(tmp_path / "missing.pth"))
