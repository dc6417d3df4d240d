"""The two probe tasks and their scores: invented facts (recall) and a fixed JSON layout (format).

Facts: a seeded generator invents restaurants (names made of invented syllables, so no pretrained model can
know them) with a cuisine, a district and a chef. Training asks about every fact with two question
templates; the test asks the same facts with two other, paraphrased templates, and counts exact matches.
Format: an E2E meaning representation is rewritten as one line of JSON with every E2E attribute in a fixed
order (``null`` when the MR lacks it); the score is the share of outputs that parse and follow the layout,
and the share of fields that hold the MR's value.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

CUISINES = ("Italian", "Japanese", "Mexican", "Indian", "French", "Greek", "Thai", "Turkish")
DISTRICTS = ("Harrowgate", "Eastmere", "Pellow Cross", "Brindle Hill", "Saltmarsh", "Quayside North")
CHEFS = ("Ilsa", "Tomas", "Oren", "Marit", "Daku", "Severin", "Noor", "Pablo", "Yuki", "Anouk")
SYLLABLES = ("ka", "lo", "mir", "ven", "tas", "or", "bel", "dru", "sen", "qui", "fa", "rho", "zan", "tuv")
KINDS = ("Kitchen", "Table", "Grill", "House", "Room", "Bistro")
ATTRIBUTES = {"cuisine": CUISINES, "district": DISTRICTS, "chef": CHEFS}
#: Questions seen in training (two per attribute) and the paraphrases only the test asks.
TRAIN_QUESTIONS = {
    "cuisine": ("What food does {name} serve?", "What kind of cuisine is served at {name}?"),
    "district": ("Where is {name}?", "In which district is {name} located?"),
    "chef": ("Who is the chef at {name}?", "Who cooks at {name}?"),
}
TEST_QUESTIONS = {
    "cuisine": ("If I eat at {name}, which cuisine will I get?", "{name} is known for which kind of food?"),
    "district": ("Which part of town would I go to for {name}?", "{name} can be found in which district?"),
    "chef": ("Whose cooking is on the menu at {name}?", "{name} has which chef in its kitchen?"),
}
FACT_PROMPT = "Question: {mr}\nAnswer:"
FACT_COMPLETION = " {ref}"
FORMAT_PROMPT = "Input: {mr}\n\nJSON:"
FORMAT_COMPLETION = " {ref}"
#: The fixed JSON layout: every E2E attribute, in this order.
LAYOUT = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")


@dataclass
class Restaurant:
    name: str
    cuisine: str
    district: str
    chef: str


def restaurants(n: int, seed: int = 0) -> list[Restaurant]:
    """``n`` invented restaurants with distinct names; attributes drawn uniformly (seeded)."""
    rng = random.Random(seed)
    names: set[str] = set()
    out = []
    while len(out) < n:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        name = f"{word} {rng.choice(KINDS)}"
        if name in names:
            continue
        names.add(name)
        out.append(Restaurant(name, rng.choice(CUISINES), rng.choice(DISTRICTS), rng.choice(CHEFS)))
    return out


def fact_rows(rs: list[Restaurant], questions: dict[str, tuple[str, ...]]) -> list[tuple[str, str, str]]:
    """``(question, answer, attribute)`` for every restaurant, attribute and template in ``questions``."""
    return [(q.format(name=r.name), getattr(r, attr), attr)
            for r in rs for attr, qs in questions.items() for q in qs]


def normalise(text: str) -> str:
    """An answer as compared: first line, lower case, surrounding spaces and a final full stop removed."""
    return text.strip().split("\n")[0].strip().rstrip(".").strip().lower()


def recall(hyps: list[str], rows: list[tuple[str, str, str]]) -> dict[str, float]:
    """Exact-match recall overall and per attribute."""
    hits = [normalise(h) == normalise(a) for h, (_, a, _) in zip(hyps, rows, strict=True)]
    out = {"recall": sum(hits) / max(len(hits), 1)}
    for attr in ATTRIBUTES:
        mine = [h for h, (_, _, at) in zip(hits, rows, strict=True) if at == attr]
        if mine:
            out[f"recall_{attr}"] = sum(mine) / len(mine)
    return out


def majority_rate(rs: list[Restaurant]) -> float:
    """Recall of always answering each attribute's most common value: what guessing the prior scores."""
    total = 0.0
    for attr in ATTRIBUTES:
        values = [getattr(r, attr) for r in rs]
        total += max(values.count(v) for v in set(values)) / len(values)
    return total / len(ATTRIBUTES)


# -- format ---------------------------------------------------------------------------------------------------

_PAIR = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*")


def parse_mr(mr: str) -> dict[str, str]:
    """``name[The Eagle], food[French]`` → ``{"name": "The Eagle", "food": "French"}``."""
    return {m.group(1): m.group(2).strip() for m in _PAIR.finditer(mr)}


def to_json(mr: str) -> str:
    """The target: the MR's values in the fixed layout, one line."""
    fields = parse_mr(mr)
    return json.dumps({k: fields.get(k) for k in LAYOUT}, ensure_ascii=False, allow_nan=False)


def format_scores(hyps: list[str], mrs: list[str]) -> dict[str, float]:
    """Share of outputs that parse as JSON, that follow the layout (an object with exactly the layout's keys
    in order), and of layout fields holding the MR's value (over all outputs: a broken one scores 0)."""
    parsed = layout = 0
    fields_ok = 0
    for hyp, mr in zip(hyps, mrs, strict=True):
        try:
            obj = json.loads(hyp.strip())
        except json.JSONDecodeError:
            continue
        parsed += 1
        if isinstance(obj, dict) and tuple(obj) == LAYOUT:
            layout += 1
            want = parse_mr(mr)
            fields_ok += sum(obj[k] == want.get(k) for k in LAYOUT)
    n = max(len(hyps), 1)
    return {"parse_rate": parsed / n, "layout_rate": layout / n, "field_accuracy": fields_ok / (n * len(LAYOUT))}
