"""The printed table of the GPU check: one row per measurement, a part's status where it has no result."""

from __future__ import annotations

import math
from typing import Any


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _step(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return r["status"]
    return (f"{r['tokens_per_s']:.0f} tokens/s  ({r['step_s'] * 1e3:.1f} ms, B={r['batch']} T={r['seq']})"
            f"  peak {fmt(r['peak_gb'], '.2f')} GB")


def kernels(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(f"kernels {r['version']} {r['dtype']} {r['impl']}", r["status"] if r["status"] != "ok" else
             f"output {r['output']:.1e}  final state {r['final_state']:.1e}  d state0 {r['d_state0']:.1e}")
            for r in rows]


def tuning(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(f"state-tuning step {r['shape']} {r['dtype']} {r['impl']}", _step(r)) for r in rows]


def memory(m: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"memory {m['shape']} state vs full fine-tuning", m["status"] if m["status"] != "ok" else
             f"{m['state_tuning_gb']:.2f} GB vs {m['full_finetune_gb']:.2f} GB ({m['ratio']:.1f}x)")]


def cli(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["command"], f"rc {r['rc']}  {r['seconds']:.1f} s  {r['last_line']}") for r in rows]


def bptt_7b(b: dict[str, Any]) -> list[tuple[str, str]]:
    size = f"{b['params'] / 1e9:.2f}B" if b["params"] >= 1e8 else f"{b['params'] / 1e6:.1f}M"
    rows = [(f"{b['shape']} model ({size} params, bf16)",
             f"weights {fmt(b['weights_gb'], '.1f')} GB, built in {b['build_s']:.0f} s")]
    for r in b["rows"]:
        label = f"{b['shape']} full BPTT {b['tokens']} tokens ctx-len {r['ctx_len']}"
        rows.append((label, r["status"] if r["status"] != "ok" else
                     f"{r['step_s']:.2f} s/step  {r['tokens_per_s']:.0f} tokens/s  peak {fmt(r['peak_gb'], '.1f')} GB"))
    return rows


def serve(s: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"serve {s['shape']} {s['clients']} streaming clients",
             f"{s['tokens_per_s']:.0f} tokens/s  TTFT p50 {fmt(s['ttft_p50_s'], '.3f')} s"
             f"  p99 {fmt(s['ttft_p99_s'], '.3f')} s  ({s['requests']} requests, {s['errors']} errors)")]


def peer(name: str, p: dict[str, Any]) -> list[tuple[str, str]]:
    if p["status"] != "ok":
        return [(f"peer {name}", p["status"])]
    c = p["compare"]
    rows = []
    for impl in (k for k in c if isinstance(c[k], dict)):
        d = c[impl]
        rows.append((f"peer {name}: {impl} vs reference (bf16, d state0 from {c['d_state0_from']})",
                     f"output {d['output']['max_rel']:.1e}  final state {d['final_state']['max_rel']:.1e}"
                     f"  d state0 {d['d_state0']['max_rel']:.1e} (max rel)"))
    rows += [(f"peer {name}: step {r['shape']} {r['impl']}", _step(r)) for r in p["steps"]]
    return rows


SECTIONS = {"kernels": kernels, "tuning": tuning, "memory": memory, "cli": cli, "bptt_7b": bptt_7b,
            "serve": serve, "peer_rwkv_peft": lambda p: peer("RWKV-PEFT", p),
            "peer_flashrwkv2": lambda p: peer("FlashRWKV2", p)}


def part_rows(name: str, report: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of one part: its measurements, or its status when it has none."""
    entry = report["parts"][name]
    if entry["status"] != "ok" or name not in SECTIONS:
        return [(f"part {name}", f"{entry['status']} ({entry['seconds']:.0f} s)")]
    return SECTIONS[name](report[name])


def table(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The whole table: the header rows, then every part that ran, in order."""
    rows = [("device", report["device"]), ("torch", report["torch"]), ("fla", report["fla"])]
    for name in report.get("parts", {}):
        rows += part_rows(name, report)
    return rows
