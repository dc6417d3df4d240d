"""What a tuned state costs on general text, measured by EleutherAI's lm-evaluation-harness through
``statetune serve``: the base model (the state swapped out, what a request for the base model gets from the
same server) against E2E states left in place, on the shipped tiny model.

Steps, each skipped when its output is already there (the script resumes):

1. ``statetune prepare`` the E2E data split by MR and ``statetune train`` two states with the demo's recipe
   (LR 30, batch 8): 160 steps (the demo state) and 640 steps, into ``--work``;
2. write three local lm-eval tasks into ``--work/tasks`` (absolute data paths): rolling perplexity on the
   documents of the tiny model's held-out pretraining text (``corpus/val.txt``), a next-sentence cloze built
   from the same text (the true sentence among 4, distractors from other documents, fixed seed) and E2E
   generation on held-out MRs;
3. start ``statetune serve`` with the states and run ``python -m lm_eval`` once per served model;
4. cross-check the harness's bits per byte against ``statetune eval`` on the same tokens.

Prints a table and writes ``benchmarks/results/lm_eval_states.json``."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchio import REPO, write_json  # noqa: E402

PROMPT = "Input: {mr}\n\nResponse:"
STATES = {"demo": 160, "state640": 640}  # served name -> training steps (LR 30, batch 8: the demo's recipe)
PY = sys.executable


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def scrub(obj: object) -> object:
    """``obj`` with this checkout's paths made relative and the interpreter called ``python``: the recorded
    commands then read the same on any machine."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    if isinstance(obj, str):
        obj = re.sub(r"(127\.0\.0\.1:|--port )\d+", r"\1PORT", obj.replace(PY, "python"))
        return re.sub(r"(?<![\w.:/])/[^\s,]+", lambda m: os.path.relpath(m.group(), REPO), obj)
    return obj


def run(cmd: list[str], log: Path | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a") if log else open(os.devnull, "w") as out:
        subprocess.run(cmd, check=True, env=env(), cwd=REPO, stdout=out if log else None, stderr=out if log else None)


def train_states(a: argparse.Namespace) -> dict[str, str]:
    """Prepare E2E (split by MR, the demo's settings) and train the compared states; returns their commands."""
    data = a.work / "data" / "e2e"
    prep = [PY, "-m", "statetune", "prepare", str(a.e2e), "--out", str(data), "--format", "template",
            "--prompt-template", r"Input: {mr}\n\nResponse:", "--completion-template", " {ref}",
            "--val-fraction", "0.15", "--split-by", "mr", "--model", str(a.model), "--threads", str(a.threads)]
    if not Path(f"{data}.val.jsonl").exists():
        run(prep)
    cmds = {"prepare": shlex.join(prep)}
    (a.work / "states").mkdir(parents=True, exist_ok=True)
    for name, steps in STATES.items():
        rundir = a.work / f"run-{steps}"
        cmd = [PY, "-m", "statetune", "train", "--model", str(a.model), "--train-data", f"{data}.jsonl",
               "--val-data", f"{data}.val.jsonl", "--out", str(rundir), "--max-steps", str(steps), "--batch-size",
               "8", "--lr", "30", "--lr-final", "0.3", "--warmup-steps", "10", "--eval-every", str(steps // 3),
               "--save-every", str(steps), "--samples", "0", "--val-batches", "12", "--threads", str(a.threads),
               "--no-progress"]
        cmds[name] = shlex.join(cmd)
        target = a.work / "states" / f"{name}.safetensors"
        if target.exists() or name not in a.models.split(","):
            continue
        if not (rundir / "state-final.safetensors").exists():  # written last: the run has finished
            if any((rundir / "checkpoints").glob("*")):  # stopped (SIGTERM or Ctrl-C saves one): continue it
                run([PY, "-m", "statetune", "train", "--resume", str(rundir), "--threads", str(a.threads),
                     "--no-progress"], a.work / f"train-{steps}.log")
            else:
                shutil.rmtree(rundir, ignore_errors=True)
                run(cmd, a.work / f"train-{steps}.log")
        shutil.copyfile(rundir / "state-best.safetensors", target)
    return cmds


def documents(path: Path) -> list[str]:
    """The corpus's documents (separated by one blank line)."""
    return [d for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def cloze_items(docs: list[str], n: int, seed: int, context_chars: int) -> list[dict]:
    """Next-sentence cloze: a passage's last ``context_chars`` characters, its true next sentence and 3 sentences
    of similar length from other documents, in a seeded order; at most one item per document first."""
    units = []  # (doc, start, text): sentences, or lines when a document has no sentence ends
    for i, d in enumerate(docs):
        for m in re.finditer(r"[^\n]+?(?:[.!?](?=\s|$)|$)", d, flags=re.M):
            text = m.group().strip()
            if 20 <= len(text) <= 200:
                units.append((i, m.start() + m.group().index(text), text))
    rng = random.Random(seed)
    cands = [u for u in units if u[1] >= 40]
    rng.shuffle(cands)
    seen: set[int] = set()
    picked = [u for u in cands if not (u[0] in seen or seen.add(u[0]))]
    chosen = set(picked)
    picked += [u for u in cands if u not in chosen]
    items = []
    for doc, start, text in picked[:n]:
        pool = [u[2] for u in units if u[0] != doc and 0.5 <= len(u[2]) / len(text) <= 2]
        choices = rng.sample(pool, 3) + [text]
        rng.shuffle(choices)
        ctx = docs[doc][:start]
        if len(ctx) > context_chars:  # cut at a space so the passage starts with a whole word
            cut = ctx.find(" ", len(ctx) - context_chars)
            ctx = ctx[cut + 1:] if cut >= 0 else ctx[-context_chars:]
        items.append({"context": ctx, "choices": choices, "answer": choices.index(text)})
    return items


def e2e_heldout(val_jsonl: Path, n: int) -> list[dict]:
    """The first ``n`` held-out MRs of the prepared validation split, each with all its references."""
    from statetune.tokenizer import get_tokenizer

    tok, refs = get_tokenizer("bytes"), {}
    for line in val_jsonl.read_text().splitlines():
        rec = json.loads(line)
        ids = [t for t, m in zip(rec["text"], rec["mask"], strict=True) if not m]
        out = [t for t, m in zip(rec["text"], rec["mask"], strict=True) if m and t != tok.eot_id]
        mr = re.fullmatch(r"Input: (.*)\n\nResponse:", tok.decode(ids), flags=re.S).group(1)
        refs.setdefault(mr, []).append(tok.decode(out).strip())
    return [{"mr": mr, "ref": rs[0], "refs": rs} for mr, rs in list(refs.items())[:n]]


TASK_YAML = {
    "ppl": "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\nmetric_list:\n"
           "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
    "cloze": "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
             "doc_to_target: answer\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "e2e": "output_type: generate_until\ndoc_to_text: "
           + json.dumps(PROMPT.replace("{mr}", "{{mr}}"), allow_nan=False) +
           "\ndoc_to_target: \" {{ref}}\"\ntarget_delimiter: \"\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
           "  max_gen_toks: 96\n  temperature: 0\n  do_sample: false\nmetric_list:\n  - metric: bleu\n"
           "  - metric: chrf\n  - metric: exact_match\n",
}


def write_tasks(a: argparse.Namespace) -> dict[str, int]:
    """The three task YAMLs and their JSONL data under ``--work/tasks``; returns the item counts."""
    folder = a.work / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    docs = documents(a.corpus)
    data = {"ppl": [{"text": d} for d in docs],
            "cloze": cloze_items(docs, a.cloze_items, a.seed, a.context_chars),
            "e2e": e2e_heldout(a.work / "data" / "e2e.val.jsonl", a.e2e_mrs)}
    for key, rows in data.items():
        jsonl = (folder / f"{key}.jsonl").resolve()
        jsonl.write_text("".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows))
        (folder / f"st_{key}.yaml").write_text(
            f"task: st_{key}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {jsonl}\n"
            f"test_split: test\n{TASK_YAML[key]}metadata:\n  version: 1.0\n")
    return {k: len(v) for k, v in data.items()}


@contextmanager
def serve(a: argparse.Namespace):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [PY, "-m", "statetune", "serve", "--model", str(a.model), "--states", str(a.work / "states"),
           "--model-name", "base", "--port", str(port), "--threads", str(a.threads),
           "--max-prompt-tokens", str(a.max_length)]  # the longest document is one prompt
    print("$ " + " ".join(cmd), flush=True)
    log = open(a.work / "serve.log", "a")
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: see {a.work / 'serve.log'}") from None
                time.sleep(0.5)
        yield url, shlex.join(cmd)
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def harness(a: argparse.Namespace, url: str, name: str) -> dict:
    """``lm_eval`` on the three tasks for the served model ``name``: its metrics, samples' BLEU and command."""
    out = a.work / "lm_eval" / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [PY, "-m", "lm_eval", "--model", "local-completions", "--model_args",
           f"base_url={url}/v1/completions,model={name},tokenizer_backend=remote,num_concurrent={a.num_concurrent},"
           f"max_length={a.max_length},max_retries=1", "--batch_size", str(a.batch_size), "--tasks",
           "st_ppl,st_cloze,st_e2e", "--include_path", str(a.work / "tasks"), "--output_path", str(out),
           "--log_samples"]
    t0 = time.perf_counter()
    run(cmd, a.work / f"lm_eval-{name}.log")
    (folder,) = out.iterdir()
    results = json.loads(next(folder.glob("results_*.json")).read_text())["results"]
    metrics = {f"{task}/{k.split(',')[0]}": v for task, r in results.items() for k, v in r.items()
               if "," in k and isinstance(v, float)}
    gen = next(folder.glob("samples_st_e2e_*.jsonl")).read_text().splitlines()
    samples = sorted((json.loads(line) for line in gen), key=lambda s: s["doc_id"])
    from statetune.evaluate.metrics import generation_scores

    scores = generation_scores([s["filtered_resps"][0].strip() for s in samples], [s["doc"]["refs"] for s in samples])
    metrics.update({f"st_e2e/{k}_all_refs": v for k, v in scores.items() if k in ("bleu", "chrf")})
    return {"metrics": metrics, "seconds": round(time.perf_counter() - t0, 1), "command": shlex.join(cmd),
            "examples": [s["filtered_resps"][0] for s in samples[:3]]}


def crosscheck(a: argparse.Namespace, name: str) -> dict:
    """``statetune eval`` on the rolling-perplexity documents as the harness sends them (end-of-text, then the
    document's bytes, every byte scored) with the state ``name`` (or none): its bits per byte."""
    from statetune.tokenizer import get_tokenizer

    tok = get_tokenizer("bytes")
    data = a.work / "crosscheck.jsonl"
    data.write_text("".join(json.dumps({"text": [0] + tok.encode(d), "mask": [0] + [1] * len(tok.encode(d))},
                                       allow_nan=False) + "\n" for d in documents(a.corpus)))
    cmd = [PY, "-m", "statetune", "eval", "--model", str(a.model), "--data", str(data), "--out",
           str(a.work / f"crosscheck-{name}"), "--threads", str(a.threads)]
    cmd += [] if name == "base" else ["--state", str(a.work / "states" / f"{name}.safetensors")]
    if not (a.work / f"crosscheck-{name}.json").exists():
        run(cmd, a.work / "crosscheck.log")
    rows = json.loads((a.work / f"crosscheck-{name}.json").read_text())["rows"]  # the zero state first
    return {"state": name, "bits_per_byte": rows[-1]["loss"] / math.log(2), "command": shlex.join(cmd),
            "base_bits_per_byte": rows[0]["loss"] / math.log(2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "lm_eval_states",
                    help="folder for data, runs, states, tasks and harness outputs (reused when present)")
    ap.add_argument("--model", type=Path, default=REPO / "statetune/assets/tiny-rwkv7/model.pth")
    ap.add_argument("--e2e", type=Path, default=REPO.parent / "shared/data/e2e/devset.csv",
                    help="E2E CSV (columns mr, ref)")
    ap.add_argument("--corpus", type=Path, default=REPO / "corpus/val.txt",
                    help="held-out general text, documents separated by one blank line (scripts/build_corpus.py)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/lm_eval_states.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cloze-items", type=int, default=200)
    ap.add_argument("--context-chars", type=int, default=300, help="longest cloze passage, characters")
    ap.add_argument("--e2e-mrs", type=int, default=32, help="held-out MRs of the generation task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-concurrent", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=12288,
                    help="harness window in tokens: above the longest document, so each is scored whole")
    ap.add_argument("--models", default="base," + ",".join(STATES), help="served models to run, in order")
    ap.add_argument("--crosscheck", default="demo", help="served model whose bits/byte statetune eval recomputes")
    ap.add_argument("--force", action="store_true", help="rerun the harness for models already in --out")
    a = ap.parse_args()
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    res = json.loads(a.out.read_text()) if a.out.exists() else {"runs": {}}
    res["train_commands"] = train_states(a)
    res["items"] = write_tasks(a)
    todo = [m for m in a.models.split(",") if a.force or m not in res["runs"]]
    if todo:
        with serve(a) as (url, serve_cmd):
            res["serve_command"] = serve_cmd
            for name in todo:
                res["runs"][name] = harness(a, url, name)
                write_json(scrub(res), a.out)
    if a.crosscheck and "crosscheck" not in res and a.crosscheck in res["runs"]:
        res["crosscheck"] = crosscheck(a, a.crosscheck)
        res["crosscheck"]["harness_bits_per_byte"] = res["runs"][a.crosscheck]["metrics"]["st_ppl/bits_per_byte"]
        if "base" in res["runs"]:
            res["crosscheck"]["harness_base_bits_per_byte"] = res["runs"]["base"]["metrics"]["st_ppl/bits_per_byte"]
    write_json(scrub(res), a.out)
    keys = sorted({k for r in res["runs"].values() for k in r["metrics"] if not k.endswith("_stderr")})
    names = list(res["runs"])
    print("| metric | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{res['runs'][n]['metrics'].get(k, float('nan')):.4g}" for n in names) + " |")
    if "crosscheck" in res:
        print(f"crosscheck: {res['crosscheck']}")


if __name__ == "__main__":
    main()
