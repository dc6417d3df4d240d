"""One benchmark run: the shared context, the phases (baselines, LR sweep, more seeds, ablation) and saving
the results after every finished run, so a stopped run still leaves a consistent partial report."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from benchio import write_json

from statetune.data.loader import TokenDataset
from statetune.model.checkpoint import load_model
from statetune.objective import dataset_loss
from statetune.tokenizer import tokenizer_for_vocab
from statetune.tuning.tunable import TunableState

from . import measure, methods, report, split

REPO = Path(__file__).resolve().parents[2]
#: Learning rates tried per method (seed 0, chosen by best validation loss); each grid is centred on the best
#: rate of a wider exploratory sweep at this budget, so the chosen rate should not sit at a grid's edge.
#: The first is used by --quick.
LR_GRID: dict[str, list[float]] = {
    "state_direct": [10.0, 3.0, 30.0, 1.0],
    "state_shift": [10.0, 3.0, 30.0],
    "state_encoder": [3.0, 1.0, 10.0],
    "state_encoder_global": [3.0, 1.0, 10.0],
    "state_prompt_init": [10.0, 3.0, 30.0],
    "state_shift_slow": [10.0, 3.0, 30.0],
    "lora": [1e-2, 3e-3, 3e-2],
    "full": [1e-3, 3e-4, 3e-3],
}
#: The full run's sizes: 38 training runs (22 in the sweep, 14 more seeds, 2 for the batch ablation) fit in
#: under an hour on 2 CPU threads with the shipped model (a 40-step run of batch 8 takes about 40 s there).
FULL = {"steps": 40, "batch_size": 8, "eval_every": 8, "seeds": 3, "val_records": 48, "test_refs": 2,
        "test_prompts": None, "max_new_tokens": 192, "decode_tokens": 64, "general_bytes": 20_000}
QUICK = {"steps": 3, "batch_size": 2, "eval_every": 3, "seeds": 1, "val_records": 4, "test_refs": 1,
         "test_prompts": 3, "max_new_tokens": 12, "decode_tokens": 4, "general_bytes": 1_000}


def lr_grid(name: str) -> list[float]:
    """A method's built-in LR grid (the parameterised methods take direct tuning's)."""
    return list(LR_GRID.get(name) or LR_GRID["state_direct" if methods.parameterised(name) else name])


def rel(path: Path | str) -> str:
    """A path as seen from the repository root (what committed files show)."""
    return os.path.relpath(Path(path).resolve(), REPO)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (what the report's timings were measured on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Bench:
    """One benchmark run: the shared context, the results dict, and saving it after every step."""

    def __init__(self, args: argparse.Namespace, command: str):
        try:
            import peft
        except ImportError:
            raise SystemExit("the LoRA baseline needs peft: pip install -e '.[bench]'") from None

        self.args, self.t0 = args, time.perf_counter()
        self.work = args.work_dir or Path(tempfile.mkdtemp(prefix="quality_e2e-"))
        self.budget = methods.Budget(args.steps, args.batch_size, args.eval_every,
                                     warmup=max(1, min(10, args.steps // 6)))
        data = split.build(args.data, self.work / "data", args.model, val_records=args.val_records,
                           test_refs=args.test_refs, test_prompts=args.test_prompts, shots=args.shots)
        model = load_model(args.model)
        self.model, self.tok = model, tokenizer_for_vocab(model.config.vocab_size)
        general = []
        if args.general_text.is_file():
            raw = args.general_text.read_bytes()[:args.general_bytes].decode("utf-8", errors="ignore")
            general = self.tok.encode(raw)
        self.probe = measure.Probe(data.test, data.test_groups,
                                   general, args.batch_size, args.max_new_tokens, args.decode_tokens)
        with torch.no_grad():
            _, self.few_state = model(torch.tensor([self.tok.encode(data.few_shot)]), None, last_only=True)
        val = TokenDataset(data.val, model.config.vocab_size)
        base_val = dataset_loss(model, val, None, args.batch_size).loss
        few_val = dataset_loss(model, val, self.few_state, args.batch_size).loss
        n_state = TunableState(model.zero_state(1)).n_trainable()
        self.ctx = methods.Context(args.model, model, data.train, data.val, data.few_shot, self.work, base_val,
                                   few_val, methods.lora_rank_for(model, n_state), args.shift_lr_scale)
        self.data = data
        cfg = model.config
        n_params = sum(p.numel() for p in model.parameters())
        self.results: dict = {
            "benchmark": "quality_e2e", "command": command, "complete": False,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "peft": peft.__version__, "python": platform.python_version()},
            "config": {"model_rel": rel(args.model), "data_rel": rel(args.data), "json_rel": rel(args.json),
                       "quick": args.quick, "seeds": list(range(args.seeds)),
                       "weight_seeds": list(range(args.weight_seeds)), "shots": args.shots,
                       "shift_lr_scale": args.shift_lr_scale,
                       "test_refs": args.test_refs, "max_new_tokens": args.max_new_tokens,
                       "decode_tokens": args.decode_tokens, "general_text_rel": rel(args.general_text),
                       "general_bytes": args.general_bytes, "general_tokens": len(general),
                       "lora_rank": self.ctx.lora_rank, "lora_targets": methods.LORA_TARGETS,
                       "lr_grid": {m: self.grid(m) for m in args.methods}},
            "model": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "head_size": cfg.head_size,
                      "vocab_size": cfg.vocab_size, "params": n_params,
                      "summary": f"RWKV-7, {cfg.n_layer} layers x {cfg.n_embd}, {cfg.n_head} heads of "
                                 f"{cfg.head_size}, vocabulary {cfg.vocab_size}, {n_params / 1e6:.2f}M parameters"},
            "data": {"split": data.split.summary(), "counts": data.counts,
                     "split_rule": "MRs in SHA-256 order: first 80% train, next 10% validation, last 10% test",
                     "few_shot_prompt": data.few_shot},
            "budget": vars(self.budget), "base_val": base_val, "few_shot_val": few_val,
            "sweep": {}, "methods": {}, "ablation": [],
        }

    def grid(self, name: str) -> list[float]:
        if name in self.args.lr_grid:
            return self.args.lr_grid[name]
        return lr_grid(name)[:1] if self.args.quick else lr_grid(name)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.0f}s] {msg}", flush=True)

    def save(self) -> None:
        self.results["elapsed_s"] = time.perf_counter() - self.t0
        write_json(self.results, self.args.json, indent=1)
        report.plot_curves(self.results, self.args.curves)
        report.write_report(self.results, self.args.report, os.path.relpath(self.args.curves,
                                                                              self.args.report.parent))

    def add_run(self, name: str, row: dict) -> None:
        m = self.results["methods"][name]
        m["runs"].append(row)
        m["summary"] = report.summarise(m["runs"])
        self.save()

    def scored(self, t: methods.Trained, lr: float, seed: int) -> dict:
        base_general = self.results["methods"]["zero_shot"]["runs"][0].get("general_loss")
        row = {"seed": seed, "lr": lr, "trainable": t.trainable, "stored_bytes": t.stored_bytes,
               "train_s": t.train_s, "best_val": t.best_val, "curve": t.curve}
        row.update(measure.score(t.model, self.tok, self.probe, t.state, t.weights_changed, base_general))
        return row

    # -- the phases --------------------------------------------------------------------------------------
    def baselines(self) -> None:
        """Zero-shot and few-shot prompting of the base model (nothing trained)."""
        res = self.results
        for name, label, state, stored, what, val in (
                ("zero_shot", "base model, zero-shot", None, 0, None, res["base_val"]),
                ("few_shot", f"base model, {self.args.shots}-shot", self.few_state,
                 len(self.data.few_shot.encode()), "prompt text", res["few_shot_val"])):
            res["methods"][name] = {"label": label, "state_method": False, "lr": None, "stored_what": what, "runs": []}
            base_general = res["methods"]["zero_shot"]["runs"][0].get("general_loss") if state is not None else None
            row = {"seed": None, "trainable": 0, "stored_bytes": stored, "train_s": 0.0, "best_val": val}
            row.update(measure.score(self.model, self.tok, self.probe, state, False, base_general))
            if state is None:
                row["general_loss_measured_on"] = "the base weights, zero state"
            self.add_run(name, row)
            self.log(f"{name}: test loss {row['test_loss']:.4f}, BLEU {row['bleu']:.1f}")

    def sweep(self, name: str) -> None:
        """Seed 0 at every LR of the grid; the best on validation is scored and kept as seed 0's run."""
        fn, label, is_state = methods.get(name)
        seed = 0
        entries, best = [], None
        for lr in self.grid(name):
            t = fn(self.ctx, self.budget, lr, seed)
            entries.append({"lr": lr, "best_val": t.best_val, "train_s": t.train_s, "curve": t.curve})
            self.log(f"{name} lr={lr:g} seed {seed}: best val {t.best_val:.4f} ({t.train_s:.0f}s training)")
            if best is None or t.best_val < best[1].best_val:
                best = (lr, t)
        assert best is not None
        lr, t = best
        self.results["sweep"][name] = {"runs": entries, "chosen": lr, "seed": seed}
        self.results["methods"][name] = {"label": label, "state_method": is_state, "lr": lr,
                                         "stored_what": t.stored_what, "runs": []}
        self.add_run(name, self.scored(t, lr, seed))

    def out_of_time(self) -> bool:
        """True (and noted in the results) once ``--time-limit`` has passed: no new run starts."""
        limit = self.args.time_limit
        if limit is None or time.perf_counter() - self.t0 < limit * 60:
            return False
        self.results["stopped"] = f"--time-limit {limit:g} min reached; later runs were not started"
        self.log(self.results["stopped"])
        return True

    def another_seed(self, name: str, seed: int) -> None:
        fn = methods.get(name)[0]
        lr = self.results["methods"][name]["lr"]
        t = fn(self.ctx, self.budget, lr, seed)
        row = self.scored(t, lr, seed)
        self.add_run(name, row)
        self.log(f"{name} lr={lr:g} seed {seed}: best val {t.best_val:.4f}, test {row['test_loss']:.4f}, "
                 f"BLEU {row['bleu']:.1f}")

    def batch_ablation(self) -> None:
        """Direct state tuning at its chosen LR with half and double the batch, the same tokens seen."""
        lr = self.results["methods"]["state_direct"]["lr"]
        b = self.budget
        for factor in (0.5, 2.0):
            bs, steps = max(1, int(b.batch_size * factor)), max(1, int(b.steps / factor))
            budget = methods.Budget(steps, bs, max(1, int(b.eval_every / factor)), max(1, int(b.warmup / factor)))
            t = methods.state_direct(self.ctx, budget, lr, 0)
            row = {"name": f"state, direct, batch x{factor:g}", "batch_size": bs, "steps": steps, "lr": lr,
                   "best_val": t.best_val, "train_s": t.train_s, "curve": t.curve}
            base_general = self.results["methods"]["zero_shot"]["runs"][0].get("general_loss")
            row.update(measure.score(t.model, self.tok, self.probe, t.state, False, base_general))
            self.results["ablation"].append(row)
            self.save()
            self.log(f"ablation batch {bs} x {steps}: best val {t.best_val:.4f}, test {row['test_loss']:.4f}")

    def run(self) -> None:
        a = self.args
        self.log(f"data {self.data.split.summary()}; budget {vars(self.budget)}; LoRA rank {self.ctx.lora_rank}")
        self.baselines()
        # every method at seed 0 first, then one more seed of every state method at a time, then the further
        # seeds of LoRA and full fine-tuning: a run stopped early still compares all methods, and the state
        # methods with equal seed counts
        todo = [(self.sweep, (name,)) for name in a.methods]
        state = [m for m in a.methods if methods.get(m)[2]]
        weight = [m for m in a.methods if not methods.get(m)[2]]
        for names, n_seeds in ((state, a.seeds), (weight, a.weight_seeds)):
            todo += [(self.another_seed, (name, seed)) for seed in range(1, n_seeds) for name in names]
        if a.batch_ablation and "state_direct" in a.methods:
            todo.append((self.batch_ablation, ()))
        for step, step_args in todo:
            if self.out_of_time():
                break
            step(*step_args)
        else:
            self.results["complete"] = True
        self.save()
        if a.work_dir is None:
            shutil.rmtree(self.work, ignore_errors=True)
        self.log(f"wrote {rel(a.json)}, {rel(a.report)}, {rel(a.curves)}")


