"""``statetune prepare`` on preference pairs: each record shape to exact ids and masks, the meta, the errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from statetune.cli import main
from statetune.commands.prepare import PrepareOptions, prepare
from statetune.data.preference import PairEncoder, preference_prompt
from statetune.errors import DataError, OptionError
from statetune.tokenizer import get_tokenizer

W = get_tokenizer("world")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(tmp_path: Path, records: list, name: str = "in.jsonl", **kw) -> tuple[list[dict], dict]:
    src = write_jsonl(tmp_path / name, records)
    assert prepare(PrepareOptions(inputs=[str(src)], out=str(tmp_path / "out"), **kw)) == 0
    return read_jsonl(tmp_path / "out.jsonl"), json.loads((tmp_path / "out.meta.json").read_text())


def side(prompt: str, completion: str, eos: list[int]) -> dict:
    """The expected SFT record of one side: the prompt and the completion tokenized apart, loss on the latter."""
    p, c = W.encode(prompt) if prompt else [], W.encode(completion) + eos
    return {"text": p + c, "mask": [0] * len(p) + [1] * len(c)}


# -- shapes ------------------------------------------------------------------------------------------------


def test_text_pairs_share_the_prompt_and_end_with_end_of_text(tmp_path):
    rows, meta = run(tmp_path, [{"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " five, I think"}])
    assert rows == [{"chosen": side("Q: 2+2?\nA:", " 4", [0]), "rejected": side("Q: 2+2?\nA:", " five, I think", [0])}]
    assert meta["kind"] == "preference" and meta["format"] == "preference" and meta["preference_style"] == "text"
    assert meta["prompt_template"] == "{prompt}" and meta["stop"] == meta["eos"] == {"ids": [0], "text": None}


def test_text_pairs_through_templates(tmp_path):
    record = {"mr": "name[Aromi]", "chosen": "Aromi is here.", "rejected": "Zizzi is there."}
    rows, meta = run(tmp_path, [record], format="preference", prompt_template=r"Input: {mr}\n\nResponse:",
                     completion_template=" {completion}")
    prompt = "Input: name[Aromi]\n\nResponse:"
    assert rows == [{"chosen": side(prompt, " Aromi is here.", [0]), "rejected": side(prompt, " Zizzi is there.", [0])}]
    assert meta["prompt_template"] == "Input: {mr}\n\nResponse:" and meta["completion_template"] == " {completion}"
    # a prompt template alone needs --format preference; with both templates, pairs are detected
    rows2, _ = run(tmp_path, [record], prompt_template=r"Input: {mr}\n\nResponse:", completion_template=" {completion}")
    assert rows2 == rows


CHAT_PROMPT = "User: Hi!\n\nAssistant: Hello.\n\nUser: 2+2?\n\nAssistant:"


def test_chat_pairs_with_an_explicit_prompt(tmp_path):
    record = {"prompt": [user("Hi!"), assistant("Hello."), user("2+2?")],
              "chosen": [assistant("Four.")], "rejected": [assistant("  Five.\n\n\nMaybe.")]}
    rows, meta = run(tmp_path, [record])
    # the prompt's assistant turn is context (mask 0); chat turns end with a blank line and no end of text
    assert rows == [{"chosen": side(CHAT_PROMPT, " Four.\n\n", []),
                     "rejected": side(CHAT_PROMPT, " Five.\nMaybe.\n\n", [])}]
    assert meta["preference_style"] == "chat" and meta["eos"] is None
    assert meta["prompt_template"] == "User: {user}\n\nAssistant:" and meta["stop"] == {"ids": [261], "text": "\n\n"}


def test_chat_pairs_with_an_implicit_prompt_equal_the_explicit_form(tmp_path):
    history = [user("Hi!"), assistant("Hello."), user("2+2?")]
    rows, _ = run(tmp_path, [{"chosen": [*history, assistant("Four.")], "rejected": [*history, assistant("Five.")]}])
    assert rows == [{"chosen": side(CHAT_PROMPT, " Four.\n\n", []), "rejected": side(CHAT_PROMPT, " Five.\n\n", [])}]
    explicit, _ = run(tmp_path, [{"prompt": history, "chosen": [assistant("Four.")],
                                  "rejected": [assistant("Five.")]}])
    assert explicit == rows


def test_implicit_prompt_may_end_inside_the_replies(tmp_path):
    """Sides that share a first reply and differ in a second one learn only the differing replies."""
    rows, _ = run(tmp_path, [{"chosen": [user("q"), assistant("a"), assistant("b")],
                              "rejected": [user("q"), assistant("a"), assistant("c")]}])
    prompt = "User: q\n\nAssistant: a\n\nAssistant:"
    assert rows[0] == {"chosen": side(prompt, " b\n\n", []), "rejected": side(prompt, " c\n\n", [])}


def test_explicit_eos_applies_to_chat_pairs(tmp_path):
    rows, meta = run(tmp_path, [{"prompt": [user("x")], "chosen": [assistant("y")], "rejected": [assistant("z")]}],
                     eos="0")
    assert rows[0]["chosen"] == side("User: x\n\nAssistant:", " y\n\n", [0])
    assert meta["eos"] == {"ids": [0], "text": None}


def test_sft_meta_says_its_kind(tmp_path):
    _, meta = run(tmp_path, [{"prompt": "p", "completion": " c"}])
    assert meta["kind"] == "sft" and "preference_style" not in meta and "pairs" not in meta["counts"]


def test_counts_split_and_report(tmp_path, capsys):
    records = [{"prompt": f"group {i % 10} item {i}:", "chosen": " yes", "rejected": " no", "g": i % 10}
               for i in range(60)]
    _, meta = run(tmp_path, records, val_fraction=0.4, split_by="g")
    train, val = read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "out.val.jsonl")
    group = lambda row: W.decode(row["chosen"]["text"]).split()[1]  # noqa: E731
    assert train and val and not {group(r) for r in train} & {group(r) for r in val}
    assert len(train) + len(val) == 60 == meta["counts"]["pairs"] == meta["counts"]["records"]
    tokens = sum(len(r[s]["text"]) for r in train + val for s in ("chosen", "rejected"))
    assert meta["counts"]["tokens"] == tokens
    assert meta["lengths"]["max"] == max(len(r[s]["text"]) for r in train + val for s in ("chosen", "rejected"))
    err = capsys.readouterr().err
    assert f"prepared 60 pairs, {tokens:,} tokens" in err and f"train: {len(train)} pairs" in err


def test_generate_reads_the_shared_prompt():
    assert preference_prompt({"prompt": "Q:", "chosen": " a", "rejected": " b"}) == "Q:"
    history = [user("Hi!"), assistant("Hello."), user("2+2?")]
    assert preference_prompt({"prompt": history, "chosen": [assistant("4")], "rejected": [assistant("5")]}) \
        == CHAT_PROMPT
    assert preference_prompt({"chosen": [*history, assistant("4")], "rejected": [*history, assistant("5")]}) \
        == CHAT_PROMPT


def test_pair_encoder_api_matches_the_output(tmp_path):
    record = {"prompt": "p:", "chosen": " good", "rejected": " bad"}
    rows, _ = run(tmp_path, [record])
    (c_ids, c_mask), (r_ids, r_mask) = PairEncoder(W, "text", [0]).encode(record)
    assert rows[0] == {"chosen": {"text": c_ids, "mask": c_mask}, "rejected": {"text": r_ids, "mask": r_mask}}


# -- errors ------------------------------------------------------------------------------------------------

GOOD = {"prompt": "p", "chosen": " a", "rejected": " b"}
GOOD_CHAT = {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}

ERRORS = {
    "empty text side": ([GOOD, {**GOOD, "rejected": ""}], {}, 2, "field 'rejected': empty text"),
    "empty chat side": ([GOOD_CHAT, {**GOOD_CHAT, "chosen": []}], {}, 2, "field 'chosen': empty: no messages"),
    "implicit side with no reply": ([{"chosen": [user("q"), assistant("a")], "rejected": [user("q")]}], {}, 1,
                                    "field 'rejected': empty: nothing after the 1 message(s) it shares"),
    "whitespace reply": ([{**GOOD_CHAT, "chosen": [user("q"), assistant("  ")]}], {}, 1,
                         "field 'chosen[1].content': empty text"),
    "identical text": ([GOOD, {**GOOD, "rejected": " a"}], {}, 2, "field 'rejected': identical to 'chosen'"),
    "identical chat": ([{"chosen": [user("q"), assistant("a")], "rejected": [user(" q "), assistant("a\n")]}], {},
                       1, "field 'rejected': identical to 'chosen'"),
    "no shared prompt": ([{"chosen": [user("q"), assistant("a")], "rejected": [user("r"), assistant("b")]}], {},
                         1, "field 'rejected': shares no prompt with 'chosen'"),
    "differ before the last turn": ([{"chosen": [user("q"), assistant("a"), user("u"), assistant("c")],
                                      "rejected": [user("q"), assistant("b"), user("u"), assistant("c")]}], {}, 1,
                                    "field 'chosen[2]': a user turn after chosen and rejected differ"),
    "no assistant in a side": ([{"prompt": [user("q")], "chosen": [user("a")], "rejected": [assistant("b")]}], {},
                               1, "field 'chosen': no assistant message"),
    "missing rejected": ([GOOD, {"prompt": "p", "chosen": " a"}], {}, 2, "field 'rejected': missing"),
    "missing prompt": ([{"chosen": " a", "rejected": " b"}], {}, 1, "field 'prompt': missing"),
    "missing side, forced": ([{"prompt": "p", "chosen": " a"}], {"format": "preference"}, 1,
                             "field 'rejected': missing"),
    "mistyped side": ([{"prompt": "p", "chosen": " a", "rejected": [assistant("b")]}], {}, 1,
                      "field 'rejected': expected a string like 'chosen', got a list"),
    "sft record among pairs": ([GOOD, {"prompt": "p", "completion": " c"}], {}, 2,
                               "a prompt-completion record in a file of preference pairs"),
    "pair among sft records": ([{"prompt": "p", "completion": " c"}, GOOD], {}, 2,
                               "a preference pair (chosen, rejected) in a file of prompt-completion records"),
    "chat pair among text pairs": ([GOOD, GOOD_CHAT], {}, 2, "field 'chosen': a list of messages in a file of text"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_pairs_name_file_line_and_field_and_write_nothing(tmp_path, case):
    records, kw, line, message = ERRORS[case]
    (tmp_path / "out.jsonl").write_text("previous\n")
    with pytest.raises(DataError) as e:
        run(tmp_path, records, **kw)
    assert f"in.jsonl:{line}: " in str(e.value) and message in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]
    assert (tmp_path / "out.jsonl").read_text() == "previous\n"


def test_pairs_and_sft_records_in_separate_files_of_one_run_are_an_error(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": " c"}])
    with pytest.raises(DataError, match=r"sft\.jsonl holds SFT records and .*pairs\.jsonl preference pairs"):
        prepare(PrepareOptions(inputs=[str(pairs), str(sft)], out=str(tmp_path / "out")))


def test_template_errors_name_the_flag(tmp_path):
    with pytest.raises(OptionError, match="--completion-template: with preference pairs, write the completion as"):
        run(tmp_path, [GOOD], format="preference", completion_template=" {chosen}")
    with pytest.raises(OptionError, match="--prompt-template/--completion-template: .* holds chat pairs"):
        run(tmp_path, [GOOD_CHAT], format="preference", prompt_template="{x}")
    with pytest.raises(OptionError, match="--completion-template: required"):
        PrepareOptions(inputs=["x.jsonl"], out="out", prompt_template="{prompt}")


@pytest.mark.parametrize("case", ["identical text", "no shared prompt", "sft record among pairs"])
def test_cli_prints_one_line_naming_file_and_line(tmp_path, capsys, case):
    records, _, line, message = ERRORS[case]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    assert main(["prepare", str(src), "--out", str(tmp_path / "out")]) == 1  # a bad record is a runtime error
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"in.jsonl:{line}: " in err and message in err and "Traceback" not in err


def test_skip_invalid_skips_bad_pairs(tmp_path):
    rows, meta = run(tmp_path, [GOOD, {**GOOD, "rejected": " a"}, {**GOOD, "chosen": " c"}], skip_invalid=True)
    assert len(rows) == 2 and meta["counts"]["skipped"] == 1
