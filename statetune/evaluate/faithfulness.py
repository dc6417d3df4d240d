"""Faithfulness of generations to their input: the E2E slot error rate and the share of distinct outputs.

A record's *fields* are slot → value pairs: an E2E meaning representation (``name[The Punter],
eatType[coffee shop]``) or any ``{"name": "The Punter", ...}`` map. Each slot value of an input is *realized*
by an output, *contradicted* (another value of the slot is said instead) or *missing*, by the heuristic of
the E2E challenge's slot-error scripts (see docs/eval.md for the exact rule):

- ``priceRange``, ``customer rating`` and ``familyFriendly`` are matched by value class through their common
  wordings (``cheap``/``less than £20`` are both *low*; ``5 out of 5`` and ``highly rated`` are both *high*;
  ``not family-friendly`` and ``adults only`` say *no*); a wording of another class is a contradiction;
- any other slot is matched as its value's text, case-insensitive and on word boundaries (``area``,
  ``eatType`` and ``food`` with a few spellings, e.g. ``city center``, ``café``, ``British``); for those with
  a closed set of values (``area``, ``eatType``, ``food``) another value of the set is a contradiction.

``SER = (missing + contradicted) / slots``, over every slot of every input that has fields. Slots the
output adds unasked are not counted, as in the E2E challenge's primary SER.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from statetune.errors import DataError

# -- meaning representations -------------------------------------------------------------------------------

_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*(?:,|$)")
#: In prompt text, an MR item whose slot is one word (or E2E's ``customer rating``).
_MR_IN_TEXT = re.compile(r"(customer rating|[A-Za-z_]\w*)\[([^\[\]\n]*)\]")


def parse_mr(text: str) -> dict[str, str]:
    """``"name[The Punter], food[English]"`` → ``{"name": "The Punter", "food": "English"}``; raises
    ``ValueError`` for text that is not a comma-separated list of ``slot[value]``."""
    out, pos = {}, 0
    text = text.strip()
    while pos < len(text):
        m = _MR_ITEM.match(text, pos)
        if m is None:
            raise ValueError(f"expected slot[value], slot[value], ... at character {pos}: {text[pos:pos + 30]!r}")
        out[m.group(1)] = m.group(2).strip()
        pos = m.end()
    if not out:
        raise ValueError("empty meaning representation")
    return out


def find_mr(text: str) -> dict[str, str]:
    """The ``slot[value]`` items found anywhere in a prompt's text (empty when there are none)."""
    return {slot: value.strip() for slot, value in _MR_IN_TEXT.findall(text)}


def record_fields(path: str | Path) -> dict[tuple[int, ...], dict[str, str]]:
    """Fields of the records of a tokenized JSONL file that carry them (a ``fields`` object or an ``mr``
    string beside ``text``/``mask``), by their prompt's token ids (those before the first loss token)."""
    out: dict[tuple[int, ...], dict[str, str]] = {}
    with Path(path).open("rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if b'"fields"' not in raw and b'"mr"' not in raw:
                continue
            record = json.loads(raw)
            fields = _fields_of(record, f"{path}:{line_no}")
            mask, ids = record.get("mask") or [], record.get("text") or []
            cut = next((j for j, m in enumerate(mask) if m), len(ids))
            if fields is not None:
                out.setdefault(tuple(ids[:cut]), fields)
    return out


def _fields_of(record: Mapping[str, Any], where: str) -> dict[str, str] | None:
    if isinstance(record.get("fields"), dict):
        fields = {}
        for key, value in record["fields"].items():
            if isinstance(value, bool):
                value = "yes" if value else "no"
            if not isinstance(value, str | int | float):
                raise DataError(f"{where}: field 'fields.{key}': expected a string, number or boolean, got "
                                f"{type(value).__name__}")
            fields[key] = str(value)
        return fields
    if "fields" in record:
        raise DataError(f"{where}: field 'fields': expected an object of slot values")
    if isinstance(record.get("mr"), str):
        try:
            return parse_mr(record["mr"])
        except ValueError as e:
            raise DataError(f"{where}: field 'mr': {e}") from None
    return None


# -- realizations ------------------------------------------------------------------------------------------

def _rx(*patterns: str) -> re.Pattern[str]:
    return re.compile("|".join(rf"\b(?:{p})\b" for p in patterns), re.IGNORECASE)


_KIDS = r"kids?|child(?:ren)?|famil(?:y|ies)"
_RATED = r"rat(?:ed|es|ings?)|reviews?|reviewed|standards?|quality"
_LINK = r"(?: (?:is|are|of|as|very|quite|rather|fairly|pretty|generally|usually))*"
#: Value classes of the slots matched by wording, with the texts that say them.
CLASSES: dict[str, dict[str, re.Pattern[str]]] = {
    "price": {
        "low": _rx(r"cheap(?:ly)?", r"inexpensive(?:ly)?", r"low[\s-]+(?:cost|pric(?:e[ds]?|ing))", r"budget",
                   r"affordabl[ey]", r"(?:less than|under|below|lower than) £? ?20",
                   r"pric(?:es?|ed|ing)(?: range)?(?: \w+){0,3} (?:low|cheap)"),
        "mid": _rx(r"moderate(?:ly)?(?:[\s-]+pric(?:e[ds]?|ing))?", r"average[\s-]+pric(?:e[ds]?|ing)",
                   r"reasonabl[ey][\s-]+pric(?:e[ds]?|ing)", r"mid[\s-]+(?:range|pric(?:e[ds]?|ing))",
                   r"£? ?20 ?(?:-|–|to) ?£? ?25",
                   r"pric(?:es?|ed|ing)(?: range)?(?: \w+){0,3} (?:average|reasonable|moderate)"),
        "high": _rx(r"expensive", r"pricey", r"high[\s-]+(?:end|cost|pric(?:e[ds]?|ing))",
                    r"(?:more than|over|above|higher than) £? ?30",
                    r"pric(?:es?|ed|ing)(?: range)?(?: \w+){0,3} high"),
    },
    "rating": {
        "low": _rx(r"(?:1|one)[\s-]+stars?", r"(?:1|one)(?: out)? of (?:5|five)",
                   rf"(?:low|poor|bad)(?:ly)?[\s-]+(?:\w+[\s-]+){{0,2}}?(?:{_RATED})",
                   rf"(?:{_RATED}){_LINK} (?:low|poor|bad|poorly)"),
        "average": _rx(r"(?:3|three)[\s-]+stars?", r"(?:3|three)(?: out)? of (?:5|five)",
                       rf"(?:average|mediocre)(?:ly)?[\s-]+(?:\w+[\s-]+){{0,2}}?(?:{_RATED})",
                       rf"(?:{_RATED}){_LINK} (?:average|mediocre)"),
        "high": _rx(r"(?:5|five)[\s-]+stars?", r"(?:5|five)(?: out)? of (?:5|five)",
                    rf"(?:high|highly|excellent|great|top|well)[\s-]+(?:\w+[\s-]+){{0,2}}?(?:{_RATED})",
                    rf"(?:{_RATED}){_LINK} (?:high|highly|excellent)"),
    },
    "family": {
        # "no" is looked for first: its wordings contain those of "yes" ("not family friendly")
        "no": _rx(rf"(?:not|isn't|is not|non|no)[\s-]+(?:\w+\s+){{0,2}}?(?:{_KIDS})[\s-]*(?:friendly|oriented)",
                  rf"(?:{_KIDS})[\s-]*unfriendly", r"adults?[\s-]+only", r"only for adults",
                  rf"no (?:{_KIDS})", r"adult (?:establishment|venue|place|only)",
                  rf"(?:not|no) (?:\w+ )?(?:suitable|good|ideal|friendly|open|welcoming) (?:for|to) "
                  rf"(?:the )?(?:{_KIDS})", rf"(?:{_KIDS}) (?:are|is)(?: not|n't) (?:welcome|allowed)",
                  rf"(?:does not|doesn't|do not|don't) (?:welcome|allow|cater (?:to|for)) (?:{_KIDS})"),
        "yes": _rx(rf"(?:{_KIDS})[\s-]*(?:friendly|oriented)", rf"(?:suitable|good|great|ideal|perfect|friendly|open"
                   rf"|welcoming) (?:for|to) (?:the )?(?:whole )?(?:{_KIDS})",
                   rf"(?:welcomes?|allows?|caters? (?:to|for)) (?:{_KIDS})",
                   rf"(?:{_KIDS}) (?:are|is) (?:welcome|allowed)"),
    },
}
#: The class of each E2E value of those slots.
VALUE_CLASS = {
    "price": {"cheap": "low", "less than £20": "low", "low": "low", "moderate": "mid", "£20-25": "mid",
              "average": "mid", "high": "high", "more than £30": "high", "expensive": "high"},
    "rating": {"low": "low", "1 out of 5": "low", "average": "average", "3 out of 5": "average", "high": "high",
               "5 out of 5": "high"},
    "family": {"yes": "yes", "true": "yes", "no": "no", "false": "no"},
}
#: Closed value sets of text-matched slots (another value of the set contradicts), and other spellings.
CLOSED = {"area": ["city centre", "riverside"], "eattype": ["coffee shop", "pub", "restaurant"],
          "food": ["chinese", "english", "fast food", "french", "indian", "italian", "japanese"]}
ALIASES = {"city centre": [r"city cent(?:re|er)", r"cent(?:re|er) of (?:the )?(?:city|town)", r"town cent(?:re|er)"],
           "riverside": [r"river[\s-]?side", r"(?:by|near|on|off|along|beside|close to|next to) the river"],
           "coffee shop": [r"coffee[\s-]*shop", r"caf[eé]"], "english": ["english", "british"],
           "fast food": [r"fast[\s-]*food"]}
_NEGATED = re.compile(r"(?:\bnot|n't|\bnever|\bno)\s+(?:\w+\s+)?$", re.IGNORECASE)


def slot_kind(slot: str) -> str:
    """``price``, ``rating``, ``family``, or the slot's name lower-cased without spaces and underscores."""
    key = re.sub(r"[\s_]", "", slot).lower()
    return {"pricerange": "price", "customerrating": "rating", "rating": "rating",
            "familyfriendly": "family"}.get(key, key)


def _said(patterns: dict[str, re.Pattern[str]], output: str, negations: bool) -> list[str]:
    """Classes whose wordings occur in ``output`` (a wording right after a negation does not count)."""
    found = []
    for cls, rx in patterns.items():
        if any(not (negations and _NEGATED.search(output[:m.start()])) for m in rx.finditer(output)):
            found.append(cls)
            if not negations:  # family: the first class that matches wins ("no" before "yes")
                break
    return found


def _text_rx(value: str) -> re.Pattern[str]:
    spellings = ALIASES.get(value.lower(), []) + [r"[\s-]+".join(map(re.escape, value.split()))]
    return re.compile("|".join(rf"(?<!\w)(?:{s})(?!\w)" for s in spellings), re.IGNORECASE)


def check_slot(slot: str, value: str, output: str) -> str:
    """``"ok"``, ``"wrong"`` (another value of the slot is said) or ``"missing"`` for one slot value."""
    kind = slot_kind(slot)
    cls = VALUE_CLASS.get(kind, {}).get(value.strip().lower())
    if cls is not None:
        said = _said(CLASSES[kind], output, negations=kind != "family")
        return "ok" if cls in said else ("wrong" if said else "missing")
    if _text_rx(value).search(output):
        return "ok"
    others = [v for v in CLOSED.get(kind, []) if v != value.strip().lower()]
    return "wrong" if any(_text_rx(v).search(output) for v in others) else "missing"


@dataclass
class SlotErrors:
    """Slot counts over a set of outputs; ``rate`` is the slot error rate, (missing + wrong) / slots."""

    slots: int = 0
    missing: int = 0
    wrong: int = 0
    inputs: int = 0
    by_slot: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return (self.missing + self.wrong) / self.slots if self.slots else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"slots": self.slots, "missing": self.missing, "wrong": self.wrong, "inputs": self.inputs,
                "by_slot": self.by_slot}


def slot_errors(fields: Sequence[Mapping[str, str] | None], outputs: Sequence[str]) -> SlotErrors:
    """Count every slot of every input with fields (None: no fields) against its output."""
    out = SlotErrors()
    for slots, text in zip(fields, outputs, strict=True):
        if not slots:
            continue
        out.inputs += 1
        for slot, value in slots.items():
            verdict = check_slot(slot, value, text)
            out.slots += 1
            out.missing += verdict == "missing"
            out.wrong += verdict == "wrong"
            counts = out.by_slot.setdefault(slot, {"slots": 0, "missing": 0, "wrong": 0})
            counts["slots"] += 1
            if verdict != "ok":
                counts[verdict] += 1
    return out


def distinct_outputs(outputs: Iterable[str], inputs: int) -> float:
    """Distinct outputs (whitespace-collapsed, case kept) over distinct inputs: 1 when every input gets its
    own text, ``1/inputs`` when a state says the same thing whatever it reads."""
    return len({" ".join(o.split()) for o in outputs}) / inputs if inputs else 0.0
