"""The learning curves' report: a Markdown section (table by budget, LR finder against the sweep) and two
plots (test loss against budget, and against trainable parameters), all from the merged results file."""

from __future__ import annotations

import os
from pathlib import Path

from statetune.fileio import atomic_write

from . import methods, points, report

BEGIN, END = "<!-- quality_curves: begin -->", "<!-- quality_curves: end -->"
BASELINES = {"zero_shot": "base model, zero-shot", "few_shot": "base model, few-shot"}


def label(method: str) -> str:
    return BASELINES.get(method) or methods.get(method)[1]


def _fmt(s: dict, key: str, digits: int) -> str:
    if key not in s:
        return "–"
    m, sd, n = s[key]["mean"], s[key]["std"], s[key]["n"]
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def table(results: dict) -> str:
    """One row per (method, budget): chosen LR, seeds, validation and test loss, BLEU, chrF."""
    lines = ["| method | budget (steps) | LR (swept) | seeds | trainable | val loss | test loss | BLEU | chrF |",
             "|---|---:|---|---:|---:|---|---|---|---|"]
    for name, b in results.get("baselines", {}).items():
        lines.append(f"| {label(name)} | 0 | – | – | 0 | {b['best_val']:.3f} | {b['test_loss']:.3f} "
                     f"| {b['bleu']:.1f} | {b['chrf']:.1f} |")
    for row in points.curve_rows(results):
        s = row["summary"]
        swept = ", ".join(f"{x:g}" for x in row["swept"])
        trainable = f"{int(s['trainable']['mean']):,}" if "trainable" in s else "–"
        lines.append(f"| {label(row['method'])} | {row['budget']} | {row['lr']:g} ({swept}) | {row['seeds']} "
                     f"| {trainable} | {_fmt(s, 'best_val', 3)} | {_fmt(s, 'test_loss', 3)} "
                     f"| {_fmt(s, 'bleu', 1)} | {_fmt(s, 'chrf', 1)} |")
    return "\n".join(lines)


def improvements_table(results: dict) -> str:
    """At the largest budget: every state method (variants included) at its chosen rate, and, where the
    points have a ``--scale-sweep``, the same states times the factor validation picked (mean ± std)."""
    rows = [r for r in points.curve_rows(results) if methods.known(r["method"]) and methods.get(r["method"])[2]]
    if not rows:
        return ""
    top = max(r["budget"] for r in rows)
    lines = [f"At {top} steps; each row at its method's chosen LR, mean ± std over its seeds.", "",
             "| state method | LR | seeds | val loss | test loss | BLEU | chrF |", "|---|---:|---:|---|---|---|---|"]
    for r in (r for r in rows if r["budget"] == top):
        s = r["summary"]
        lines.append(f"| {label(r['method'])} | {r['lr']:g} | {r['seeds']} | {_fmt(s, 'best_val', 3)} "
                     f"| {_fmt(s, 'test_loss', 3)} | {_fmt(s, 'bleu', 1)} | {_fmt(s, 'chrf', 1)} |")
        runs = [p for p in points.at(results, r["method"], top) if p["lr"] == r["lr"] and p.get("scale")]
        if runs:
            scaled = [{**p, **{k: p["scale"][k] for k in ("test_loss", "bleu", "chrf") if k in p["scale"]},
                       "best_val": min(v for _, v in p["scale"]["val"])} for p in runs]
            ss = report.summarise(scaled, ("best_val", "test_loss", "bleu", "chrf"))
            picked = ", ".join(f"{p['scale']['best']:g}" for p in runs)
            lines.append(f"| ... times the best --state-scale on validation ({picked}) | {r['lr']:g} | {len(runs)} "
                         f"| {_fmt(ss, 'best_val', 3)} | {_fmt(ss, 'test_loss', 3)} | {_fmt(ss, 'bleu', 1)} "
                         f"| {_fmt(ss, 'chrf', 1)} |")
    return "\n".join(lines)


def scale_table(results: dict) -> str:
    """Validation loss against the factor, for every point with a ``--scale-sweep`` (mean over seeds)."""
    sweeps: dict[tuple[str, int], list[list]] = {}
    for p in results.get("points", []):
        if p.get("scale"):
            sweeps.setdefault((p["method"], p["budget"]), []).append(p["scale"]["val"])
    if not sweeps:
        return ""
    factors = sorted({a for runs in sweeps.values() for run in runs for a, _ in run})
    lines = ["| state method | budget | seeds | " + " | ".join(f"x{a:g}" for a in factors) + " |",
             "|---|---:|---:|" + "---:|" * len(factors)]
    for (method, budget), runs in sorted(sweeps.items(), key=lambda kv: (methods.order(kv[0][0]), kv[0][1])):
        cells = []
        for a in factors:
            vals = [v for run in runs for x, v in run if x == a]
            cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "–")
        lines.append(f"| {label(method)} | {budget} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finder_table(results: dict) -> str:
    """The LR finder's pick against the sweep's best fixed rate at the same budget (seed 0)."""
    rows = results.get("finder") or []
    if not rows:
        return ""
    lines = ["| method | budget | finder's pick | search (s) | test loss at pick | sweep's LR | test loss at it |",
             "|---|---:|---:|---:|---|---:|---|"]
    for f in rows:
        sweep = {p["lr"]: p for p in points.sweep_runs(results, f["method"], f["budget"]) if p.get("scored")}
        own = {p["lr"]: p for p in points.at(results, f["method"], f["budget"])
               if p["seed"] == 0 and p.get("scored") and not points.is_sweep(p)}
        pick = own.get(f["pick"]) or sweep.get(f["pick"], {})  # the finder's own run, else the sweep's
        lr = points.chosen_lr(results, f["method"], f["budget"])
        best = sweep.get(lr, {}) if lr is not None else {}
        lines.append(f"| {label(f['method'])} | {f['budget']} | {f['pick']:g} | {f['search_s']:.0f} "
                     f"| {pick.get('test_loss', float('nan')):.3f} | {best.get('lr', float('nan')):g} "
                     f"| {best.get('test_loss', float('nan')):.3f} |")
    return "\n".join(lines)


def section(results: dict, report: Path, plots: tuple[Path, Path]) -> str:
    inv = results.get("invocations", [])
    commands = "\n".join(f"  - `{i['command']}` ({i['date']}, {i.get('elapsed_s', 0) / 60:.1f} min, "
                         f"{i['threads']} thread(s){'' if i.get('complete') else ', stopped early'})" for i in inv)
    rel = [os.path.relpath(p, report.parent) for p in plots]
    s = results.get("setup", {})
    parts = [BEGIN, "## Learning curves: every method at several budgets", "",
             "Written by `benchmarks/quality_e2e.py --budgets ...` from the merged results of these invocations "
             "(each point keyed by method, budget, LR, seed and whether the sweep or the LR finder ran it; "
             "a point run again replaces the old one):",
             commands, "",
             f"Budgets are optimizer steps of batch {s.get('batch_size')}; each budget is its own run with warmup "
             "steps/6, cosine to LR/100 and validation every steps/5 steps (best kept). The LR is chosen per "
             "(method, budget) by seed 0's validation loss; the further seeds run at that rate. Mean ± sample "
             "std over the scored seeds at the chosen rate.", "", table(results), ""]
    finder = finder_table(results)
    if finder:
        parts += ["### LR finder against the best fixed rate", "", finder, ""]
    better = improvements_table(results)
    if better:
        parts += ["### State methods and zero-inference-cost variants at the largest budget", "", better, ""]
    scales = scale_table(results)
    if scales:
        parts += ["### Validation loss of a trained state times a factor (`--state-scale`)", "", scales, ""]
    parts += [f"![test loss against budget]({rel[0]})", "", f"![test loss against trainable parameters]({rel[1]})",
              END]
    return "\n".join(parts)


def write_section(path: Path, body: str, begin: str = BEGIN, end: str = END) -> None:
    """Put ``body`` (which starts with ``begin`` and ends with ``end``) in place of the section between those
    markers in ``path``, or append it at the end the first time; the file is replaced atomically."""
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + body + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def plots(results: dict, by_budget: Path, by_params: Path) -> None:
    """Test loss against budget (log x) for every method, and at each budget against trainable parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = points.curve_rows(results)
    names = sorted({r["method"] for r in rows}, key=methods.order)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        rs = sorted((r for r in rows if r["method"] == name and "test_loss" in r["summary"]),
                    key=lambda r: r["budget"])
        if rs:
            ax.errorbar([r["budget"] for r in rs], [r["summary"]["test_loss"]["mean"] for r in rs],
                        yerr=[r["summary"]["test_loss"]["std"] for r in rs], marker="o", capsize=3,
                        ls="-" if methods.get(name)[2] else "--", label=label(name))
    for name, b in results.get("baselines", {}).items():
        ax.axhline(b["test_loss"], ls=":", color="grey" if name == "zero_shot" else "black", label=label(name))
    ax.set_xscale("log")
    ax.set_xlabel("budget (optimizer steps)")
    ax.set_ylabel("test loss (nats / byte)")
    ax.set_title("E2E test loss by budget (best LR per method and budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, by_budget)

    fig, ax = plt.subplots(figsize=(8, 5))
    budgets = sorted({r["budget"] for r in rows})
    for i, budget in enumerate(budgets):
        rs = [r for r in rows if r["budget"] == budget and "test_loss" in r["summary"] and "trainable" in r["summary"]]
        ax.scatter([r["summary"]["trainable"]["mean"] for r in rs], [r["summary"]["test_loss"]["mean"] for r in rs],
                   marker="os^vD"[i % 5], label=f"{budget} steps")
        for r in rs if budget == max(budgets) else []:
            ax.annotate(r["method"], (r["summary"]["trainable"]["mean"], r["summary"]["test_loss"]["mean"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test loss (nats / byte)")
    ax.set_title("E2E test loss against trainable parameters")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _save(fig, by_params)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def render(results: dict, args) -> None:
    """Rewrite both plots and the report section from the merged results."""
    plots(results, args.curves_by_budget, args.curves_by_params)
    write_section(args.curves_report, section(results, args.curves_report,
                                              (args.curves_by_budget, args.curves_by_params)))
