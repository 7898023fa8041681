"""Search quality: the accuracy-vs-latency front prunesearch finds, against uniform ratios and
random search, at equal budgets of finetuned trials.

    python -m benchmarks.quality            # quick: shifted_digits, 3 seeds x 12 trials per arm (~3 min)
    python -m benchmarks.quality --tasks digits,shifted_digits   # quick, both tasks (~6.5 min)
    python -m benchmarks.quality --full     # 5 seeds x 32 trials (budgets 8/16/32), 2 finetune epochs,
                                            # plus Torch-Pruning's global pruning as a fourth arm
    python -m benchmarks.quality --tiny     # smoke test: digits, 1 seed, 2 trials per arm

Every arm is the real product (config -> prepare -> run_search on the local Ray cluster, SQLite
study, MLflow runs), with every early-stop rule off, so each arm finetunes exactly its budget.
What each arm gets:

- prunesearch: the product's defaults and nothing else: its default ``search.anchors`` (4 first
  trials with every layer at one ratio, 0.8 / 0.4 / 0.2 / 0.6, criterion l1, no rounding; after
  them, sampled ratios are capped at the lowest anchor ratio whose model fell under base - 0.10),
  then TPE (random until 8 trials are complete, anchors included, then multi-objective TPE);
  per-layer ratios in [0, 0.8], criteria l1/l2/bn_scale/lamp, round_to 1/8;
- random search: the same space, Optuna's RandomSampler, the same seed, anchors off
  (``search.anchors: 0``): plain random search, every trial sampled;
- uniform: Torch-Pruning's default recipe, one ratio for every layer, magnitude importance (l2,
  TP's quick-start default), no rounding; N trials enqueued at N evenly spaced ratios in (0, 0.8];
- (--full) TP global pruning: the same N ratios with global_pruning on.

A smaller budget B is read from the first B trials of the run (the uniform sweep is enqueued so
that its first B trials are themselves an evenly spaced sweep). After each seed, every model
found by any arm is rebuilt from its plan and timed again, all arms interleaved in one process,
so load on the machine hits every arm alike; latency is reported as a fraction of the base
model's, timed in the same passes. Hypervolume reference: (latency 1.0 = the base model,
accuracy = base - 0.10), the same for every arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from torch import nn

from orchestrator import Config, Point, config_from_dict, hypervolume, prepare, run_search
from orchestrator._config import SearchConfig
from search_space import PruningPlan, architecture_signature
from workers import Target, Task, apply_plan, build_task

from ._results import RESULTS, table, time_interleaved, write_section

MAX_RATIO = 0.8  # every arm's ratios lie in [0, MAX_RATIO]
ANCHORS = SearchConfig().anchors  # the product's default, which the prunesearch arm runs with
FLOOR = 0.10  # hypervolume's accuracy reference: base accuracy minus this
DROP = 0.01  # "within one point": accuracy >= base - DROP
RULES_OFF = {"reject_infeasible": False, "reject_dominated": False, "stop_hopeless": False}
# Each task's target: digits at batch 1 (per-op overhead dominates), shifted_digits at batch 16
# (compute dominates). The search times with a cheap target; the score re-times (see remeasure).
TASKS = {"digits": 1, "shifted_digits": 16}


@dataclass(frozen=True)
class Arm:
    label: str
    key: str
    sampler: str
    space: dict[str, Any]
    sweep: bool = False  # trials enqueued at evenly spaced uniform ratios
    anchors: int | None = None  # search.anchors; None: the product's default
    baseline: bool = True  # judged against prunesearch (an ablation of prunesearch is not)


SEARCH_SPACE: dict[str, Any] = {"ratio": [0.0, MAX_RATIO]}  # the rest: prunesearch's defaults
SWEEP_SPACE: dict[str, Any] = {"granularity": "uniform", "ratio": [0.0, MAX_RATIO], "step": 0.005,
                               "criteria": ["l2"], "round_to": [1]}
ARMS = (
    Arm("prunesearch (TPE)", "tpe", "tpe", SEARCH_SPACE),
    Arm("random search", "random", "random", SEARCH_SPACE, anchors=0),
    Arm("uniform (TP default)", "uniform", "random", SWEEP_SPACE, sweep=True, anchors=0),
)
# --ablation: prunesearch with its anchors off (TPE alone), to show what the anchors do.
NO_ANCHORS_ARM = Arm("prunesearch, anchors off", "tpe-no-anchors", "tpe", SEARCH_SPACE, anchors=0, baseline=False)
GLOBAL_ARM = Arm("TP global pruning", "global", "random", {**SWEEP_SPACE, "global_pruning": [True]}, sweep=True,
                 anchors=0)


@dataclass(frozen=True)
class Settings:
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    budgets: tuple[int, ...]  # the last is the run's length; each earlier one divides it by a power of 2
    epochs: int
    arms: tuple[Arm, ...] = ARMS
    passes: int = 5  # interleaved timing passes per model when re-measuring

    @property
    def trials(self) -> int:
        return self.budgets[-1]


MODES = {
    "tiny": Settings(("digits",), (0,), (1, 2), 1, passes=2),
    # Quick: one task keeps `make bench` under 15 minutes (both tasks: ~6.5 min of it); shifted_digits,
    # at batch 16, is the compute-bound case. `--tasks digits,shifted_digits` runs both.
    "quick": Settings(("shifted_digits",), (0, 1, 2), (6, 12), 1),
    "full": Settings(tuple(TASKS), (0, 1, 2, 3, 4), (8, 16, 32), 2, arms=(*ARMS, GLOBAL_ARM)),
}


# -- running one arm -------------------------------------------------------------------------
def sweep_params(trials: int, global_pruning: bool) -> list[dict[str, Any]]:
    """N evenly spaced ratios in (0, MAX_RATIO], ordered so that the first N/2^j of them are an
    evenly spaced sweep of N/2^j ratios too (multiples of 2^j first)."""

    def twos(k: int) -> int:
        return (k & -k).bit_length()

    order = sorted(range(1, trials + 1), key=lambda k: (-twos(k), k))
    return [{"ratio/all": round(round(MAX_RATIO * k / trials / 0.005) * 0.005, 3), "criterion": "l2",
             "round_to": 1, "global_pruning": global_pruning, "isomorphic": False, "iterative_steps": 1}
            for k in order]


def arm_config(arm: Arm, task: str, seed: int, s: Settings, tmp: Path) -> Config:
    name = f"q-{task}-{arm.key}-{seed}"
    search = {"trials": s.trials, "concurrency": 2, "seed": seed, "sampler": arm.sampler,
              "early_stop": RULES_OFF, "space": arm.space}
    if arm.anchors is not None:
        search["anchors"] = arm.anchors
    return config_from_dict({
        "name": name, "task": task,
        "search": search,
        "finetune": {"epochs": s.epochs, "lr": 0.01},
        "target": {"batch_size": TASKS[task], "threads": 1, "warmup": 3, "rounds": 3, "runs": 10},
        "storage": f"sqlite:///{tmp}/{name}.db",
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "register": False},  # not what is measured
    })


def run_arm(arm: Arm, task: str, seed: int, s: Settings, tmp: Path) -> dict[str, Any]:
    config = arm_config(arm, task, seed, s, tmp)
    if arm.sweep:
        study = optuna.create_study(study_name=config.name, storage=config.storage,
                                    directions=["maximize", "minimize"])
        for params in sweep_params(s.trials, bool(arm.space.get("global_pruning"))):
            study.enqueue_trial(params)
    t0 = time.perf_counter()
    outcome = run_search(prepare(config), progress=lambda line: None)
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    records = [{"number": t.number, "accuracy": t.values[0], "plan": t.user_attrs["plan"],
                "signature": t.user_attrs["signature"],
                "finetune_s": t.user_attrs.get("seconds", {}).get("finetune", 0.0)} for t in done]
    print(f"quality: {task} seed {seed} {arm.label}: {len(done)}/{s.trials} finetuned, {wall:.0f} s",
          file=sys.stderr, flush=True)
    return {"records": records, "base_accuracy": outcome.base["accuracy"], "wall_s": wall}


# -- timing every model of a seed side by side ------------------------------------------------
def remeasure(task: Task, runs: list[dict[str, Any]], batch: int, passes: int, seed: int) -> dict[str, float]:
    """Median latency (ms) of every architecture any arm found, and of the base model ("base"):
    each pass times every model once, in a fresh random order."""
    models = {"base": task.model}
    for run in runs:
        for rec in run["records"]:
            if rec["signature"] not in models:
                models[rec["signature"]] = rebuild(task, rec)
    target = Target(batch_size=batch, threads=1, warmup=3, rounds=1, runs=10)
    return time_interleaved(models, task.example_inputs, target, passes, seed)


def rebuild(task: Task, rec: dict[str, Any]) -> nn.Module:
    model = apply_plan(task.model, task.example_inputs, PruningPlan.from_dict(rec["plan"]))
    if architecture_signature(model) != rec["signature"]:
        raise RuntimeError(f"trial {rec['number']}: its plan rebuilt another architecture than the one it timed")
    return model


# -- scores ----------------------------------------------------------------------------------
def scores(run: dict[str, Any], budget: int, lat: dict[str, float], ref_2x: float | None) -> dict[str, Any]:
    """One arm, one seed, one budget: hypervolume, accuracy at the 2x-uniform latency, best
    speed-up within one point of the base accuracy."""
    base_acc = run["base_accuracy"]
    pts = [Point(r["number"], r["accuracy"], lat[r["signature"]] / lat["base"])
           for r in run["records"] if r["number"] < budget]
    at_2x = [p.accuracy for p in pts if ref_2x is not None and p.latency_ms <= ref_2x + 1e-12]
    within = [1.0 / p.latency_ms for p in pts if p.accuracy >= base_acc - DROP - 1e-12 and p.latency_ms < 1.0]
    return {"hv": hypervolume(pts, 1.0, base_acc - FLOOR), "acc_2x": max(at_2x, default=None),
            "speedup": max(within, default=1.0), "n": len(pts),  # 1.0: the base model itself
            "finetune_s": sum(r["finetune_s"] for r in run["records"] if r["number"] < budget)}


def uniform_2x(run: dict[str, Any], lat: dict[str, float]) -> float | None:
    """Relative latency of the least-pruned uniform model that is at least 2x faster than base."""
    rel = [lat[r["signature"]] / lat["base"] for r in run["records"]]
    fast = [x for x in rel if x <= 0.5]
    return max(fast) if fast else None


def one_seed(task_name: str, seed: int, s: Settings, tmp: Path) -> dict[str, Any]:
    """Every arm once (order rotated per seed), then every model re-timed side by side."""
    arms = list(s.arms)
    k = seed % len(arms)
    runs = {arm.key: run_arm(arm, task_name, seed, s, tmp) for arm in arms[k:] + arms[:k]}
    task = build_task(task_name)
    lat = remeasure(task, list(runs.values()), TASKS[task_name], s.passes, seed)
    ref = uniform_2x(runs["uniform"], lat)
    hv = {(a, b): scores(r, b, lat, ref)["hv"] for a, r in runs.items() for b in s.budgets}
    print(f"quality: {task_name} seed {seed} hypervolume: "
          + ", ".join(f"{a}@{b} {v:.4f}" for (a, b), v in hv.items()), file=sys.stderr, flush=True)
    return {"ref_2x": ref, "base_ms": lat["base"], "wall_s": {a: r["wall_s"] for a, r in runs.items()},
            "scores": {(a, b): scores(r, b, lat, ref) for a, r in runs.items() for b in s.budgets}}


# -- the report ------------------------------------------------------------------------------
def spread(values: list[float | None], fmt: str) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "n/a"
    missing = f", {len(values) - len(got)} seed(s) none" if len(got) < len(values) else ""
    text = fmt.format(statistics.median(got))
    return text if len(got) == 1 and not missing else f"{text} [{fmt.format(min(got))}-{fmt.format(max(got))}{missing}]"


def task_rows(task: str, seeds: list[dict[str, Any]], s: Settings) -> list[dict[str, Any]]:
    rows = []
    for b in s.budgets:
        for arm in s.arms:
            per = [sd["scores"][(arm.key, b)] for sd in seeds]
            ours = [sd["scores"][("tpe", b)]["hv"] for sd in seeds]
            wins = sum(o > p["hv"] + 1e-12 for o, p in zip(ours, per, strict=True))
            rows.append({"task": task, "budget": b, "arm": arm.label,
                         "hypervolume": spread([p["hv"] for p in per], "{:.4f}"),
                         "acc @ 2x-uniform latency": spread([p["acc_2x"] for p in per], "{:.4f}"),
                         "best speed-up, <= 1 pt drop": spread([p["speedup"] for p in per], "{:.2f}x"),
                         "finetuned": statistics.median(p["n"] for p in per),
                         "finetune s": f"{statistics.median(p['finetune_s'] for p in per):.1f}",
                         "prunesearch HV higher": "-" if arm.key == "tpe" else f"{wins}/{len(per)} seeds"})
    return rows


def verdicts(results: dict[str, list[dict[str, Any]]], s: Settings) -> list[str]:
    """Where prunesearch's median hypervolume is not above a baseline's, plainly."""
    lines = []
    for task, seeds in results.items():
        for b in s.budgets:
            med = {a.key: statistics.median(sd["scores"][(a.key, b)]["hv"] for sd in seeds) for a in s.arms}
            for arm in (a for a in s.arms if a.baseline and a.key != "tpe"):
                if med["tpe"] <= med[arm.key] + 1e-12:
                    lines.append(f"- {task}, budget {b}: prunesearch {med['tpe']:.4f} <= {arm.label} "
                                 f"{med[arm.key]:.4f} (median hypervolume): **not beaten**.")
    return lines or ["- none: prunesearch's median hypervolume is above every baseline's at every budget reported."]


def report(results: dict[str, list[dict[str, Any]]], s: Settings, wall: float) -> str:
    rows = [r for task, seeds in results.items() for r in task_rows(task, seeds, s)]
    refs = "; ".join(f"{t}: base {statistics.median(sd['base_ms'] for sd in seeds):.3f} ms at batch {TASKS[t]}, "
                     f"2x-uniform model at {spread([sd['ref_2x'] for sd in seeds], '{:.3f}')} x base latency"
                     for t, seeds in results.items())
    return (f"## Search quality\n\nTasks {', '.join(results)}; {len(s.seeds)} seed(s); budgets {list(s.budgets)} "
            f"finetuned trials per arm ({s.epochs} finetune epoch(s) each, every early-stop rule off); arms "
            f"{', '.join(a.label for a in s.arms)}. Each arm is a real prunesearch run; the uniform arm's trials "
            f"are enqueued at evenly spaced ratios in (0, {MAX_RATIO}] (l2 magnitude, one ratio for all layers). "
            "Latency: every model of a seed re-timed side by side after the seed's runs "
            f"({s.passes} interleaved passes, median), as a fraction of the base model's. Hypervolume reference: "
            f"latency 1.0 (base), accuracy base - {FLOOR:.2f}. Cells: median [min-max] over seeds. "
            f"'acc @ 2x-uniform latency': best accuracy at or below the latency of the least-pruned uniform model "
            f"that is >= 2x faster than base (n/a: none was, or the arm found nothing that fast). 'Best speed-up': "
            f"fastest model within {DROP * 100:.0f} point of base accuracy (1.00x: none faster than base). prunesearch runs with the product's defaults: its first "
            f"{ANCHORS} trials are the default anchors (every layer at one ratio, evenly spaced up to {MAX_RATIO}; "
            "later ratios capped at the lowest anchor ratio that fell under base - 0.10), then TPE (random until 8 "
            "trials are complete). Random search: same space and seed, anchors off.\n\n"
            f"Reference latencies: {refs}.\n\n" + table(rows, list(rows[0]))
            + "\n\nWhere prunesearch does not beat a baseline:\n\n" + "\n".join(verdicts(results, s))
            + f"\n\nWall time: {wall / 60:.1f} min.\n")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true")
    p.add_argument("--tiny", action="store_true", help="smoke test: digits, 1 seed, 2 trials per arm")
    p.add_argument("--ablation", action="store_true", help="add an arm: prunesearch with its anchors off")
    p.add_argument("--tasks", help="comma-separated tasks (default: the mode's)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    s = MODES["tiny" if args.tiny else "full" if args.full else "quick"]
    if args.ablation:
        s = dataclasses.replace(s, arms=(*s.arms, NO_ANCHORS_ARM))
    if args.tasks:
        s = dataclasses.replace(s, tasks=tuple(args.tasks.split(",")))
    t0 = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in s.tasks:
            results[task] = [one_seed(task, seed, s, Path(tmp)) for seed in s.seeds]
    return write_section("quality", report(results, s, time.perf_counter() - t0), args.out)


if __name__ == "__main__":
    print(main())
