"""One command for a CUDA machine: is statetune's GPU path right, how fast and how lean is it, and how does it
compare with the peers' state-tuning kernels on the same GPU?

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

Installs nothing: it expects flash-linear-attention on top of a CUDA build of torch (``benchmarks/gpu/
README.md`` says how to bring everything to a machine without network, peers included), and says so in its
rows when something is missing. Parts, in order of value, each under its own time limit and the whole run
under ``--budget-s`` (the JSON is rewritten after every part, so a killed run keeps what finished):

1. ``kernels``: fla and the chunked path against the reference loop, fp32 and bf16, RWKV-7 and RWKV-6
   (relative error of the output, the final state and the gradient of the initial state);
2. ``tuning``: a bf16 state-tuning step (forward + backward into the state only) on random RWKV-7 models of
   the 0.1B and 1.5B shapes, fla vs chunked: tokens/s and peak GPU memory;
3. ``cli``: ``statetune prepare``, ``train --device cuda`` and ``generate --device cuda`` as subprocesses;
4. ``bptt_7b``: the RWKV-7 7.2B shape, B=1, 4096 tokens, full BPTT through the segment loop, per
   ``--ctx-len``: peak memory and step time;
5. ``serve``: ``statetune serve --device cuda`` with 64 streaming clients: tokens/s, TTFT p50/p99;
6. ``memory``: peak memory of state tuning vs full fine-tuning (AdamW over every weight), 1.5B shape;
7. ``peer_flashrwkv2``, ``peer_rwkv_peft``: the same step with FlashRWKV2's and RWKV-PEFT's state-tuning
   kernels in place of statetune's WKV op, beside statetune's fla path, after a comparison of each with the
   reference loop on a small case (speed compared at equal results). Optional: skipped with the reason when
   their vendored sources are absent or do not build.

``--device cpu --tiny`` runs the same code on small shapes without CUDA (what the test suite checks); on CPU
the fla rows and the peers are skipped and memory is not measured.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchio import print_rows  # noqa: E402
from gpu import big, peers, sections, serve_load  # noqa: E402
from gpu.common import SHAPES, TINY_SHAPES, fla_status  # noqa: E402
from gpu.runner import Part, run_parts  # noqa: E402
from gpu.sections import cli_runs, pick_shapes  # noqa: E402, F401 (the test suite calls them here)
from gpu.table import part_rows  # noqa: E402

# name -> (function, seconds it may take on one H100); the order is the order of value
PARTS = {
    "kernels": (sections.part_kernels, 150),
    "tuning": (sections.part_tuning, 120),
    "cli": (sections.part_cli, 120),
    "bptt_7b": (big.part_7b, 150),
    "serve": (serve_load.part_serve, 100),
    "memory": (sections.part_memory, 60),
    "peer_flashrwkv2": (peers.part_flashrwkv2, 150),
    "peer_rwkv_peft": (peers.part_rwkv_peft, 150),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="Device to check (default cuda).")
    ap.add_argument("--tiny", action="store_true", help="Small shapes (for CPU, and for the test suite).")
    ap.add_argument("--shapes", default="", help="Comma-separated shapes to time (default all: "
                    f"{', '.join(SHAPES)}; with --tiny: {', '.join(TINY_SHAPES)}).")
    ap.add_argument("--steps", type=int, default=5, help="Timed steps per configuration (best is reported).")
    ap.add_argument("--batch", type=int, default=4, help="Sequences per state-tuning step.")
    ap.add_argument("--seq", type=int, default=1024, help="Tokens per sequence.")
    ap.add_argument("--train-steps", type=int, default=10, help="Steps of the `statetune train` run.")
    ap.add_argument("--skip-cli", action="store_true", help="Skip the cli part (the subprocess commands).")
    ap.add_argument("--parts", default="", help=f"Comma-separated parts to run (default all: {', '.join(PARTS)}).")
    ap.add_argument("--budget-s", type=float, default=510.0,
                    help="Seconds for all parts together; parts left when it is spent are skipped (default 510).")
    ap.add_argument("--isolate", choices=("process", "inline"), default=None,
                    help="Run each part in its own process, killed at its limit (default on CUDA), or in this "
                         "one (default on CPU).")
    ap.add_argument("--ctx-len", default="1024,4096", help="bptt_7b: comma-separated segment lengths.")
    ap.add_argument("--long-tokens", type=int, default=4096, help="bptt_7b: tokens of the one sequence.")
    ap.add_argument("--serve-clients", type=int, default=64, help="serve: concurrent streaming clients.")
    ap.add_argument("--serve-seconds", type=float, default=20.0, help="serve: seconds the clients send requests.")
    ap.add_argument("--serve-shape", choices=("0.1B", "1.5B"), default="0.1B", help="serve: the random model.")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch.")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json", help="JSON report path.")
    return ap


def select_parts(args: argparse.Namespace) -> list[Part]:
    """The parts to run, in ``PARTS`` order (``--parts`` selects, ``--skip-cli`` drops cli)."""
    names = [n.strip() for n in args.parts.split(",") if n.strip()] or list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise SystemExit(f"gpu_check: --parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return [Part(n, *PARTS[n]) for n in PARTS if n in names and not (n == "cli" and args.skip_cli)]


def header(device: torch.device, args: argparse.Namespace, isolate: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    versions = {}
    for dist in ("triton", "fla-core", "flash-linear-attention"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"device": f"{device} ({name})", "torch": torch.__version__, "cuda": torch.version.cuda,
            "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
            "python": platform.python_version(), "versions": versions,
            "fla": fla_status(device), "tiny": args.tiny, "batch": args.batch, "seq": args.seq,
            "isolate": isolate, "budget_s": args.budget_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    from statetune.device import resolve_device
    from statetune.errors import OptionError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except OptionError as e:
        raise SystemExit(f"gpu_check: {e}") from None
    pick_shapes(args.tiny, args.shapes)  # a bad --shapes fails here, not inside every part
    parts = select_parts(args)
    args.device = str(device)
    args.seq = min(args.seq, 64) if args.tiny else args.seq
    isolate = args.isolate or ("process" if device.type == "cuda" else "inline")
    report = header(device, args, isolate)
    print_rows([(k, str(report[k])) for k in ("device", "torch", "fla")])

    def done(name: str, entry: dict[str, Any]) -> None:
        print_rows(part_rows(name, report))
        sys.stdout.flush()

    run_parts(parts, args, report, args.out, isolate, args.budget_s, done)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
