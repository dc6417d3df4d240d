"""Turning the benchmark's results into ``quality_e2e.json``, ``RESULTS.md`` and the validation-curve plot."""

from __future__ import annotations

import statistics
from pathlib import Path

from statetune.fileio import atomic_write

#: Per-run numbers summarised as mean ± std over seeds.
NUMERIC = ("trainable", "stored_bytes", "train_s", "best_val", "test_loss", "bleu", "chrf", "rouge_l",
           "exact_match", "decode_tokens_per_s", "general_loss", "general_loss_with_state")
READING = "## Reading"


def summarise(runs: list[dict], keys: tuple[str, ...] = NUMERIC) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation (0 for one run) and count of every numeric field over runs."""
    out = {}
    for key in keys:
        vals = [r[key] for r in runs if r.get(key) is not None]
        if vals:
            out[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                        "n": len(vals)}
    return out


def _fmt(s: dict | None, key: str, digits: int) -> str:
    if s is None or key not in s:
        return "–"
    m, sd, n = s[key]["mean"], s[key]["std"], s[key]["n"]
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def _size(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def table(results: dict) -> str:
    """The main Markdown table: one row per method (mean ± std over seeds where there are several)."""
    head = ("| method | seeds | LR | trainable params | stored | train time (s) | val loss | test loss | BLEU | chrF "
            "| decode tok/s | general-text loss |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for m in results["methods"].values():
        s = m.get("summary") or {}
        runs = m.get("runs") or []
        if not runs:
            continue
        trainable = int(s["trainable"]["mean"]) if "trainable" in s else 0
        stored = f"{_size(s['stored_bytes']['mean'])} {m['stored_what']}" if m.get("stored_what") else "–"
        lr = f"{m['lr']:g}" if m.get("lr") is not None else "–"
        general = _fmt(s, "general_loss", 3) + (" †" if m.get("state_method") or trainable == 0 else "")
        lines.append(f"| {m['label']} | {len(runs)} | {lr} | {trainable:,} | {stored} | {_fmt(s, 'train_s', 0)} "
                     f"| {_fmt(s, 'best_val', 3)} | {_fmt(s, 'test_loss', 3)} | {_fmt(s, 'bleu', 1)} "
                     f"| {_fmt(s, 'chrf', 1)} | {_fmt(s, 'decode_tokens_per_s', 0)} | {general} |")
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    """Best validation loss (seed 0) per method and learning rate; the chosen LR in bold."""
    lines = ["| method | LR → best validation loss (seed 0) | chosen |", "|---|---|---|"]
    for name, sw in results.get("sweep", {}).items():
        cells = ", ".join(("**" if e["lr"] == sw.get("chosen") else "") + f"{e['lr']:g}: {e['best_val']:.4f}"
                          + ("**" if e["lr"] == sw.get("chosen") else "") for e in sw["runs"])
        lines.append(f"| {results['methods'][name]['label']} | {cells} | {sw.get('chosen', '–')} |")
    return "\n".join(lines)


def ablation_table(results: dict) -> str:
    rows = results.get("ablation") or []
    if not rows:
        return ""
    lines = ["| run | batch x steps | LR | best val loss | test loss | BLEU |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['batch_size']} x {r['steps']} | {r['lr']:g} | {r['best_val']:.4f} "
                     f"| {r['test_loss']:.4f} | {r['bleu']:.1f} |")
    return "\n".join(lines)


def markdown(results: dict, curves_rel: str) -> str:
    """The whole RESULTS.md body (without the hand-written reading, which ``write_report`` keeps)."""
    c, d, b, mach = results["config"], results["data"], results["budget"], results["machine"]
    status = "complete" if results.get("complete") else (
        "**PARTIAL: not every planned run finished** (" + results.get("stopped", "still running, or stopped")
        + "; the table shows what finished)")
    parts = [
        "# State-tuning quality benchmark (E2E, shipped tiny model)", "",
        f"Status: {status}. Written by `benchmarks/quality_e2e.py`; raw numbers, every seed, the LR sweep and "
        f"sample outputs are in `{c['json_rel']}`.", "",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}; total wall time {results.get('elapsed_s', 0) / 60:.1f} min",
        f"- machine: {mach['cpu']}, {mach['threads']} torch threads (one run on a machine that may be shared: "
        f"times and tokens/s are indicative), torch {mach['torch']}, peft {mach['peft']}",
        f"- model: `{c['model_rel']}`: {results['model']['summary']}",
        f"- data: `{c['data_rel']}` split by meaning representation ({d['split_rule']}): "
        + ", ".join(f"{k} {v['mrs']} MRs / {v['rows']} rows" for k, v in d["split"].items())
        + f"; validation uses {d['counts']['val_rows_used']} rows, test loss {d['counts']['test_rows_used']} "
        f"rows (at most {c['test_refs']} references per test MR), BLEU/chrF {d['counts']['test_prompts']} test MRs "
        "against all their references (greedy, stop at newline or end of text).",
        f"- budget, equal for every trained method: {b['steps']} steps x batch {b['batch_size']} "
        f"(the same batches in the same order), warmup {b['warmup']}, cosine to LR/100, AdamW, clip 1.0, "
        f"validation every {b['eval_every']} steps keeping the best; planned seeds: state methods "
        f"{results['config']['seeds']}, LoRA and full fine-tuning {results['config']['weight_seeds']} (the seeds "
        "column shows how many finished; mean ± sample std over them).",
        f"- prompts: zero-shot is `Input: {{mr}}\\n\\nResponse:`; few-shot puts {c['shots']} training examples "
        "before it (the same for every test input, so it is exactly the base model started from that prompt's "
        "state; the prompt-initialised state starts from the same state).", "",
        table(results), "",
        "Losses are nats per completion byte (masked: only the response and its end-of-text token count). "
        "val loss is the best validation loss during training (the checkpoint that is then tested); train "
        "time counts the optimizer steps only (validation excluded), on the shared CPU. "
        "† general-text loss (the first bytes of `corpus/val.txt`, the tiny model's held-out pretraining "
        "text, in independent windows): for prompting and state methods the weights are untouched, so this is "
        "the base model from the zero state, the same number for all of them; LoRA and full fine-tuning are "
        "measured with their tuned weights. `general_loss_with_state` in the JSON shows the text read from the "
        "tuned state instead (what happens if the state is not swapped out). Decode tok/s: batch 1, greedy, "
        "best of 3; LoRA is measured unmerged (peft layers), merged it decodes at the base model's speed. "
        "Stored sizes are fp32 files; the encoders' files hold the plain state, like direct tuning.", "",
        "## Learning-rate sweep", "", sweep_table(results), "",
    ]
    if results.get("ablation"):
        parts += ["## Batch-size ablation (state, direct; equal tokens seen)", "", ablation_table(results), ""]
    parts += [f"![validation curves]({curves_rel})", "",
              "## What a small byte-level model can and cannot show", "",
              "The model is a few-million-parameter RWKV-7 trained for about an hour on a CPU, reading bytes. "
              "It can show relative differences between tuning methods on the same model and data under an "
              "equal budget: which converges faster, which generalises to unseen meaning representations, what "
              "each costs to store and run. It cannot show absolute quality (BLEU here is far below published "
              "E2E systems, which use large pretrained word-piece models), how the ranking changes with model "
              "scale (state capacity grows with width and depth, and the original findings came from much larger "
              "pretrained models), or anything about long contexts. With a handful of seeds and a few dozen test "
              "MRs, differences smaller than the reported standard deviations are noise"
              + ("; LoRA and full fine-tuning have fewer seeds than the state methods."
                 if len(results["config"]["weight_seeds"]) < len(results["config"]["seeds"]) else "."), ""]
    return "\n".join(parts)


def write_report(results: dict, path: Path, curves_rel: str) -> None:
    """Write the report, keeping an existing hand-written ``## Reading`` section at its end."""
    reading = ""
    if path.exists():
        old = path.read_text()
        if READING in old:
            reading = old[old.index(READING):]
    text = markdown(results, curves_rel) + ("\n" + reading if reading else "")
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def plot_curves(results: dict, path: Path) -> None:
    """Validation loss against step: state methods (mean over seeds, band = min..max), LoRA and full
    fine-tuning dashed for reference, the zero-shot baseline dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m in results["methods"].values():
        curves = [r["curve"] for r in m.get("runs", []) if r.get("curve")]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = [p[0] for p in curves[0][:n]]
        vals = [[c[i][1] for c in curves] for i in range(n)]
        mean = [statistics.fmean(v) for v in vals]
        style = "-" if m.get("state_method") else "--"
        (line,) = ax.plot(steps, mean, style, marker="o", ms=3, label=f"{m['label']} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.15)
    zero = results.get("base_val")
    if zero is not None:
        ax.axhline(zero, color="grey", ls=":", label="base model, zero state")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title("E2E validation loss (best LR per method)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
