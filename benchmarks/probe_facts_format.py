"""Facts vs format: what a tuned state learns, against LoRA and full fine-tuning at equal budgets.

(a) Facts: invented restaurants (cuisine, district, chef) trained as Q/A, tested with paraphrased questions
    (exact-match recall; also recall on the training questions, i.e. memorised vs generalised).
(b) Format: E2E meaning representation → one line of JSON in a fixed layout (share that parses, that
    follows the layout, and of fields right), on MRs never seen in training (split by MR).
(c) Mixing: the average (0.5 / 0.5, the same sum as ``statetune state average``) of the format state and
    a state tuned on E2E descriptions: does it do both (format scores and BLEU/chrF on the same test MRs)?

Every method sees the same batches, steps, schedule and validation (``quality/methods.py``); the LR per
method is fixed (``--lr METHOD=LR`` to change it), not swept. Prints a table, writes
``benchmarks/results/probe_facts_format[_quick].json`` and a section of ``benchmarks/RESULTS.md`` (or, with
``--quick`` / another ``--results-dir``, ``RESULTS-DIR/probe_facts_format[_quick].md``).

    python benchmarks/probe_facts_format.py --threads 1            # the full probe
    python benchmarks/probe_facts_format.py --quick --threads 1    # a smoke test (minutes)
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from benchio import REPO, output_paths, print_rows, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe import tasks  # noqa: E402
from quality import methods  # noqa: E402
from quality.curves_report import write_section  # noqa: E402
from quality.split import COMPLETION, PROMPT, read_csv, split_by_mr  # noqa: E402

from statetune.commands.prepare import PrepareOptions, prepare  # noqa: E402
from statetune.data.loader import TokenDataset  # noqa: E402
from statetune.evaluate.generation import greedy_batch  # noqa: E402
from statetune.evaluate.metrics import generation_scores  # noqa: E402
from statetune.model.checkpoint import load_model  # noqa: E402
from statetune.model.state import RWKVState  # noqa: E402
from statetune.objective import dataset_loss  # noqa: E402
from statetune.tokenizer import tokenizer_for_vocab  # noqa: E402

BEGIN, END = "<!-- probe_facts_format: begin -->", "<!-- probe_facts_format: end -->"
LR = {"state_direct": 30.0, "lora": 1e-2, "full": 1e-3}  # the E2E curves' best rates at 160-640 steps
FULL = {"steps": 320, "batch_size": 8, "restaurants": 36, "test_mrs": None, "fact_tokens": 24,
        "format_tokens": 240, "text_tokens": 160}
QUICK = {"steps": 3, "batch_size": 2, "restaurants": 4, "test_mrs": 3, "fact_tokens": 6, "format_tokens": 12,
         "text_tokens": 8}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "statetune/assets/tiny-rwkv7/model.pth")
    ap.add_argument("--data", type=Path, default=REPO / "statetune/assets/e2e/e2e_subset.csv",
                    help="E2E CSV (mr,ref) for the format task and the E2E state")
    ap.add_argument("--quick", action="store_true", help="tiny budgets and sizes: a smoke test")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="state_direct,lora,full", help="comma-separated, from quality/methods.py")
    for k in FULL:
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                        help=f"default {FULL[k]} ({QUICK[k]} with --quick)")
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                    help="learning rate for one method (repeatable; defaults " + ", ".join(
                        f"{k}={v:g}" for k, v in LR.items()) + ")")
    ap.add_argument("--seed", type=int, default=0, help="data order (and LoRA init) seed; the facts are seed 0")
    ap.add_argument("--results-dir", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("--work-dir", type=Path, default=None)
    a = ap.parse_args(argv)
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in a.methods if m not in LR]
    if bad:
        ap.error(f"--methods: unknown {bad} (choose from {', '.join(LR)})")
    a.lrs = dict(LR)
    for item in a.lr:
        name, _, value = item.partition("=")
        try:
            a.lrs[name] = float(value)
        except ValueError:
            ap.error(f"--lr {item}: expected METHOD=LR, e.g. state_direct=3")
        if name not in LR or not a.lrs[name] > 0:
            ap.error(f"--lr {item}: expected METHOD=LR with METHOD in {', '.join(LR)} and LR > 0")
    a.json, a.report = output_paths(a.results_dir, "probe_facts_format", a.quick, a.report)
    return a


def write_data(rows: list[tuple[str, str]], work: Path, name: str, model: Path, prompt: str, completion: str) -> Path:
    """``(input, target)`` rows as a CSV, tokenized by statetune's ``prepare``; the JSONL's path."""
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"{name}.csv"
    with src.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["mr", "ref"])
        w.writerows(rows)
    prepare(PrepareOptions(inputs=[str(src)], out=str(work / name), model=str(model), prompt_template=prompt,
                           completion_template=completion))
    return work / f"{name}.jsonl"


class Probe:
    def __init__(self, a: argparse.Namespace):
        self.a, self.t0 = a, time.perf_counter()
        self.work = a.work_dir or Path(tempfile.mkdtemp(prefix="probe-"))
        self.model = load_model(a.model)
        self.model.requires_grad_(False)
        self.tok = tokenizer_for_vocab(self.model.config.vocab_size)
        self.budget = methods.Budget(a.steps, a.batch_size, eval_every=max(1, a.steps // 5),
                                     warmup=max(1, a.steps // 6))
        n_state = self.model.zero_state(1).wkv.numel()
        self.lora_rank = methods.lora_rank_for(self.model, n_state)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.0f}s] {msg}", flush=True)

    def context(self, name: str, train: Path, val: Path) -> methods.Context:
        base_val = dataset_loss(self.model, TokenDataset(val, self.model.config.vocab_size), None,
                                self.a.batch_size).loss
        return methods.Context(self.a.model, self.model, train, val, "", self.work / name, base_val, base_val,
                               self.lora_rank)

    def generate(self, model, state: RWKVState | None, prompts: list[str], max_tokens: int) -> list[str]:
        ids = [self.tok.encode(p) for p in prompts]
        return greedy_batch(model, self.tok, ids, state, max_tokens, [self.tok.eot_id], ["\n"])

    # -- the tasks -------------------------------------------------------------------------------------
    def facts(self) -> dict:
        a = self.a
        rs = tasks.restaurants(a.restaurants, seed=0)
        train_rows = tasks.fact_rows(rs, tasks.TRAIN_QUESTIONS)
        test_rows = tasks.fact_rows(rs, tasks.TEST_QUESTIONS)
        d = self.work / "facts"
        train = write_data([(q, ans) for q, ans, _ in train_rows], d, "train", a.model, tasks.FACT_PROMPT,
                           tasks.FACT_COMPLETION)
        ctx = self.context("facts", train, train)  # memorisation: validation = the training questions

        def score(model, state):
            out = {}
            for split, rows in (("train_questions", train_rows), ("paraphrases", test_rows)):
                hyps = self.generate(model, state, [tasks.FACT_PROMPT.format(mr=q) for q, _, _ in rows],
                                     a.fact_tokens)
                out[split] = tasks.recall(hyps, rows)
                out[split]["samples"] = [[q, h, ans] for (q, ans, _), h in list(zip(rows, hyps, strict=True))[:3]]
            return out

        res = {"restaurants": len(rs), "facts": len(rs) * len(tasks.ATTRIBUTES), "train_rows": len(train_rows),
               "test_rows": len(test_rows), "majority_recall": tasks.majority_rate(rs),
               "methods": {"base model": {**score(self.model, None), "trainable": 0}}}
        for name in a.methods:
            t = methods.get(name)[0](ctx, self.budget, a.lrs[name], a.seed)
            res["methods"][name] = {**score(t.model, t.state), "trainable": t.trainable, "best_val": t.best_val,
                                    "train_s": t.train_s, "lr": a.lrs[name]}
            self.log(f"facts {name}: paraphrase recall {res['methods'][name]['paraphrases']['recall']:.3f}")
        return res

    def e2e_split(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, list[str]]]]:
        split = split_by_mr(read_csv(self.a.data))
        first = lambda side: [(mr, refs[0]) for mr, refs in side.items()]  # noqa: E731
        test = list(split.test.items())[:self.a.test_mrs]
        return [(mr, r) for mr, refs in split.train.items() for r in refs], first(split.val), test

    def format_and_mix(self) -> tuple[dict, dict]:
        a = self.a
        train_e2e, val_e2e, test = self.e2e_split()
        d = self.work / "format"
        mrs_train = sorted({mr for mr, _ in train_e2e})
        train = write_data([(mr, tasks.to_json(mr)) for mr in mrs_train], d, "train", a.model,
                           tasks.FORMAT_PROMPT, tasks.FORMAT_COMPLETION)
        val = write_data([(mr, tasks.to_json(mr)) for mr, _ in val_e2e], d, "val", a.model, tasks.FORMAT_PROMPT,
                         tasks.FORMAT_COMPLETION)
        ctx = self.context("format", train, val)
        test_mrs = [mr for mr, _ in test]

        def fmt(model, state):
            hyps = self.generate(model, state, [tasks.FORMAT_PROMPT.format(mr=mr) for mr in test_mrs],
                                 a.format_tokens)
            return {**tasks.format_scores(hyps, test_mrs), "samples": hyps[:2]}

        def text(model, state):
            hyps = self.generate(model, state, [PROMPT.format(mr=mr) for mr in test_mrs], a.text_tokens)
            s = generation_scores(hyps, [refs for _, refs in test])
            return {"bleu": s["bleu"], "chrf": s["chrf"], "samples": hyps[:2]}

        res = {"train_mrs": len(mrs_train), "test_mrs": len(test_mrs),
               "methods": {"base model": {**fmt(self.model, None), "trainable": 0}}}
        format_state = None
        for name in a.methods:
            t = methods.get(name)[0](ctx, self.budget, a.lrs[name], a.seed)
            res["methods"][name] = {**fmt(t.model, t.state), "trainable": t.trainable, "best_val": t.best_val,
                                    "train_s": t.train_s, "lr": a.lrs[name]}
            self.log(f"format {name}: layout rate {res['methods'][name]['layout_rate']:.3f}")
            if name == "state_direct":
                format_state = t.state
        mix: dict = {}
        if format_state is not None:
            de = self.work / "e2e"
            train_t = write_data(train_e2e, de, "train", a.model, PROMPT, COMPLETION)
            val_t = write_data(val_e2e, de, "val", a.model, PROMPT, COMPLETION)
            e2e_state = methods.state_direct(self.context("e2e", train_t, val_t), self.budget,
                                             a.lrs["state_direct"], a.seed).state
            avg = RWKVState(*(0.5 * f + 0.5 * e for f, e in zip(format_state.tensors(), e2e_state.tensors(),
                                                                strict=True)))
            for label, state in (("format state", format_state), ("E2E state", e2e_state),
                                 ("average (0.5 / 0.5)", avg), ("base model", None)):
                mix[label] = {"format": fmt(self.model, state), "text": text(self.model, state)}
                self.log(f"mix {label}: layout {mix[label]['format']['layout_rate']:.3f}, "
                         f"BLEU {mix[label]['text']['bleu']:.1f}")
        return res, mix

    def run(self, command: str) -> dict:
        a = self.a
        self.log(f"budget {vars(self.budget)}; methods {a.methods}; LoRA rank {self.lora_rank}")
        facts = self.facts()
        fmt, mix = self.format_and_mix()
        out = {"benchmark": "probe_facts_format", "command": command,
               "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "budget": vars(self.budget), "lrs": {m: a.lrs[m] for m in a.methods},
               "facts": facts, "format": fmt, "mix": mix, "elapsed_s": time.perf_counter() - self.t0}
        write_json(out, a.json, indent=1)
        return out


def markdown(r: dict) -> list[str]:
    f, fm, mix = r["facts"], r["format"], r["mix"]
    lines = ["| method | trainable | fact recall, training questions | fact recall, paraphrases "
             "| JSON parses | follows layout | fields right |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in f["methods"]:
        x, y = f["methods"][name], fm["methods"].get(name, {})
        lines.append(f"| {name} | {x['trainable']:,} | {x['train_questions']['recall']:.3f} "
                     f"| {x['paraphrases']['recall']:.3f} | {y.get('parse_rate', float('nan')):.3f} "
                     f"| {y.get('layout_rate', float('nan')):.3f} | {y.get('field_accuracy', float('nan')):.3f} |")
    lines += ["", f"Guessing each attribute's most common value recalls {f['majority_recall']:.3f}.", ""]
    if mix:
        lines += ["| state | JSON follows layout | fields right | BLEU (descriptions) | chrF |",
                  "|---|---:|---:|---:|---:|"]
        for label, m in mix.items():
            lines.append(f"| {label} | {m['format']['layout_rate']:.3f} | {m['format']['field_accuracy']:.3f} "
                         f"| {m['text']['bleu']:.1f} | {m['text']['chrf']:.1f} |")
    return lines


def report(r: dict, path: Path) -> None:
    b = r["budget"]
    body = [BEGIN, "## Facts vs format: what a state learns", "",
            "Written by `benchmarks/probe_facts_format.py`; raw numbers and samples in the JSON beside the other "
            "results.", "",
            f"- command: `{r['command']}`; {r['date']}, {r['elapsed_s'] / 60:.1f} min, {r['threads']} thread(s)",
            f"- budget, equal for every method and task: {b['steps']} steps x batch {b['batch_size']}, warmup "
            f"{b['warmup']}, cosine to LR/100, validation every {b['eval_every']} (best kept); LRs (fixed, not "
            f"swept): {', '.join(f'{k} {v:g}' for k, v in r['lrs'].items())}",
            f"- facts: {r['facts']['facts']} invented facts about {r['facts']['restaurants']} restaurants, "
            f"{r['facts']['train_rows']} training questions, {r['facts']['test_rows']} paraphrased test questions "
            "(exact match, greedy); format: E2E MR → JSON with all 8 attributes in a fixed order, on "
            f"{r['format']['test_mrs']} test MRs (split by MR); mixing: the format state averaged 0.5 / 0.5 with "
            "a state tuned on E2E descriptions, both scored on the same test MRs", "", *markdown(r), END]
    write_section(path, "\n".join(body), BEGIN, END)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    for flag, p in (("--model", a.model), ("--data", a.data)):
        if not p.is_file():
            raise SystemExit(f"{flag} {p}: file not found")
    words = [os.path.relpath(w, REPO) if os.path.isabs(w) else w for w in argv]
    r = Probe(a).run("python benchmarks/probe_facts_format.py " + shlex.join(words))
    report(r, a.report)
    rows = [(f"facts {m}: recall train / paraphrase", f"{x['train_questions']['recall']:.3f} / "
             f"{x['paraphrases']['recall']:.3f}") for m, x in r["facts"]["methods"].items()]
    rows += [(f"format {m}: parses / layout / fields", f"{x['parse_rate']:.3f} / {x['layout_rate']:.3f} / "
              f"{x['field_accuracy']:.3f}") for m, x in r["format"]["methods"].items()]
    rows += [(f"mix {k}: layout / BLEU", f"{v['format']['layout_rate']:.3f} / {v['text']['bleu']:.1f}")
             for k, v in r["mix"].items()]
    print_rows(rows)
    print(f"wrote {a.json} and {a.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
