"""Faithfulness metrics of ``eval --generate``: E2E slot error rate and distinct outputs, on hand-made examples.

Expected values are worked out by hand from the rule in docs/eval.md (which slots an output names, misses or
contradicts), never by calling the implementation on the same input.
"""

from __future__ import annotations

import json

import pytest
from conftest import write_checkpoint

from statetune.data.loader import TokenDataset
from statetune.errors import DataError
from statetune.evaluate import compare
from statetune.evaluate.faithfulness import check_slot, distinct_outputs, find_mr, parse_mr, slot_errors
from statetune.evaluate.report import markdown_report
from statetune.model.checkpoint import load_model
from statetune.tokenizer import get_tokenizer

MR = ("name[The Punter], eatType[coffee shop], food[English], priceRange[cheap], customer rating[5 out of 5], "
      "area[riverside], familyFriendly[no], near[Café Sicilia]")
FIELDS = {"name": "The Punter", "eatType": "coffee shop", "food": "English", "priceRange": "cheap",
          "customer rating": "5 out of 5", "area": "riverside", "familyFriendly": "no", "near": "Café Sicilia"}
ALL_SAID = ("The Punter is a cheap coffee shop by the river near Café Sicilia. It serves English food, is rated "
            "5 out of 5 and is not family-friendly.")

BASE = [("base", None, "the zero state")]  # compare_states candidates: name, state, source


def test_parse_mr_and_find_it_in_a_prompt():
    assert parse_mr(MR) == FIELDS
    assert find_mr(f"Input: {MR}\n\nResponse:") == FIELDS
    assert find_mr("Q: what?\nA:") == {}
    for bad in ("name[The Punter", "just words", "name[a], b"):
        with pytest.raises(ValueError):
            parse_mr(bad)


def test_an_output_naming_every_value_has_no_slot_error():
    errors = slot_errors([FIELDS], [ALL_SAID])
    assert (errors.slots, errors.missing, errors.wrong, errors.rate) == (8, 0, 0, 0.0)


def test_one_missing_value_is_one_error_in_n():
    without_near = ALL_SAID.replace(" near Café Sicilia", "")
    errors = slot_errors([FIELDS], [without_near])
    assert (errors.missing, errors.wrong) == (1, 0) and errors.rate == pytest.approx(1 / 8)
    assert errors.by_slot["near"] == {"slots": 1, "missing": 1, "wrong": 0}


@pytest.mark.parametrize(("slot", "value", "output", "verdict"), [
    ("familyFriendly", "no", "The Punter is a family friendly pub.", "wrong"),
    ("familyFriendly", "no", "The Punter is not family friendly.", "ok"),
    ("familyFriendly", "no", "Adults only at The Punter.", "ok"),
    ("familyFriendly", "yes", "The Punter isn't kid-friendly.", "wrong"),
    ("familyFriendly", "yes", "The Punter welcomes children.", "ok"),
    ("familyFriendly", "yes", "The Punter is a pub.", "missing"),
    ("priceRange", "cheap", "The Punter's prices are high.", "wrong"),
    ("priceRange", "less than £20", "A cheap meal at The Punter.", "ok"),
    ("priceRange", "more than £30", "The Punter is expensive.", "ok"),
    ("priceRange", "more than £30", "The Punter is inexpensive.", "wrong"),
    ("priceRange", "cheap", "The Punter is not cheap.", "missing"),
    ("priceRange", "cheap", "The Punter isn't very cheap.", "missing"),
    ("customer rating", "high", "The Punter is not highly rated.", "missing"),
    ("priceRange", "£20-25", "Meals cost £20-25 at The Punter.", "ok"),
    ("priceRange", "moderate", "A moderately priced pub.", "ok"),
    ("customer rating", "5 out of 5", "The Punter is highly rated.", "ok"),
    ("customer rating", "high", "It has a customer rating of 1 out of 5.", "wrong"),
    ("customer rating", "average", "Its customer rating is average.", "ok"),
    ("customer rating", "low", "A pub near the station.", "missing"),
    ("area", "city centre", "It is in the city center.", "ok"),
    ("area", "city centre", "It is by the river.", "wrong"),
    ("eatType", "pub", "The Punter is a coffee shop.", "wrong"),
    ("eatType", "coffee shop", "The Punter café.", "ok"),
    ("food", "English", "They serve British food.", "ok"),
    ("food", "Indian", "They serve Italian food.", "wrong"),
    ("name", "The Punter", "the punter is nice", "ok"),
    ("name", "The Punter", "Punters love it", "missing"),
    ("city", "Paris", "A trip to Paris.", "ok"),  # any field: its text
])
def test_slot_verdicts(slot, value, output, verdict):
    assert check_slot(slot, value, output) == verdict


def test_contradictions_and_misses_add_up():
    fields = [{"name": "Aromi", "familyFriendly": "no", "area": "city centre"}, None,
              {"name": "Zizzi", "priceRange": "high"}]
    outputs = ["Aromi is a family friendly place.", "anything", "Zizzi is cheap."]
    errors = slot_errors(fields, outputs)
    # Aromi: name ok, familyFriendly contradicted, area missing; Zizzi: name ok, price contradicted
    assert (errors.inputs, errors.slots, errors.missing, errors.wrong) == (2, 5, 1, 2)
    assert errors.rate == pytest.approx(3 / 5)


def test_distinct_outputs():
    assert distinct_outputs(["a b", "c", "d"], 3) == 1.0
    assert distinct_outputs(["same text"] * 4, 4) == pytest.approx(1 / 4)
    assert distinct_outputs(["same  text", "same text ", "other"], 3) == pytest.approx(2 / 3)


# -- through eval's comparison -----------------------------------------------------------------------------

B = get_tokenizer("bytes")


def tokenized(prompt: str, completion: str, **extra) -> dict:
    p, c = B.encode(prompt), B.encode(completion) + [0]
    return {"text": p + c, "mask": [0] * len(p) + [1] * len(c), **extra}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("faith") / "m.pth", "rwkv7", n_layer=1, n_embd=32,
                            head_size=16, vocab_size=300, dim_ffn=64, seed=1)
    return load_model(str(path))


def test_eval_rows_report_ser_from_each_source_of_fields(tmp_path, tiny_model, monkeypatch):
    """Fields come from a record's ``fields`` map, its ``mr`` string, or the MR in its prompt."""
    records = [tokenized("Input: name[Aromi], area[riverside]\n\nResponse:", " Aromi is by the river."),
               tokenized("Input: name[Aromi], area[riverside]\n\nResponse:", " Aromi, riverside."),
               tokenized("Q: one\nA:", " x", fields={"city": "Paris", "familyFriendly": True}),
               tokenized("Q: two\nA:", " y", mr="name[Zizzi], priceRange[cheap]"),
               tokenized("Q: three\nA:", " z")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    outputs = ["Aromi is in the city centre.", "Paris is family friendly.", "Zizzi is a cheap place.", "hello"]
    monkeypatch.setattr(compare, "greedy_batch", lambda *a, **k: list(outputs))
    result = compare.compare_states(tiny_model, B, TokenDataset(data, 300), BASE, {0}, generate=True,
                                    batch_size=2)
    row = result["rows"][0]
    # Aromi: area contradicted (1 of 2); Paris + familyFriendly yes: both said; Zizzi: both said; no fields: skipped
    counts = {k: row["slot_errors"][k] for k in ("slots", "missing", "wrong", "inputs")}
    assert counts == {"slots": 6, "missing": 0, "wrong": 1, "inputs": 3}
    assert row["slot_errors"]["by_slot"]["area"] == {"slots": 1, "missing": 0, "wrong": 1}
    assert row["slot_error_rate"] == pytest.approx(1 / 6) and row["distinct_outputs"] == 1.0
    md = markdown_report({"model": "m", "data": "d", **result})
    assert "| SER | distinct |" in md and "| 16.7% | 1.00 |" in md


def test_eval_rows_show_a_state_that_ignores_its_input(tmp_path, tiny_model, monkeypatch):
    records = [tokenized(f"Q: {w}\nA:", " a") for w in ("one", "two", "three", "four")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(compare, "greedy_batch", lambda *a, **k: ["the same answer"] * 4)
    result = compare.compare_states(tiny_model, B, TokenDataset(data, 300), BASE, {0}, generate=True)
    row = result["rows"][0]
    assert row["distinct_outputs"] == pytest.approx(1 / 4) and "slot_error_rate" not in row


def test_a_bad_mr_field_names_file_and_line(tmp_path, tiny_model, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(tokenized("Q:", " a")) + "\n" + json.dumps(tokenized("Q:", " b", mr="name[x")) + "\n")
    monkeypatch.setattr(compare, "greedy_batch", lambda *a, **k: ["a"])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'mr': expected slot\[value\]"):
        compare.compare_states(tiny_model, B, TokenDataset(data, 300), BASE, {0}, generate=True)
