"""The shipped files of a finished run: ``model.pth``, ``tokenizer.json``, ``loss.png`` and ``MODEL_CARD.md``,
with the held-out bits per byte, a comparison of logits with the official ``rwkv`` package (when installed)
and greedy and sampled continuations."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from statetune.evaluate.plot import plot_run
from statetune.fileio import atomic_write
from statetune.model.checkpoint import build_model, load_model
from statetune.tokenizer import get_tokenizer
from statetune.train.metrics import read_metrics

from .card import write_card
from .data import heldout_bits_per_byte
from .decode import greedy, sample
from .loop import METRICS_FILE, save_atomic
from .model import export_state_dict, make_config
from .options import reproduce_args

SAMPLE_PROMPTS = ("The ", "In the beginning", "Python is")


def compare_with_rwkv_package(path: Path, text: str) -> dict:
    """Logits of the official ``rwkv`` package (``RWKV_V7_ON=1``, ``cpu fp32``) against statetune's on
    ``text``: the maximum absolute difference, or why the comparison could not run."""
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    try:
        from rwkv.model import RWKV
    except ImportError as e:
        return {"ran": False, "why": f"rwkv package not importable: {e}"}
    ids = get_tokenizer("bytes").encode(text)
    official = RWKV(str(path.with_suffix("")), "cpu fp32")
    ref, _ = official.forward(ids, None, full_output=True)
    ours, _ = load_model(path)(torch.tensor([ids]))
    diff = (ref.float() - ours[0].float()).abs().max().item()
    import rwkv

    return {"ran": True, "rwkv_version": getattr(rwkv, "__version__", None) or _dist_version("rwkv"),
            "tokens": len(ids), "max_abs_diff": diff, "logit_scale": ours.abs().max().item(),
            "argmax_agree": float((ref.argmax(-1) == ours[0].argmax(-1)).float().mean())}


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def finalize(args: argparse.Namespace, state_path: Path) -> None:
    """Write model.pth, tokenizer.json, loss.png and MODEL_CARD.md from the final training state."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ck = torch.load(state_path, map_location="cpu", weights_only=True)
    targs = ck["args"]
    cfg = make_config(targs["n_layer"], targs["n_embd"], targs["head_size"], targs["vocab_size"], targs["ffn_mult"])
    model = build_model(cfg)
    model.load_state_dict(ck["model"])
    save_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.save_dtype]
    sd = export_state_dict(model, save_dtype)
    model_path = out / "model.pth"
    save_atomic(sd, model_path)
    _write_text(out / "tokenizer.json", json.dumps({"tokenizer": "bytes"}, allow_nan=False) + "\n")
    file_mb = model_path.stat().st_size / 1e6
    print(f"wrote {model_path} ({file_mb:.2f} MB, {len(sd)} tensors)", flush=True)

    shipped = load_model(model_path)
    val_path = Path(args.corpus) / "val.txt"
    bpb, val_bytes = heldout_bits_per_byte(shipped, val_path)
    bpb_fp32, _ = heldout_bits_per_byte(model.eval(), val_path)
    print(f"held-out bits per byte: {bpb:.4f} ({save_dtype}), {bpb_fp32:.4f} (fp32)", flush=True)
    compare = compare_with_rwkv_package(model_path, "The quick brown fox jumps over the lazy dog. "
                                                    "In Python, a list is a mutable sequence.")
    print(f"rwkv package comparison: {compare}", flush=True)
    samples = {p: greedy(shipped, p, 240) for p in SAMPLE_PROMPTS}
    sampled = {p: sample(shipped, p, 240) for p in SAMPLE_PROMPTS[:2]}
    for p, s in list(samples.items()) + list(sampled.items()):
        print(f"--- {p!r}\n{p}{s}", flush=True)

    records = read_metrics(Path(targs["work_dir"]) / METRICS_FILE)
    curves = plot_run(targs["work_dir"])   # statetune's own plot of metrics.jsonl, shipped as loss.png
    atomic_write(out / "loss.png", lambda tmp: shutil.copyfile(curves, tmp))
    train_recs = [r for r in records if r["type"] == "train"]
    val_recs = [r for r in records if r["type"] == "val"]
    sources = json.loads((Path(args.corpus) / "sources.json").read_text())
    tps = [r["tokens_per_s"] for r in train_recs if "tokens_per_s" in r]
    info = {
        "args": targs, "config": {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "head_size",
                                                               "vocab_size", "dim_ffn", "lora")},
        "n_params": ck["n_params"], "n_tensors": len(sd), "file_mb": file_mb,
        "save_dtype": args.save_dtype, "sources": sources, "corpus_bytes": sources["total_bytes"],
        "train_bytes": sources["splits"]["train"]["bytes"], "val_bytes": val_bytes,
        "steps": ck["step"], "tokens_seen": ck["step"] * targs["batch"] * targs["ctx"],
        "wall_min": ck["elapsed"] / 60, "tokens_per_s": float(np.median(tps)) if tps else float("nan"),
        "tokens_per_s_min": min(tps, default=float("nan")), "tokens_per_s_max": max(tps, default=float("nan")),
        "bpb": bpb, "bpb_fp32": bpb_fp32, "compare": compare, "samples": samples, "sampled": sampled,
        "final_train_loss": train_recs[-1]["loss"] if train_recs else float("nan"),
        "final_val_loss": val_recs[-1]["loss"] if val_recs else float("nan"),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "command_args": reproduce_args(targs),
    }
    write_card(out, info)
    # final.json: a number this run has no data for (NaN above) is written as null: JSON has no NaN
    _write_text(Path(targs["work_dir"]) / "final.json", json.dumps(
        {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in info.items()
         if k not in ("sources", "args")}, indent=2, default=str, allow_nan=False) + "\n")
    print(f"wrote {out}/MODEL_CARD.md, loss.png, tokenizer.json", flush=True)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
