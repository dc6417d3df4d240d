"""Learning curves: every method at several budgets, each budget its own run with its own schedule, each at
its best LR for that budget, several seeds per point; the points of many invocations merge into one JSON.

A budget is a number of optimizer steps of the run's batch size. Its schedule scales with it: warmup
``steps // 6`` and validation every ``steps // 5`` steps (40 steps: warmup 6, validation every 8, the
single-budget benchmark's schedule). Per (method, budget) seed 0 is swept over a few LRs (the built-in grid
at the first budget; at later ones three rates of the 1-3-10 ladder centred on the previous budget's best,
when that is known), a best rate at the edge of the grid adds the next rate beyond it (``--max-extend``
times), the best on validation is scored (test loss, BLEU, chrF) and the further seeds run at that rate.
With ``--lr-auto`` the LR finder (``statetune.train.lr_finder``) picks the rate instead of the sweep.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from statetune.train.lr_finder import find_lr

from . import curves_report, methods, points
from .bench import Bench, lr_grid, rel

#: Built-in guesses from the recorded 40-step benchmark (2 threads on a quiet machine, shipped model,
#: full-size validation and test): seconds of one optimizer step of batch 8, of a run's other work (start-up,
#: five validations), and of scoring one trained model (the run's wall time less its training, split over
#: its 38 runs and 25 scorings). The plan uses the results file's measured values once it has any: a busy
#: machine is several times slower.
STEP_S = {"state": 0.7, "lora": 0.85, "full": 0.85}
RUN_OVERHEAD_S = 13.0
SCORE_S = 15.0
#: The LR finder's decades per family (peak rates), and its steps per trial.
FINDER_RANGE = {"state": (0.1, 100.0), "lora": (1e-4, 1e-1), "full": (1e-5, 1e-2)}


def family(method: str) -> str:
    return "state" if methods.get(method)[2] else ("lora" if method == "lora" else "full")


def budget_for(steps: int, batch_size: int) -> methods.Budget:
    """The schedule of one budget: warmup ``steps // 6``, validation every ``steps // 5`` steps."""
    return methods.Budget(steps, batch_size, eval_every=max(1, steps // 5), warmup=max(1, steps // 6))


def ladder_index(lr: float) -> int:
    """Position of the nearest rate (in log space) on the 1-3-10 ladder (..., 0.3, 1, 3, 10, ...)."""
    i0 = math.floor(2 * math.log10(lr))
    return min(range(i0 - 1, i0 + 3), key=lambda i: abs(math.log10(ladder(i) / lr)))


def ladder(i: int) -> float:
    """The ``i``-th ladder rate: index 0 is 1, 1 is 3, 2 is 10, -1 is 0.3, ..."""
    decade, half = divmod(i, 2)
    return float(f"{(3.0 if half else 1.0) * 10.0 ** decade:.6g}")


def centred(lr: float) -> list[float]:
    """Three ladder rates around ``lr``, the centre first."""
    i = ladder_index(lr)
    return [ladder(i), ladder(i - 1), ladder(i + 1)]


def setup_of(args) -> dict:
    """What must be equal for two invocations' points to be comparable (and so to share a results file)."""
    return {"model": rel(args.model), "data": rel(args.data), "val_records": args.val_records,
            "test_refs": args.test_refs, "test_prompts": args.test_prompts, "max_new_tokens": args.max_new_tokens,
            "shots": args.shots, "batch_size": args.batch_size, "general_bytes": args.general_bytes,
            "general_text": rel(args.general_text), "quick": args.quick}


@dataclass
class Task:
    """One unit of planned work."""

    kind: str          # "sweep" | "seed" | "finder"
    method: str
    budget: int
    seed: int = 0
    grid: list[float] | None = None
    note: str = ""

    def runs(self) -> int:
        return len(self.grid or []) if self.kind == "sweep" else 1


class Curves(Bench):
    """The learning-curve benchmark: reuses :class:`Bench`'s split, probe and context."""

    def __init__(self, args, command: str):
        self.setup = setup_of(args)
        self.merged = points.read(args.json, self.setup)  # refuse another setup's file before any work
        super().__init__(args, command)
        self.id = uuid.uuid4().hex[:12]
        r = self.results
        self.mine = {**points.empty(self.setup), "model": r["model"], "data": r["data"], "machine": r["machine"]}
        self.invocation = {"id": self.id, "command": command, "date": r["date"], "methods": args.methods,
                           "budgets": args.budgets, "threads": r["machine"]["threads"], "complete": False}

    # -- planning ----------------------------------------------------------------------------------------
    def seeds_for(self, budget: int) -> int:
        a = self.args
        return a.seeds_largest if budget == max(a.budgets) and a.seeds_largest is not None else a.seeds

    def grid_for(self, method: str, budget: int) -> tuple[list[float], str]:
        a = self.args
        if method in a.lr_grid:
            return a.lr_grid[method], "from --lr"
        if a.quick:
            return lr_grid(method)[:1], "quick: first rate of the built-in grid"
        smaller = [b for b in sorted({p["budget"] for p in points.at_method(self.merged, method)} | set(a.budgets))
                   if b < budget]
        for prev in reversed(smaller):
            best = points.chosen_lr(self.merged, method, prev)
            if best is not None:
                return centred(best), f"centred on budget {prev}'s best ({best:g})"
            if prev in a.budgets:
                return [], f"centred on budget {prev}'s best (known once it has run)"
        return lr_grid(method), "built-in grid"

    def plan(self) -> list[Task]:
        """The work of this invocation in order; with ``--resume``, without what the results file has."""
        a, tasks = self.args, []
        for budget in sorted(a.budgets):
            for m in a.methods:
                lr = points.chosen_lr(self.merged, m, budget)
                if a.seeds_only and lr is None:
                    raise SystemExit(f"--seeds-only: {m} at {budget} steps has no swept LR in {a.json} yet; "
                                     "run its sweep first (without --seeds-only)")
                if a.lr_auto:
                    tasks.append(Task("finder", m, budget, note=f"finder, {a.finder_steps} steps per rate"))
                elif not a.seeds_only:
                    grid, note = self.grid_for(m, budget)
                    if not (a.resume and self.swept(m, budget, grid)):
                        tasks.append(Task("sweep", m, budget, grid=grid or [math.nan] * 3, note=note))
                for seed in range(1, self.seeds_for(budget)):
                    if not (a.resume and lr is not None and self.has(m, budget, lr, seed)):
                        tasks.append(Task("seed", m, budget, seed=seed))
        return tasks

    def has(self, method: str, budget: int, lr: float, seed: int) -> bool:
        """The sweep (or a further seed) has a scored run at this rate and seed."""
        return any(p["lr"] == lr and p["seed"] == seed and p.get("scored") and points.is_sweep(p)
                   for p in points.at(self.merged, method, budget))

    def swept(self, method: str, budget: int, grid: list[float]) -> bool:
        """Every rate of ``grid`` has a seed-0 run and the best of them was scored."""
        done = {p["lr"] for p in points.sweep_runs(self.merged, method, budget)}
        best = points.chosen_lr(self.merged, method, budget)
        return bool(grid) and set(grid) <= done and best is not None and self.has(method, budget, best, 0)

    def measured(self, method: str) -> list[dict]:
        return [p for p in self.merged.get("points", []) if family(p["method"]) == family(method) and p.get("run_s")]

    def step_seconds(self, method: str) -> float:
        """Seconds per optimizer step (training only): measured if the file has points of this family."""
        done = self.measured(method)
        if done:
            return sum(p["train_s"] for p in done) / sum(p["budget"] for p in done)
        return STEP_S[family(method)] * self.args.batch_size / 8

    def run_overhead(self, method: str) -> float:
        """Seconds per training run besides its steps (start-up, the validations, the best state)."""
        done = self.measured(method)
        return sum(p["run_s"] - p["train_s"] for p in done) / len(done) if done else RUN_OVERHEAD_S

    def score_seconds(self) -> float:
        """Seconds to score one trained model (test loss, generation, speed): measured if the file has any."""
        done = [p["score_s"] for p in self.merged.get("points", []) if p.get("score_s")]
        return sum(done) / len(done) if done else SCORE_S

    def estimate(self, t: Task) -> float:
        step, over, score = self.step_seconds(t.method), self.run_overhead(t.method), self.score_seconds()
        if t.kind == "finder":
            n_rates = len(self.finder_rates(t.method)) + 2
            return n_rates * (step * self.args.finder_steps + over) + step * t.budget + over + score
        return t.runs() * (step * t.budget + over) + score

    def print_plan(self) -> float:
        total = 0.0
        print(f"results file: {rel(self.args.json)}; budgets {self.args.budgets}, methods {self.args.methods}")
        for t in self.plan():
            s = self.estimate(t)
            total += s
            what = (f"sweep {', '.join('?' if math.isnan(x) else f'{x:g}' for x in t.grid or [])}"
                    if t.kind == "sweep" else "LR finder + 1 run" if t.kind == "finder" else f"seed {t.seed}")
            print(f"  {t.method:<22} {t.budget:>5} steps  {what:<28} ~{s / 60:5.1f} min  {t.note}")
        print(f"estimated total: {total / 60:.1f} min (+ ~2 min setup and baselines); a rate at a grid edge "
              f"adds up to {self.args.max_extend} run(s) per sweep")
        return total

    # -- running -----------------------------------------------------------------------------------------
    def finder_rates(self, method: str) -> list[float]:
        low, high = FINDER_RANGE[family(method)]
        n = round(math.log10(high / low))
        return [float(f"{low * 10 ** i:.6g}") for i in range(n + 1)]

    def point(self, name: str, budget: int, lr: float, seed: int, t: methods.Trained, run_s: float,
              scored: bool, source: str = "sweep") -> dict:
        b = budget_for(budget, self.args.batch_size)
        p = {"method": name, "budget": budget, "lr": lr, "seed": seed, "batch_size": b.batch_size,
             "warmup": b.warmup, "eval_every": b.eval_every, "trainable": t.trainable,
             "stored_bytes": t.stored_bytes, "stored_what": t.stored_what, "train_s": t.train_s, "run_s": run_s,
             "best_val": t.best_val, "curve": t.curve, "scored": scored, "source": source,
             "invocation": self.id}
        if scored:
            t0 = time.perf_counter()
            p.update(self.scored_row(t))
            if self.args.scale_sweep and t.state is not None:
                p["scale"] = self.scale_sweep(t)
            p["score_s"] = time.perf_counter() - t0
        return p

    def scale_sweep(self, t: methods.Trained) -> dict:
        """``--scale-sweep``: validation loss of the trained state times each factor; the best factor (on
        validation) is scored on the test split like the point itself (test loss, BLEU, chrF)."""
        from statetune.data.loader import TokenDataset
        from statetune.objective import dataset_loss

        val = TokenDataset(self.ctx.val_path, self.model.config.vocab_size)
        losses = [(a, dataset_loss(self.model, val, t.state.scaled(a), self.args.batch_size).loss)
                  for a in sorted(set(self.args.scale_sweep) | {1.0})]
        best = min(losses, key=lambda x: (x[1], abs(x[0] - 1)))[0]
        out = {"val": losses, "best": best}
        if best != 1.0:
            row = self.scored_row(methods.Trained(**{**vars(t), "state": t.state.scaled(best)}))
            out.update({k: row[k] for k in ("test_loss", "bleu", "chrf", "rouge_l", "samples")})
        return out

    def scored_row(self, t: methods.Trained) -> dict:
        from . import measure

        base_general = self.mine["baselines"]["zero_shot"].get("general_loss")
        return measure.score(t.model, self.tok, self.probe, t.state, t.weights_changed, base_general)

    def train(self, name: str, budget: int, lr: float | str, seed: int) -> tuple[methods.Trained, float]:
        t0 = time.perf_counter()
        t = methods.get(name)[0](self.ctx, budget_for(budget, self.args.batch_size), lr, seed)
        return t, time.perf_counter() - t0

    def add(self, p: dict) -> None:
        self.mine["points"] = [q for q in self.mine["points"] if points.key(q) != points.key(p)] + [p]
        self.persist()

    def persist(self) -> None:
        self.invocation["elapsed_s"] = time.perf_counter() - self.t0
        self.mine["invocations"] = [self.invocation]
        self.merged = points.save(self.args.json, self.mine)
        curves_report.render(self.merged, self.args)

    def baselines_once(self) -> None:
        """Zero-shot and few-shot prompting, scored once per results file (they depend only on the setup)."""
        from . import measure

        if {"zero_shot", "few_shot"} <= set(self.merged.get("baselines", {})):
            self.mine["baselines"] = dict(self.merged["baselines"])
            return
        for name, state, val in (("zero_shot", None, self.results["base_val"]),
                                 ("few_shot", self.few_state, self.results["few_shot_val"])):
            base_general = self.mine["baselines"].get("zero_shot", {}).get("general_loss")
            row = {"method": name, "best_val": val, "trainable": 0}
            row.update(measure.score(self.model, self.tok, self.probe, state, False,
                                     base_general if state is not None else None))
            self.mine["baselines"][name] = row
            self.log(f"{name}: test loss {row['test_loss']:.4f}, BLEU {row['bleu']:.1f}")
        self.persist()

    def sweep(self, name: str, budget: int) -> float:
        """Seed 0 at each rate of the grid (extended past an edge that wins); the best is scored.

        Every run is written to the results file as soon as it ends (unscored), so a sweep killed part-way
        keeps what it tried; with ``--resume`` the rates the file already has are not trained again, and the
        best of them is retrained (same seed, same result) only if it was never scored.
        """
        grid, note = self.grid_for(name, budget)
        if not grid:  # the previous budget's sweep did not finish: fall back to the built-in grid
            grid, note = lr_grid(name), "built-in grid (the previous budget has no result)"
        prior = {p["lr"]: p for p in points.sweep_runs(self.merged, name, budget)} if self.args.resume else {}
        tried: dict[float, float] = {}
        best: tuple[float, methods.Trained | None, float] | None = None  # (lr, run if trained here, seconds)
        extend = self.args.max_extend if len(grid) > 1 else 0
        queue = list(grid)
        while queue:
            lr = queue.pop(0)
            if lr in prior:
                t, run_s, val = None, prior[lr].get("run_s", 0.0), prior[lr]["best_val"]
                self.log(f"{name} {budget} steps lr={lr:g}: best val {val:.4f} (from the results file)")
            else:
                t, run_s = self.train(name, budget, lr, 0)
                val = t.best_val
                self.add(self.point(name, budget, lr, 0, t, run_s, scored=False))
                self.log(f"{name} {budget} steps lr={lr:g}: best val {val:.4f} ({run_s:.0f}s)")
            if best is None or val < tried[best[0]]:
                best = (lr, t, run_s)
            tried[lr] = val
            if not queue and extend > 0:
                lo, hi = min(tried), max(tried)
                edge = best[0]
                if edge in (lo, hi) and len(tried) > 1:
                    step = 1 if edge == hi else -1
                    queue.append(ladder(ladder_index(edge) + step))
                    extend -= 1
        assert best is not None
        lr, t, run_s = best
        if t is None and prior[lr].get("scored"):
            self.log(f"{name} {budget} steps: chose lr {lr:g} ({note}; scored earlier)")
            return lr
        if t is None:
            self.log(f"{name} {budget} steps: retraining lr {lr:g} to score it (its run was not scored)")
            t, run_s = self.train(name, budget, lr, 0)
        self.add(self.point(name, budget, lr, 0, t, run_s, scored=True))
        self.log(f"{name} {budget} steps: chose lr {lr:g} ({note})")
        return lr

    def finder(self, name: str, budget: int) -> float:
        """Pick the rate by search and train at it: state methods through statetune's own ``train --lr auto``
        (its search, then the run), LoRA and full fine-tuning through the same rule (``find_lr``) over the
        benchmark's training function."""
        b = self.args.batch_size
        t0 = time.perf_counter()
        if family(name) == "state":
            self.ctx.lr_search = (self.args.finder_steps, self.finder_rates(name))
            t, run_s = self.train(name, budget, "auto", 0)
            search = t.extra["lr_search"]
            for trial in search["trials"]:
                self.log(f"{name} train --lr auto lr={trial['lr']:g}: held-out {trial['loss']}")
            entry = {"method": name, "budget": budget, "pick": search["lr"], "via": "statetune train --lr auto",
                     "search_s": sum(x["seconds"] for x in search["trials"]), **search, "invocation": self.id}
        else:
            def trial(lr: float, steps: int) -> float:
                return methods.get(name)[0](self.ctx, budget_for(steps, b), lr, 0).curve[-1][1]

            found = find_lr(trial, rates=self.finder_rates(name), steps=self.args.finder_steps,
                            on_trial=lambda r: self.log(f"{name} finder lr={r.lr:g}: held-out {r.loss:.4f}"))
            entry = {"method": name, "budget": budget, "pick": found.lr, "via": "find_lr over the benchmark's loop",
                     "search_s": time.perf_counter() - t0, **found.as_dict(), "invocation": self.id}
            t = None
        pick = entry["pick"]
        self.mine["finder"] = [f for f in self.mine["finder"] if (f["method"], f["budget"]) != (name, budget)]
        self.mine["finder"].append(entry)
        known = [p for p in points.sweep_runs(self.merged, name, budget) if p["lr"] == pick and p.get("scored")]
        if known:  # the sweep trained and scored this rate already: its point stays (the table reads it)
            self.persist()
        else:
            if t is None:
                t, run_s = self.train(name, budget, pick, 0)
            self.add(self.point(name, budget, pick, 0, t, run_s, scored=True, source="finder"))
        self.log(f"{name} {budget} steps: finder picked lr {pick:g} in {entry['search_s']:.0f}s of search")
        return pick

    def seed_run(self, name: str, budget: int, seed: int) -> None:
        lr = self.picked.get((name, budget)) or points.chosen_lr(self.merged, name, budget)
        if lr is None:
            raise SystemExit(f"{name} at {budget} steps: no chosen LR to run seed {seed} at")
        if self.args.resume and self.has(name, budget, lr, seed):
            return
        t, run_s = self.train(name, budget, lr, seed)
        p = self.point(name, budget, lr, seed, t, run_s, scored=True)
        self.add(p)
        self.log(f"{name} {budget} steps lr={lr:g} seed {seed}: test {p['test_loss']:.4f}, BLEU {p['bleu']:.1f}")

    def run(self) -> None:
        a = self.args
        tasks = self.plan()
        self.log(f"curves: budgets {a.budgets}, methods {a.methods}, {len(tasks)} tasks, results {rel(a.json)}")
        self.picked: dict[tuple[str, int], float] = {}
        self.baselines_once()
        stopped = False
        for t in tasks:
            if self.out_of_time():
                stopped = True
                break
            if t.kind == "seed":
                self.seed_run(t.method, t.budget, t.seed)
            else:
                pick = self.finder(t.method, t.budget) if t.kind == "finder" else self.sweep(t.method, t.budget)
                self.picked[(t.method, t.budget)] = pick
        self.invocation["complete"] = not stopped
        if stopped:
            self.invocation["stopped"] = self.results.get("stopped")
        self.persist()
        self.log(f"wrote {rel(a.json)} and {rel(a.report)}")


def curves_main(args, command: str) -> int:
    """Plan or run the learning curves (``quality_e2e.py --budgets ...``)."""
    if args.plan:
        Planner(args).print_plan()
        return 0
    Curves(args, command).run()
    return 0


class Planner(Curves):
    """What ``--plan`` needs of :class:`Curves` without loading data or models."""

    def __init__(self, args):  # noqa: D107 (deliberately skips the heavy setup)
        self.args = args
        self.merged = points.read(args.json) if Path(args.json).exists() else points.empty({})
