"""Pretrain the tiny byte-level RWKV-7 that statetune ships, from scratch, on CPU, within a wall-clock budget.

The model is statetune's own ``RWKV7`` module (official x070 parameter names) with ``requires_grad_(True)``;
the initialisation follows the recipe of the official trainer (BlinkDL/RWKV-LM ``RWKV_Tmix_x070``), written
out below. Training: AdamW, linear warmup then cosine decay, fp32, random contiguous byte windows of the
corpus built by ``scripts/build_corpus.py`` with documents joined by the end-of-text id 0.

The budget (``--minutes``) drives the schedule: the first steps measure the seconds per step, the number of
steps is planned so that the cosine ends when the budget does, and the plan is revised every few steps
from the recent speed (the machine may be shared). The cosine runs on a progress variable that each step
advances by its share of what is left (``(1 - p) / steps left``), so a revised plan changes the pace of
the decay without making the learning rate jump. A resumable training state is written every few
minutes and on SIGTERM/SIGINT; ``--resume`` continues a killed run.

At the end it writes, into ``--out`` (default ``statetune/assets/tiny-rwkv7/``): ``model.pth`` (a plain
dict of tensors in the official key format, bf16), ``tokenizer.json``, ``loss.png`` and ``MODEL_CARD.md``
with the held-out bits per byte on ``corpus/val.txt``, a comparison of logits with the official ``rwkv``
package (when installed) and a greedy sample.

``--bench 4x256,6x256`` measures training tokens/s of a few sizes and exits (how the size was chosen).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from statetune.model.base import RWKVBase  # noqa: E402
from statetune.model.checkpoint import build_model, load_model  # noqa: E402
from statetune.model.config import V7, RWKVConfig  # noqa: E402
from statetune.tokenizer import get_tokenizer  # noqa: E402

EOT = 0
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
SAMPLE_PROMPTS = ("The ", "In the beginning", "Python is")


# --------------------------------------------------------------------------------------------- model


def lora_dim(C: int, factor: float) -> int:
    """The official low-rank width suggestion: ``factor * sqrt(C)`` rounded to a multiple of 32, at least 32."""
    return max(32, int(round(factor * C ** 0.5 / 32)) * 32)


def make_config(n_layer: int, n_embd: int, head_size: int, vocab_size: int, ffn_mult: float) -> RWKVConfig:
    """An RWKV-7 config with the official low-rank widths and an FFN width rounded to a multiple of 32."""
    if n_embd % head_size:
        raise SystemExit(f"--n-embd {n_embd} is not a multiple of --head-size {head_size}")
    lora = {"w": lora_dim(n_embd, 2.5), "a": lora_dim(n_embd, 2.5), "v": lora_dim(n_embd, 1.7),
            "g": lora_dim(n_embd, 5.0)}
    dim_ffn = int(n_embd * ffn_mult) // 32 * 32
    return RWKVConfig(V7, n_layer, n_embd, n_embd // head_size, head_size, vocab_size, dim_ffn, lora, True)


def _orthogonal(rows: int, cols: int, gain: float, g: torch.Generator) -> Tensor:
    """A ``[rows, cols]`` matrix with orthonormal rows or columns (whichever are fewer), times ``gain``."""
    a = torch.randn(max(rows, cols), min(rows, cols), generator=g)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)   # a uniformly random orthogonal basis
    return (q if rows >= cols else q.T).contiguous() * gain


def init_weights(cfg: RWKVConfig, seed: int) -> dict[str, Tensor]:
    """A training initialisation of RWKV-7 in the official key format (fp32).

    What it does and why (after the official trainer):
    * token-shift mixes ``x_*`` go from strong mixing in early layers to little in late ones, and vary
      over channels, so layers start with different views of the previous token;
    * decay speeds ``w0`` span slow (about -6, long memory) to fast across channels, with a zigzag inside
      each head so that every head holds a range of time scales;
    * output projections (``att.output``, ``ffn.value``) start at zero, so every block starts as the
      identity and the residual stream is stable in the first steps;
    * ``receptance``/``value`` are orthogonal, ``key`` orthogonal at 0.1 (small keys: gentle state writes);
    * low-rank adapters start with a zero first factor and an orthogonal second factor at 0.1;
    * ``k_k`` about 0.7 (the delta-rule removal key), ``k_a`` about 1, bonus ``r_k`` -0.04;
    * ``ln_x`` (per-head GroupNorm) weight grows with depth, ``((1 + i) / L) ** 0.7``;
    * the embedding is tiny (±1e-4: ``ln0`` normalises it) and the head orthogonal at 0.5.
    """
    g = torch.Generator().manual_seed(seed)
    L, C, H, N, V, Fd = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size, cfg.dim_ffn
    sd: dict[str, Tensor] = {"emb.weight": (torch.rand(V, C, generator=g) * 2 - 1) * 1e-4}
    ddd = torch.arange(C, dtype=torch.float64) / C                    # 0 .. 1 over channels
    n = torch.arange(C, dtype=torch.float64)
    linear = n / (C - 1) - 0.5                                        # -0.5 .. 0.5
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()                                    # -1 .. 1 inside each head

    def vec(t: Tensor) -> Tensor:
        return t.reshape(1, 1, C).float()

    for i in range(L):
        b, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        ratio_0_to_1 = i / (L - 1) if L > 1 else 0.0
        ratio_1_to_0 = 1.0 - i / L
        lns = ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2")
        for ln in lns:
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = torch.ones(C), torch.zeros(C)
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            sd[a + name] = vec(1.0 - ddd ** (power * ratio_1_to_0))
        www = -6 + 6 * (n / (C - 1)) ** (1 + 1 * ratio_0_to_1 ** 0.3)
        sd[a + "w0"] = vec(www + 0.5 + zigzag * 2.5)
        sd[a + "a0"] = vec(-0.19 + zigzag * 0.3 + linear * 0.4)
        sd[a + "v0"] = vec(0.73 - linear * 0.4)
        for name in ("w", "a", "v", "g"):
            d = cfg.lora[name]
            sd[a + f"{name}1"] = torch.zeros(C, d)
            sd[a + f"{name}2"] = _orthogonal(d, C, 0.1, g)
        sd[a + "k_k"] = vec(0.71 - linear * 0.1)
        sd[a + "k_a"] = vec(torch.full((C,), 1.02, dtype=torch.float64))
        sd[a + "r_k"] = torch.full((H, N), -0.04)
        sd[a + "receptance.weight"] = _orthogonal(C, C, 1.0, g)
        sd[a + "key.weight"] = _orthogonal(C, C, 0.1, g)
        sd[a + "value.weight"] = _orthogonal(C, C, 1.0, g)
        sd[a + "output.weight"] = torch.zeros(C, C)
        sd[a + "ln_x.weight"] = torch.full((C,), ((1 + i) / L) ** 0.7)
        sd[a + "ln_x.bias"] = torch.zeros(C)
        sd[f + "x_k"] = vec(1.0 - ddd ** (ratio_1_to_0 ** 4))
        sd[f + "key.weight"] = _orthogonal(Fd, C, 1.0, g)
        sd[f + "value.weight"] = torch.zeros(C, Fd)
    sd["ln_out.weight"], sd["ln_out.bias"] = torch.ones(C), torch.zeros(C)
    sd["head.weight"] = _orthogonal(V, C, 0.5 * math.sqrt(V / C) if V > C else 0.5, g)
    return sd


def new_model(cfg: RWKVConfig, seed: int, device: str) -> RWKVBase:
    """statetune's RWKV-7 with the training initialisation, trainable, in fp32 on ``device``."""
    model = build_model(cfg)
    model.load_state_dict(init_weights(cfg, seed), strict=True)
    return model.to(device).requires_grad_(True).train()


def export_state_dict(model: RWKVBase, dtype: torch.dtype) -> dict[str, Tensor]:
    """The official checkpoint dict: every parameter by its official key, contiguous, in ``dtype``."""
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}


def save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- data


def load_tokens(path: Path) -> Tensor:
    """Byte tokens of a corpus file (byte b -> id b + 1) with each blank-line document separator replaced
    by the end-of-text id 0, which also starts the stream; int16 to keep 25 MB of text in 50 MB."""
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if raw.size < 2:
        raise SystemExit(f"{path}: empty corpus")
    ids = raw.astype(np.int16) + 1
    sep = np.nonzero((raw[:-1] == 10) & (raw[1:] == 10))[0]
    ids[sep] = EOT
    ids = np.delete(ids, sep + 1)
    return torch.from_numpy(np.concatenate(([EOT], ids)).astype(np.int16))


def batches(tokens: Tensor, batch: int, ctx: int, g: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``(inputs, targets)`` of ``batch`` random contiguous windows of ``ctx + 1`` tokens."""
    span = torch.arange(ctx + 1)
    while True:
        starts = torch.randint(0, tokens.numel() - ctx - 1, (batch, 1), generator=g)
        w = tokens[starts + span].long()
        yield w[:, :-1], w[:, 1:]


def lm_loss(logits: Tensor, targets: Tensor, max_logit_penalty: float) -> tuple[Tensor, Tensor]:
    """``(loss to minimise, cross-entropy)``. The penalty is the official trainer's L2Wrap: a push on each
    position's largest logit (``penalty * mean(max^2) / 2``) that keeps logits from drifting upwards."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    if max_logit_penalty <= 0:
        return ce, ce
    peak = logits.max(-1).values
    return ce + max_logit_penalty * 0.5 * peak.pow(2).mean(), ce


@torch.no_grad()
def window_loss(model: RWKVBase, tokens: Tensor, n: int, ctx: int, batch: int) -> float:
    """Mean cross-entropy (nats) over ``n`` fixed, evenly spaced windows: a cheap, repeatable val loss."""
    was_training = model.training
    model.eval()
    starts = torch.linspace(0, tokens.numel() - ctx - 2, n).long()
    span = torch.arange(ctx + 1)
    total, count = 0.0, 0
    for s in starts.split(batch):
        w = tokens[s[:, None] + span].long().to(model.device)
        logits, _ = model(w[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def stream_bits(model: RWKVBase, tokens: Tensor, streams: int = 8, chunk: int = 1024) -> float:
    """Total bits to encode ``tokens[1:]`` given what precedes each, reading the text as ``streams``
    contiguous pieces in parallel and carrying the recurrent state across chunks (an RNN sees all of its
    piece). Each piece's first token is scored from its predecessor only: a negligible loss of context."""
    model.eval()
    n = (tokens.numel() - 1) // streams * streams
    body = tokens[: n + 1].long()
    x = body[:-1].view(streams, -1)
    y = body[1:].view(streams, -1)
    state = None
    nats = 0.0
    for t in range(0, x.shape[1], chunk):
        logits, state = model(x[:, t:t + chunk].to(model.device), state)
        nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                y[:, t:t + chunk].reshape(-1).to(model.device), reduction="sum").item()
    rest = tokens[n:].long()   # the few tokens that do not fill the last row
    if rest.numel() > 1:
        logits, _ = model(rest[None, :-1].to(model.device))
        nats += F.cross_entropy(logits[0].float(), rest[1:].to(model.device), reduction="sum").item()
    return nats / math.log(2)


def heldout_bits_per_byte(model: RWKVBase, val_path: Path) -> tuple[float, int]:
    """Bits per byte of ``val_path``: the model's code length of the whole file over its size in bytes
    (the end-of-text ids stand for the blank lines between documents; their cost counts)."""
    tokens = load_tokens(val_path)
    n_bytes = val_path.stat().st_size
    return stream_bits(model, tokens) / n_bytes, n_bytes


@torch.no_grad()
def greedy(model: RWKVBase, prompt: str, n: int = 200) -> str:
    """Greedy continuation of ``prompt`` for ``n`` bytes (stops at end of text)."""
    tok = get_tokenizer("bytes")
    model.eval()
    logits, state = model(torch.tensor([tok.encode(prompt)], device=model.device))
    out: list[int] = []
    for _ in range(n):
        nxt = int(logits[0, -1].argmax())
        if nxt == EOT:
            break
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]], device=model.device), state)
    return tok.decode(out)


@torch.no_grad()
def sample(model: RWKVBase, prompt: str, n: int = 200, temperature: float = 0.8, top_p: float = 0.9,
           seed: int = 0) -> str:
    """A sampled continuation (temperature, then nucleus ``top_p``), reproducible through ``seed``."""
    tok = get_tokenizer("bytes")
    g = torch.Generator().manual_seed(seed)
    model.eval()
    logits, state = model(torch.tensor([tok.encode(prompt)], device=model.device))
    out: list[int] = []
    for _ in range(n):
        probs = torch.softmax(logits[0, -1].float().cpu() / temperature, -1)
        p_sorted, order = probs.sort(descending=True)
        keep = p_sorted.cumsum(0) - p_sorted < top_p              # the smallest set holding top_p of the mass
        nxt = int(order[keep][torch.multinomial(p_sorted[keep], 1, generator=g)])
        if nxt == EOT:
            break
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]], device=model.device), state)
    return tok.decode(out)


# --------------------------------------------------------------------------------------------- training


def param_groups(model: RWKVBase, weight_decay: float) -> list[dict]:
    """As the official trainer: decay on 2-D ``*.weight`` matrices, ``w0`` (decay speeds) at twice the LR."""
    decay, double, plain = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("att.w0"):
            double.append(p)
        elif p.dim() >= 2 and name.endswith(".weight") and weight_decay > 0:
            decay.append(p)
        else:
            plain.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": plain, "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": double, "weight_decay": 0.0, "lr_scale": 2.0}]


def lr_at(step: int, progress: float, peak: float, final: float, warmup: int) -> float:
    """Linear warmup from ``peak / 10`` over ``warmup`` steps, then cosine from ``peak`` to ``final`` as the
    decay ``progress`` goes from 0 to 1."""
    if step < warmup:
        return peak * (0.1 + 0.9 * step / warmup)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Metrics:
    """An append-only ``metrics.jsonl``; on resume, records past the resumed step are dropped."""

    def __init__(self, path: Path, keep_upto_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_upto_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_upto_step]
        path.write_text("".join(line + "\n" for line in kept))

    def log(self, **record: object) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")



def read_metrics(path: Path) -> list[dict]:
    """All records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(args: argparse.Namespace) -> Path:
    """Run (or resume) training; return the path of the final training state."""
    work = Path(args.work_dir)
    state_path = work / STATE_FILE
    torch.manual_seed(args.seed)
    cfg = make_config(args.n_layer, args.n_embd, args.head_size, args.vocab_size, args.ffn_mult)
    model = new_model(cfg, args.seed, args.device)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.99), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed, planned, sec_per_step, progress = 0, 0.0, None, None, 0.0
    resumed = args.resume and state_path.is_file()
    if resumed:
        ck = torch.load(state_path, map_location=args.device, weights_only=True)
        saved = ck["args"]
        for key in ("n_layer", "n_embd", "head_size", "vocab_size", "ffn_mult"):
            if saved[key] != getattr(args, key):
                raise SystemExit(f"--resume: {STATE_FILE} was trained with {key}={saved[key]}, "
                                 f"not {getattr(args, key)}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["rng"])
        step, elapsed, planned, sec_per_step = ck["step"], ck["elapsed"], ck["planned"], ck["sec_per_step"]
        progress = ck["progress"]
        if ck.get("done"):
            print(f"{state_path}: training already finished at step {step}", flush=True)
            return state_path
        print(f"resumed from {state_path}: step {step}, {elapsed / 60:.1f} min done", flush=True)
    metrics = Metrics(work / METRICS_FILE, step if resumed else None)
    train_tokens = load_tokens(Path(args.corpus) / "train.txt")
    val_tokens = load_tokens(Path(args.corpus) / "val.txt")
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = args.batch * args.ctx
    budget = args.minutes * 60.0
    print(f"model {cfg.n_layer}x{cfg.n_embd} ffn {cfg.dim_ffn} lora {cfg.lora}: {n_params / 1e6:.2f}M params; "
          f"train {train_tokens.numel() / 1e6:.1f}M tokens, val {val_tokens.numel() / 1e6:.2f}M; "
          f"{tokens_per_step} tokens/step; budget {args.minutes} min", flush=True)

    stop = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def save(done: bool = False) -> None:
        save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "rng": gen.get_state(), "step": step,
                     "elapsed": elapsed, "planned": planned, "sec_per_step": sec_per_step, "done": done,
                     "progress": progress,
                     "args": vars(args), "n_params": n_params}, state_path)

    data = batches(train_tokens, args.batch, args.ctx, gen)
    recent: list[float] = []        # seconds of the latest steps
    losses: list[float] = []
    last_save = last_eval = time.monotonic()
    run_start = time.monotonic() - elapsed
    warmup = args.warmup
    while True:
        elapsed = time.monotonic() - run_start
        if progress >= 1.0:
            break
        if elapsed >= budget:
            print(f"budget reached at step {step}", flush=True)
            break
        if stop["signal"] is not None:
            save()
            print(f"signal {stop['signal']}: saved {state_path} at step {step}; rerun with --resume", flush=True)
            raise SystemExit(128 + stop["signal"])
        lr = lr_at(step, progress, args.lr, args.lr * args.final_lr_frac, warmup)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        t0 = time.monotonic()
        x, y = next(data)
        logits, _ = model(x.to(args.device))
        loss, ce = lm_loss(logits, y.to(args.device), args.max_logit_penalty)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        losses.append(ce.item())
        recent = (recent + [time.monotonic() - t0])[-args.plan_window:]
        # (re)plan the total number of steps so that the cosine ends with the budget
        left = budget - (time.monotonic() - run_start)
        if step == args.measure_steps or (step > args.measure_steps and step % args.replan_every == 0):
            sec_per_step = sorted(recent)[len(recent) // 2] * 1.03 + 0.02   # median, plus eval/save overhead
        if sec_per_step is not None:
            steps_left = left / sec_per_step
            planned = step + max(0, round(steps_left))
            if step >= warmup:
                progress = 1.0 if steps_left <= 1 else progress + (1.0 - progress) / steps_left
            if step == args.measure_steps:
                print(f"measured {sec_per_step:.2f} s/step ({tokens_per_step / sec_per_step:.0f} tokens/s): "
                      f"planning {planned} steps = {planned * tokens_per_step / 1e6:.1f}M tokens", flush=True)
        if step % args.log_every == 0:
            mean = sum(losses) / len(losses)
            losses = []
            now = time.monotonic() - run_start
            metrics.log(step=step, tokens=step * tokens_per_step, elapsed=round(now, 1), lr=lr,
                        train_loss=round(mean, 5), planned=planned,
                        tokens_per_s=round(tokens_per_step / (sum(recent) / len(recent)), 1))
            print(f"step {step}/{planned} {now / 60:.1f} min lr {lr:.2e} loss {mean:.4f} "
                  f"({mean / math.log(2):.3f} bits) {tokens_per_step * len(recent) / sum(recent):.0f} tok/s",
                  flush=True)
        if time.monotonic() - last_eval >= args.eval_every_min * 60:
            evaluate_and_log(model, val_tokens, metrics, step, tokens_per_step, run_start, args)
            last_eval = time.monotonic()
        if time.monotonic() - last_save >= args.save_every_min * 60:
            elapsed = time.monotonic() - run_start
            save()
            last_save = time.monotonic()
    elapsed = time.monotonic() - run_start
    evaluate_and_log(model, val_tokens, metrics, step, tokens_per_step, run_start, args)
    save(done=True)
    print(f"training done: {step} steps, {step * tokens_per_step / 1e6:.1f}M tokens, {elapsed / 60:.1f} min",
          flush=True)
    return state_path


def evaluate_and_log(model: RWKVBase, val_tokens: Tensor, metrics: Metrics, step: int, tokens_per_step: int,
                     run_start: float, args: argparse.Namespace) -> None:
    """Val loss on fixed windows, logged, with a short greedy sample to the console."""
    val = window_loss(model, val_tokens, args.val_windows, args.ctx, args.batch)
    metrics.log(step=step, tokens=step * tokens_per_step, elapsed=round(time.monotonic() - run_start, 1),
                val_loss=round(val, 5))
    sample = greedy(model, "The ", 80).replace("\n", "\\n")
    model.train()
    print(f"  val loss {val:.4f} ({val / math.log(2):.3f} bits/token) | The {sample}", flush=True)


# --------------------------------------------------------------------------------------------- outputs


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


def plot_losses(records: list[dict], path: Path) -> None:
    """Train and val cross-entropy (in bits per byte) against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["tokens"], r["train_loss"] / math.log(2)) for r in records if "train_loss" in r]
    val = [(r["tokens"], r["val_loss"] / math.log(2)) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot([t / 1e6 for t, _ in train], [v for _, v in train], lw=0.8, alpha=0.8, label="train (batch mean)")
    if val:
        ax.plot([t / 1e6 for t, _ in val], [v for _, v in val], "o-", ms=3, lw=1.5, label="held-out windows")
    ax.set_xlabel("tokens seen (millions of bytes)")
    ax.set_ylabel("cross-entropy (bits per byte)")
    ax.set_title("tiny-rwkv7 pretraining")
    lows = [v for _, v in train[len(train) // 10:] + val] or [1.0]
    ax.set_ylim(min(lows) * 0.95, max(lows) * 1.15 + 0.2)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def write_card(out: Path, info: dict) -> None:
    """``MODEL_CARD.md`` from the numbers of this run."""
    a = info["args"]
    src = info["sources"]
    rows = "\n".join(
        f"| {name} | `{s['package']}` {s['version']} | {s['licence']} | {fmt_bytes(s['bytes'])} | {s['documents']:,} |"
        for name, s in src.get("sources", {}).items())
    cmp_ = info["compare"]
    if cmp_.get("ran"):
        cmp_text = (f"The official `rwkv` package ({cmp_['rwkv_version']}, `RWKV_V7_ON=1`, strategy `cpu fp32`) "
                    f"loads `model.pth` unchanged; over {cmp_['tokens']} tokens its logits differ from "
                    f"`statetune.load_model` by at most {cmp_['max_abs_diff']:.2e} (logits up to "
                    f"{cmp_['logit_scale']:.1f}; argmax agreement {cmp_['argmax_agree']:.0%}).")
    else:
        cmp_text = f"Not compared with the official `rwkv` package: {cmp_.get('why')}."
    samples = "\n\n".join(f"Prompt `{p!r}`:\n\n```text\n{p}{s}\n```" for p, s in info["samples"].items())
    sampled = "\n\n".join(f"Prompt `{p!r}`:\n\n```text\n{p}{s}\n```" for p, s in info["sampled"].items())
    cfg = info["config"]
    speed_row = (f"median {info['tokens_per_s']:.0f} tokens/s on {a['threads']} threads ({info['machine']}); "
                 f"the machine was shared, so it ranged {info['tokens_per_s_min']:.0f} to "
                 f"{info['tokens_per_s_max']:.0f}")
    model_row = (f"a plain `torch.save` dict of {info['n_tensors']} tensors with the official RWKV-7 key "
                 f"names, {info['save_dtype']} ({info['file_mb']:.1f} MB)")
    optim_row = (f"AdamW, betas (0.9, 0.99), weight decay {a['weight_decay']} on matrices, `w0` at 2× LR, "
                 f"grad clip {a['grad_clip']}")
    steps_row = (f"{info['steps']:,} / {info['tokens_seen'] / 1e6:.1f}M bytes "
                 f"({info['tokens_seen'] / info['train_bytes']:.2f} epochs)")
    text = f"""# tiny-rwkv7: a small byte-level RWKV-7 for statetune

A {cfg['n_layer']}-layer, {cfg['n_embd']}-wide RWKV-7 ("Goose", x070) language model with
{info['n_params'] / 1e6:.2f}M parameters, pretrained from scratch on {fmt_bytes(info['corpus_bytes'])} of
permissively licensed English text in {info['wall_min']:.0f} minutes on {a['threads']} CPU threads. It ships
inside statetune so that tests, examples and the state-tuning tutorial have a real (if small) language model
without a download. It writes English-looking text, not a useful assistant: treat it as a toy.

## Files

| file | what |
|---|---|
| `model.pth` | the weights, {model_row} |
| `tokenizer.json` | `{{"tokenizer": "bytes"}}`: byte `b` is token `b + 1`, token 0 is end of text |
| `loss.png` | the loss curve |
| `MODEL_CARD.md` | this card |

## Architecture

| | |
|---|---|
| layers × width | {cfg['n_layer']} × {cfg['n_embd']} |
| heads × head size | {cfg['n_head']} × {cfg['head_size']} |
| channel-mix width | {cfg['dim_ffn']} |
| low-rank widths (w, a, v, g) | {cfg['lora']['w']}, {cfg['lora']['a']}, {cfg['lora']['v']}, {cfg['lora']['g']} |
| vocabulary | {cfg['vocab_size']} (bytes + end of text) |
| parameters | {info['n_params']:,} |

**Why a byte tokenizer.** The RWKV World vocabulary has 65,536 tokens: its embedding alone would be
65,536 × {cfg['n_embd']} × 2 bytes = {65536 * cfg['n_embd'] * 2 / 1e6:.1f} MB in bf16 (and as much again for the
output head), over the 20 MB budget of a file shipped in a Python package, before a single layer. With 257
byte tokens the embedding and head together are {2 * cfg['vocab_size'] * cfg['n_embd'] / 1e3:.0f}K parameters,
so a tiny model spends its parameters on layers; it also reads any text, in any language, without unknown
tokens. statetune picks the byte tokenizer from the vocabulary size (257 to 1024 rows).

## Training data

{fmt_bytes(info['corpus_bytes'])} of text ({src['splits']['train']['documents']:,} training and
{src['splits']['val']['documents']:,} held-out documents) built by `scripts/build_corpus.py` from Debian 12
packages whose licences permit redistribution and derived works; each licence was checked in
`/usr/share/doc/<package>/copyright` when the corpus was built:

| source | package | licence | text | documents |
|---|---|---|---|---|
{rows}

Cleaning: whitespace normalised, short and mostly non-letter lines dropped, code listings and navigation
removed from the HTML, repeated boilerplate lines of the HTML help dropped, exact duplicate documents
removed; the documents were shuffled with a fixed seed and 1% held out. Left out on purpose: the
`ascii-art`, `translate-me` and `ethnic` fortune files, and the Python changelog, indexes and licence pages.
No restaurant-domain or E2E data.

## Training

| | |
|---|---|
| objective | next byte, cross-entropy, documents joined with the end-of-text token |
| windows | {a['batch']} random contiguous windows of {a['ctx']} bytes per step |
| optimiser | {optim_row} |
| learning rate | warmup {a['warmup']} steps to {a['lr']}, cosine to {a['lr'] * a['final_lr_frac']:.1e} |
| steps / tokens seen | {steps_row} |
| precision | fp32 (bf16 is slow on this CPU); saved as {info['save_dtype']} |
| speed | {speed_row} |
| wall time | {info['wall_min']:.1f} min |
| initialisation | the official RWKV-7 recipe (see `init_weights` in `scripts/pretrain_small.py`) |

![loss curve](loss.png)

## Evaluation

Held-out bits per byte on `corpus/val.txt` ({fmt_bytes(info['val_bytes'])}, read as 8 streams with the
recurrent state carried through each): **{info['bpb']:.3f}** with the shipped {info['save_dtype']} weights
({info['bpb_fp32']:.3f} with the fp32 training weights). Final training loss (last logged batch mean)
{info['final_train_loss']:.3f} nats; last held-out window loss {info['final_val_loss']:.3f} nats.

{cmp_text}

Greedy continuations (no sampling: a model this small loops):

{samples}

Sampled continuations (temperature 0.8, top-p 0.9, seed 0):

{sampled}

## Limitations

A toy: {info['n_params'] / 1e6:.1f}M parameters that have read {info['tokens_seen'] / 1e6:.1f}M bytes. It spells
English words and short phrases in the styles of its sources (dictionary glosses, quotations, software
documentation), loses the thread within a sentence or two, and repeats itself under greedy decoding. It
knows little beyond that and should be used for tests, demos and experiments with state tuning only.

## How to reproduce

```bash
sudo python scripts/build_corpus.py            # apt-get installs the four packages, writes corpus/
python scripts/pretrain_small.py {info['command_args']}
# killed? the same command with --resume continues from runs/tiny-rwkv7/train_state.pt
```

Sizes were chosen by measurement (`python scripts/pretrain_small.py --bench 4x256,6x256,8x256`) so that
training fits {a['minutes']} minutes on {a['threads']} CPU threads and the file stays under 20 MB. The
schedule adapts to the measured speed, so a rerun on another machine trains for the same time, not the
same number of steps, and gives similar, not identical, weights.

## Licence and attribution

The weights ship with statetune. The training texts are under the licences listed above, all of which permit
redistribution and derived works; their copyright notices are reproduced in statetune's `NOTICE`:
fortune-mod (BSD, © 1991 The Regents of the University of California), WordNet 3.0 (© 2006 Princeton
University), the Python documentation (© Python Software Foundation, PSF License Version 2) and the
LibreOffice help (© LibreOffice contributors, MPL-2.0). The model can reproduce short pieces of these texts.
"""
    (out / "MODEL_CARD.md").write_text(text, encoding="utf-8")


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
    (out / "tokenizer.json").write_text(json.dumps({"tokenizer": "bytes"}) + "\n")
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
    plot_losses(records, out / "loss.png")
    train_recs = [r for r in records if "train_loss" in r]
    val_recs = [r for r in records if "val_loss" in r]
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
        "final_train_loss": train_recs[-1]["train_loss"] if train_recs else float("nan"),
        "final_val_loss": val_recs[-1]["val_loss"] if val_recs else float("nan"),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "command_args": reproduce_args(targs),
    }
    write_card(out, info)
    (Path(targs["work_dir"]) / "final.json").write_text(json.dumps(
        {k: v for k, v in info.items() if k not in ("sources", "args")}, indent=2, default=str) + "\n")
    print(f"wrote {out}/MODEL_CARD.md, loss.png, tokenizer.json", flush=True)


def reproduce_args(a: dict) -> str:
    """The command-line flags that reproduce a run (the non-default ones, and always the budget)."""
    defaults = vars(build_parser().parse_args([]))
    keep = ["threads", "minutes", "seed"]
    flags = []
    for key, value in a.items():
        if key in ("resume", "finalize_only", "bench", "out", "work_dir", "corpus", "device"):
            continue
        if key in keep or value != defaults.get(key):
            flags.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(flags)


# --------------------------------------------------------------------------------------------- bench / main


def bench(args: argparse.Namespace) -> None:
    """Training tokens/s of each ``LxC`` size in ``--bench`` (a few steps each, after one warm-up step)."""
    for spec in args.bench.split(","):
        n_layer, n_embd = (int(v) for v in spec.lower().split("x"))
        cfg = make_config(n_layer, n_embd, args.head_size, args.vocab_size, args.ffn_mult)
        model = new_model(cfg, args.seed, args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(1, 257, (args.batch, args.ctx + 1), device=args.device)
        times = []
        for _ in range(4):
            t0 = time.monotonic()
            logits, _ = model(x[:, :-1])
            lm_loss(logits, x[:, 1:], args.max_logit_penalty)[0].backward()
            opt.step()
            opt.zero_grad()
            times.append(time.monotonic() - t0)
        dt = float(np.median(times[1:]))
        n = sum(p.numel() for p in model.parameters())
        print(f"{spec}: {n / 1e6:.2f}M params, bf16 file {n * 2 / 1e6:.1f} MB, {dt:.2f} s/step, "
              f"{args.batch * args.ctx / dt:.0f} tokens/s, {args.minutes} min -> "
              f"{args.batch * args.ctx / dt * args.minutes * 60 / 1e6:.1f}M tokens", flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--corpus", default=None, help="folder with train.txt, val.txt, sources.json "
                    "(default: corpus/ in the repository)")
    ap.add_argument("--out", default=None, help="where the shipped files go (default: "
                    "statetune/assets/tiny-rwkv7/ in the repository)")
    ap.add_argument("--work-dir", default=None, help="training state, metrics.jsonl, final.json (default: "
                    "runs/tiny-rwkv7/ in the repository)")
    ap.add_argument("--minutes", type=float, default=68.0, help="wall-clock training budget")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from WORK_DIR/train_state.pt if present")
    ap.add_argument("--finalize-only", action="store_true", help="skip training: write the outputs from "
                    "WORK_DIR/train_state.pt")
    ap.add_argument("--bench", default="", help="measure tokens/s of sizes like 4x256,6x256 and exit")
    size = ap.add_argument_group("model size")
    size.add_argument("--n-layer", type=int, default=6)
    size.add_argument("--n-embd", type=int, default=256)
    size.add_argument("--head-size", type=int, default=64)
    size.add_argument("--ffn-mult", type=float, default=4.0)
    size.add_argument("--vocab-size", type=int, default=257, help="257 = bytes + end of text (up to 1024)")
    opt = ap.add_argument_group("optimisation")
    opt.add_argument("--batch", type=int, default=16)
    opt.add_argument("--ctx", type=int, default=256)
    opt.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    opt.add_argument("--final-lr-frac", type=float, default=0.05, help="final LR as a fraction of the peak")
    opt.add_argument("--warmup", type=int, default=60, help="warmup steps")
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--grad-clip", type=float, default=1.0)
    opt.add_argument("--max-logit-penalty", type=float, default=1e-4, help="L2Wrap factor (0 disables)")
    sched = ap.add_argument_group("schedule and logging")
    sched.add_argument("--measure-steps", type=int, default=8, help="steps timed before the first plan")
    sched.add_argument("--replan-every", type=int, default=25, help="revise the plan every N steps")
    sched.add_argument("--plan-window", type=int, default=50, help="steps whose median time plans the rest")
    sched.add_argument("--log-every", type=int, default=10)
    sched.add_argument("--eval-every-min", type=float, default=5.0)
    sched.add_argument("--save-every-min", type=float, default=4.0)
    sched.add_argument("--val-windows", type=int, default=32)
    sched.add_argument("--save-dtype", choices=("bf16", "fp32"), default="bf16")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # paths default to places in the repository, whatever the current directory
    args.corpus = str(Path(args.corpus) if args.corpus else REPO / "corpus")
    args.out = str(Path(args.out) if args.out else REPO / "statetune" / "assets" / "tiny-rwkv7")
    args.work_dir = str(Path(args.work_dir) if args.work_dir else REPO / "runs" / "tiny-rwkv7")
    torch.set_num_threads(args.threads)
    if args.bench:
        bench(args)
        return
    state_path = Path(args.work_dir) / STATE_FILE
    if not args.finalize_only:
        state_path = train(args)
    elif not state_path.is_file():
        raise SystemExit(f"--finalize-only: no {state_path}")
    finalize(args, state_path)


if __name__ == "__main__":
    main()
