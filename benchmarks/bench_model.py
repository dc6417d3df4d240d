"""Model-level speed on CPU: a state-tuning step, prefill and decode, against the rwkv package.

Uses a random checkpoint with the shapes of the released RWKV-7 0.1B (12 layers, width 768, head size 64,
vocab 65,536, low-rank widths 64/64/32/128). Prints a table and writes JSON; every number comes from one
run, so ratios are meaningful even on a noisy machine.

    python benchmarks/bench_model.py --threads 2 --out benchmarks/results/model.json
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchio import print_rows, write_json

from statetune.model.checkpoint import load_model
from statetune.model.random_init import random_checkpoint
from statetune.objective import masked_lm_loss

SHAPE = dict(n_layer=12, n_embd=768, head_size=64, vocab_size=65536, dim_ffn=3072,
             lora={"w": 64, "a": 64, "v": 32, "g": 128})


def timed(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(repeats: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048 ** 3 / timed(lambda: a @ b, repeats) / 1e9


def forward_flops(cfg, tokens: int, logit_rows: int) -> float:
    """Forward FLOPs of ``tokens`` tokens through every layer (matmuls + WKV) and ``logit_rows`` output rows,
    counted from the shapes."""
    C, F, N = cfg.n_embd, cfg.dim_ffn, cfg.head_size
    per_token_layer = 2 * (4 * C * C + 2 * C * F + 2 * C * sum(cfg.lora.values())) + 2 * 4 * C * N
    return tokens * cfg.n_layer * per_token_layer + 2 * logit_rows * C * cfg.vocab_size


def step_flops(cfg, T: int, B: int, loss_tokens: int) -> float:
    """Forward + input-gradient backward FLOPs of one state-tuning step."""
    return 2 * forward_flops(cfg, B * T, loss_tokens)  # backward to the inputs costs about one forward


def tuning_step(model, T: int, B: int):
    tokens = torch.randint(0, model.config.vocab_size, (B, T + 1))
    mask = torch.zeros(B, T + 1, dtype=torch.bool)
    mask[:, T // 2 + 1:] = True  # half of the tokens carry loss
    s0 = model.zero_state(1)
    s0.wkv.requires_grad_(True)

    def run():
        s0.wkv.grad = None
        loss, n, _ = masked_lm_loss(model, tokens, mask, s0)
        (loss / n).backward()

    return run, int(mask[:, 1:].sum())


def peak_rss_child(path: str, mode: str, T: int, B: int) -> float:
    """Peak memory (MB) of one training step in a fresh process: state tuning or full fine-tuning."""
    code = f"""
import resource, torch
from statetune.model.checkpoint import load_model
from statetune.objective import masked_lm_loss
m = load_model({path!r})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens = torch.randint(0, m.config.vocab_size, ({B}, {T} + 1)); mask = torch.ones_like(tokens, dtype=torch.bool)
s0 = m.zero_state(1)
if {mode!r} == "full":
    m.requires_grad_(True)
else:
    s0.wkv.requires_grad_(True)
loss, n, _ = masked_lm_loss(m, tokens, mask, s0)
loss.backward()
if {mode!r} == "full":
    opt = torch.optim.AdamW(m.parameters()); opt.step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, base / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, base = map(float, out.stdout.split())
    return peak


def reference_speed(path: Path, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    """Prefill and decode tokens/s of the rwkv package (``cpu fp32``) on the same checkpoint."""
    os.environ.update(RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
    from rwkv.model import RWKV

    ref = RWKV(str(path)[:-4], "cpu fp32")
    prefill = timed(lambda: ref.forward(prompt, None), 1)
    _, state = ref.forward(prompt, None)

    def decode():
        s = [t.clone() for t in state]
        for _ in range(decode_tokens):
            _, s = ref.forward([1], s)

    return len(prompt) / prefill, decode_tokens / timed(decode, 1)


@torch.no_grad()
def decode_run(model, state, batch: int, tokens: int) -> tuple[float, float]:
    """``tokens`` single-token steps of ``batch`` sequences from ``state``: (wall seconds, CPU seconds of this
    thread; with ``--threads 1`` all the work, and not the time other processes held the core)."""
    x = torch.ones(batch, 1, dtype=torch.long)
    s = state.expand(batch) if batch > 1 else state
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(tokens):
        _, s = model(x, s)
    return time.perf_counter() - wall, time.thread_time() - cpu


def batched_decode(path: Path, state, tokens: int, repeats: int, batches=(1, 4, 8, 16)) -> dict:
    """Decode tokens/s of one sequence in the decode layout (generate, chat) and of batches in the checkpoint
    layout and with blocked weights (``use_batch_layout``: batches, serve), each its own model. Measured
    round-robin, so that every configuration sees the same load, and the best of ``repeats`` rounds after
    a warm-up round is kept, by wall time and by CPU time."""
    ckpt, blocked, one = (load_model(path) for _ in range(3))
    blocked.use_batch_layout(8)
    one.use_decode_layout()
    configs = {("checkpoint_layout", 1): ckpt, ("checkpoint_layout", 8): ckpt,
               **{("batch_layout", b): blocked for b in batches}, ("decode_layout", 1): one}
    best = {k: (float("inf"), float("inf")) for k in configs}
    for rnd in range(repeats + 1):
        for (name, b), model in configs.items():
            wall, cpu = decode_run(model, state, b, tokens)
            if rnd:
                best[name, b] = (min(best[name, b][0], wall), min(best[name, b][1], cpu))
    res = {}
    for i, clock in enumerate(("wall", "cpu")):
        speed = {k: k[1] * tokens / v[i] for k, v in best.items()}
        res[clock] = {"decode_layout_1": speed["decode_layout", 1],
                      **{name: {b: v for (n, b), v in speed.items() if n == name}
                         for name in ("checkpoint_layout", "batch_layout")},
                      "batch8_over_1": speed["batch_layout", 8] / speed["decode_layout", 1]}
    return res


def decode_only(path: Path, model, args) -> None:
    """``--decode-only``: the decode rows of the table, from a state after a ``--seq``-token prompt."""
    with torch.no_grad():
        _, state = model(torch.randint(0, model.config.vocab_size, (1, args.seq)))
    dec = batched_decode(path, state, args.decode_tokens, args.repeats)
    print_rows(decode_rows(dec))
    write_json({"machine": platform.processor() or platform.machine(), "threads": args.threads,
                "torch": torch.__version__, "decode_tokens": args.decode_tokens, "repeats": args.repeats,
                "decode": dec}, args.out)
    print(f"wrote {args.out}")


def decode_rows(dec: dict) -> list[tuple[str, str]]:
    """Table rows: tokens/s by wall time and by CPU time, each also over one sequence's (decode layout)."""
    configs = [("decode", 1), *(("checkpoint", b) for b in dec["wall"]["checkpoint_layout"]),
               *(("batch", b) for b in dec["wall"]["batch_layout"])]
    rows = []
    for layout, b in configs:
        cells = []
        for clock in ("wall", "cpu"):
            d = dec[clock]
            v = d["decode_layout_1"] if layout == "decode" else d[f"{layout}_layout"][b]
            cells.append(f"{v:.1f} ({v / d['decode_layout_1']:.2f}x)")
        rows.append((f"decode, {b} sequence{'s' * (b > 1)}, {layout} layout (tokens/s wall | CPU)",
                     " | ".join(cells)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=24)
    ap.add_argument("--out", default="benchmarks/results/model.json")
    ap.add_argument("--no-reference", action="store_true", help="Skip the rwkv package comparison.")
    ap.add_argument("--decode-only", action="store_true",
                    help="Only the decode speeds (one sequence and batches), written to --out.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rwkv7-0.1b-shapes.pth"
        torch.save(random_checkpoint("rwkv7", **SHAPE), path)
        model = load_model(path, device=args.device)
        cfg = model.config
        if args.decode_only:
            return decode_only(path, model, args)
        peak = matmul_peak(args.repeats)
        T, B = args.seq, 2
        step, loss_tokens = tuning_step(model, T, B)
        t_step = timed(step, args.repeats)
        flops = step_flops(cfg, T, B, loss_tokens)
        prompt = torch.randint(0, cfg.vocab_size, (1, args.seq))
        with torch.no_grad():
            t_prefill = timed(lambda: model(prompt, last_only=True), args.repeats)
            _, state = model(prompt)
        dec = batched_decode(path, state, args.decode_tokens, args.repeats)
        wall = dec["wall"]
        dec1_ckpt, dec1 = wall["checkpoint_layout"][1], wall["decode_layout_1"]
        dec8_ckpt, dec8 = wall["checkpoint_layout"][8], wall["batch_layout"][8]
        ref_prefill = ref_decode = None
        if not args.no_reference:
            ref_prefill, ref_decode = reference_speed(path, prompt[0].tolist(), args.decode_tokens)
        mem_state = peak_rss_child(str(path), "state", T, B)
        mem_full = peak_rss_child(str(path), "full", T, B)
    res = {
        "machine": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
        "matmul_peak_gflops": peak,
        "tuning_step": {"T": T, "B": B, "loss_tokens": loss_tokens, "seconds": t_step,
                        "tokens_per_s": B * T / t_step, "gflops": flops / t_step / 1e9,
                        "fraction_of_peak": flops / t_step / 1e9 / peak},
        "prefill": {"tokens": args.seq, "tokens_per_s": args.seq / t_prefill, "rwkv_pkg_tokens_per_s": ref_prefill,
                    "fraction_of_peak": forward_flops(cfg, args.seq, 1) / t_prefill / 1e9 / peak},
        "decode": {"tokens_per_s": dec1, "batch8_tokens_per_s": dec8, "rwkv_pkg_tokens_per_s": ref_decode,
                   "checkpoint_layout_tokens_per_s": dec1_ckpt, "batch8_checkpoint_layout_tokens_per_s": dec8_ckpt,
                   "by_layout": dec},
        "peak_rss_mb": {"state_tuning_step": mem_state, "full_finetune_step": mem_full},
    }
    rows = [("matmul peak (GFLOP/s)", f"{peak:.1f}"),
            (f"state-tuning step T={T} B={B} (tokens/s)", f"{B * T / t_step:.0f}"),
            ("  model GFLOP/s, fraction of peak",
             f"{flops / t_step / 1e9:.1f}, {res['tuning_step']['fraction_of_peak']:.0%}"),
            (f"prefill {args.seq} (tokens/s)", f"{args.seq / t_prefill:.0f}"),
            ("  model FLOPs / peak", f"{res['prefill']['fraction_of_peak']:.0%}"),
            *decode_rows(dec),
            ("peak RSS state-tuning / full fine-tune (MB)", f"{mem_state:.0f} / {mem_full:.0f}")]
    if ref_prefill:
        rows += [("rwkv package prefill (tokens/s)",
                  f"{ref_prefill:.0f} (ours {args.seq / t_prefill / ref_prefill:.1f}x)"),
                 ("rwkv package decode (tokens/s)", f"{ref_decode:.1f} (ours {dec1 / ref_decode:.1f}x)")]
    print_rows(rows)
    write_json(res, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
