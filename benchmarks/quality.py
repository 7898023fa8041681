"""Search quality: the accuracy-vs-latency front prunesearch finds, against a uniform ratio sweep,
Torch-Pruning's global pruning and random search, at equal budgets of finetuned trials.

    python -m benchmarks.quality            # quick: shifted_digits, 3 seeds, budgets 6/12
    python -m benchmarks.quality --tasks digits,shifted_digits,colour_shapes --seeds 5
    python -m benchmarks.quality --full     # every task, 5 seeds, budgets 6/12/24, 1 finetune epoch
    python -m benchmarks.quality --tiny     # smoke test: digits, 1 seed, 2 trials per arm
    python -m benchmarks.quality --tasks my_pkg.tasks:build   # your own model family, same arms

Every arm is the real product (config -> prepare -> run_search on the local Ray cluster, SQLite
study, MLflow runs), with every early-stop rule off, so each arm finetunes exactly its budget.
What each arm gets:

- prunesearch (default): the product's defaults and nothing else: latency-aware allocation
  (``granularity: allocation``: a level and a blend towards uniform, criteria l1/l2/bn_scale/lamp,
  round_to 1/8; residual blocks droppable whole, ``search.space.depth`` null), ``search.screen``
  (96 candidates screened with adaptive BN on training data,
  half of them held to uniform plans, the proxy-best of each latency bin finetuned), ratios in
  [0, 0.8];
- (``--arms ...,split,no-split``, not baselines) the default with half its screen held to
  uniform plans (``search.screen.uniform_share`` 0.5) and with only the seeded uniform levels (0);
- (``--arms ...,table,no-table``, not baselines) the default with ``search.screen.table`` on (each
  group pruned alone at 3 ratios and screened first: the allocator's importance and cost data)
  and off (first-order Taylor importances, the MACs cost model until its refit);
- random search: per-layer ratios in [0, 0.8] and the same criteria, Optuna's RandomSampler, no
  screen, no anchors: plain random search, every trial sampled;
- uniform (TP default): one ratio for every layer, l2 magnitude (TP's quick-start default), no
  rounding; N trials enqueued at N evenly spaced ratios in (0, 0.8];
- TP global pruning: the same N ratios with global_pruning on;
- uniform + screen: one ratio for every layer, with the same screen as the default spent on
  picking the ratio, criterion and rounding: the comparison that isolates allocation.

Two comparisons. Finetune-matched: every arm is read at the same number of finetuned trials B
(the first B of its run). Compute-matched: a baseline without a screen is read at B + E trials,
E = the default arm's screening worker-seconds divided by its mean finetuned trial's
worker-seconds (per seed), so it gets the screen's cost as extra finetuned trials.

After each seed, every model found by any arm is rebuilt from its plan and timed again, paired
against the base model (the product's paired protocol), all arms in one process in shuffled
orders, so load on the machine hits every arm alike; latency is that ratio to the base model's. Hypervolume reference: (latency 1.0 =
the base model, accuracy = base - 0.10), the same for every arm.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from torch import nn

from orchestrator import (
    Config,
    Point,
    config_from_dict,
    hypervolume,
    prepare,
    proxy_quality,
    run_search,
)
from search_space import PruningPlan, architecture_signature
from workers import Target, Task, apply_plan, build_task

from ._arms import (
    ABLATION_ARM,
    ARMS,
    DROP,
    FLOOR,
    KNOWN_ARMS,
    MAX_RATIO,
    MODES,
    OURS,
    RULES_OFF,
    SCREEN_FIELDS,
    SEARCH_SPACE,
    SWEEP_SPACE,
    TASKS,
    Arm,
    Settings,
    batch_of,
)
from ._quality_report import report
from ._results import RESULTS, paired_interleaved, worker_seconds, write_section

# The arms and settings live in ``_arms`` and the report in ``_quality_report``; these names are
# this module's public face (``benchmarks.ceiling`` and ``benchmarks.selection`` build on them).
__all__ = [
    "ARMS",
    "FLOOR",
    "MODES",
    "SEARCH_SPACE",
    "SWEEP_SPACE",
    "TASKS",
    "Arm",
    "Settings",
    "arm_config",
    "batch_of",
    "main",
    "remeasure",
    "run_arm",
]


# -- running one arm -------------------------------------------------------------------------
def sweep_params(trials: int, global_pruning: bool) -> list[dict[str, Any]]:
    """N evenly spaced ratios in (0, MAX_RATIO], ordered so that the first N/2^j of them are an
    evenly spaced sweep of N/2^j ratios too (multiples of 2^j first)."""

    def twos(k: int) -> int:
        return (k & -k).bit_length()

    order = sorted(range(1, trials + 1), key=lambda k: (-twos(k), k))
    return [
        {
            "ratio/all": round(round(MAX_RATIO * k / trials / 0.005) * 0.005, 3),
            "criterion": "l2",
            "round_to": 1,
            "global_pruning": global_pruning,
            "isomorphic": False,
            "iterative_steps": 1,
        }
        for k in order
    ]


def arm_config(
    arm: Arm, task: str, seed: int, s: Settings, tmp: Path, trials: int | None = None
) -> Config:
    # A module:build task's reference holds ':' and '.', which a study name may not.
    name = f"q-{re.sub(r'[^A-Za-z0-9_-]+', '-', task)}-{arm.key}-{seed}"
    search = {
        "trials": trials or s.trials,
        "concurrency": 2,
        "seed": seed,
        "sampler": arm.sampler,
        "early_stop": RULES_OFF,
        "space": arm.space,
    }
    if arm.anchors is not None:
        search["anchors"] = arm.anchors
    if arm.screen is not None:
        search["screen"] = {"candidates": arm.screen}
    elif s.screen is not None:
        search["screen"] = {"candidates": s.screen}
    for key in SCREEN_FIELDS:  # the arm's own screen settings; None: the product's default
        if (value := getattr(arm, key)) is not None:
            search["screen"] = {**search.get("screen", {}), key: value}
    return config_from_dict(
        {
            "name": name,
            "task": task,
            "task_options": s.task_options(seed),
            "search": search,
            "finetune": {"epochs": s.epochs, "lr": 0.01},
            "target": {
                "batch_size": batch_of(task),
                "threads": 1,
                "warmup": 3,
                "rounds": 3,
                "runs": 10,
                **s.timing,
            },
            "storage": f"sqlite:///{tmp}/{name}.db",
            "tracking": {
                "uri": f"sqlite:///{tmp}/mlflow.db",
                "register": False,
            },  # not what is measured
        }
    )


def run_arm(
    arm: Arm, task: str, seed: int, s: Settings, tmp: Path, extra: int = 0
) -> dict[str, Any]:
    """One arm's run: ``s.trials + extra`` finetuned trials (extra: compute-matched budget)."""
    trials = s.trials + extra
    config = arm_config(arm, task, seed, s, tmp, trials)
    if arm.sweep:
        study = optuna.create_study(
            study_name=config.name, storage=config.storage, directions=["maximize", "minimize"]
        )
        for params in sweep_params(trials, bool(arm.space.get("global_pruning"))):
            study.enqueue_trial(params)
    t0 = time.perf_counter()
    outcome = run_search(prepare(config), progress=lambda line: None)
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    done = sorted(
        (t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.number
    )
    records = [
        {
            "number": t.number,
            "accuracy": t.values[0],
            "latency_ms": t.values[1],  # as the search measured it (the score re-times)
            "plan": t.user_attrs["plan"],
            "signature": t.user_attrs["signature"],
            "worker_s": worker_seconds(t),
            "finetune_s": t.user_attrs.get("seconds", {}).get("finetune", 0.0),
        }
        for t in done
    ]
    screen = dict(study.user_attrs.get("screen") or {})
    print(
        f"quality: {task} seed {seed} {arm.label}: {len(done)}/{trials} finetuned, {wall:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return {
        "records": records,
        "base_accuracy": outcome.base["accuracy"],
        "base_latency_ms": outcome.base["latency_ms"],
        "wall_s": wall,
        "screen": screen,
        "proxy": proxy_quality(study.trials),
        "extra": extra,
    }


# -- timing every model of a seed side by side ------------------------------------------------
def remeasure(
    task: Task,
    runs: list[dict[str, Any]],
    batch: int,
    passes: int,
    seed: int,
    timing: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Latency of every architecture any arm found, as a fraction of the base model's ("base":
    1.0): each pass times every model paired against the base, in a fresh random order; the
    median over passes. Paired, because an absolute re-timing under load scattered: a digits
    plan whose paired ratio is 0.87 (four estimators agreeing within 5 %) was scored 1.15 by
    absolute medians of 5 passes on a loaded machine."""
    models = {"base": task.model}
    # Gradient criteria (taylor, hessian) rank on training batches, as the trials' did.
    batches = list(itertools.islice(iter(task.train_loader), 2))
    for run in runs:
        for rec in run["records"]:
            if rec["signature"] not in models:
                models[rec["signature"]] = rebuild(task, rec, batches)
    target = Target(batch_size=batch, threads=1, warmup=3, **(timing or {}))
    return paired_interleaved(models, "base", task.example_inputs, target, passes, seed)


def rebuild(task: Task, rec: dict[str, Any], batches: list) -> nn.Module:
    model = apply_plan(
        task.model, task.example_inputs, PruningPlan.from_dict(rec["plan"]), calibration=batches
    )
    if architecture_signature(model) != rec["signature"]:
        raise RuntimeError(
            f"trial {rec['number']}: its plan rebuilt another architecture than the one it timed"
        )
    return model


# -- scores ----------------------------------------------------------------------------------
def scores(
    run: dict[str, Any], budget: int, lat: dict[str, float], ref_2x: float | None
) -> dict[str, Any]:
    """One arm, one seed, one budget (its first ``budget`` finetuned trials): hypervolume,
    accuracy at the 2x-uniform latency, best speed-up within one point of the base accuracy."""
    base_acc = run["base_accuracy"]
    recs = run["records"][:budget]
    pts = [Point(r["number"], r["accuracy"], lat[r["signature"]] / lat["base"]) for r in recs]
    at_2x = [p.accuracy for p in pts if ref_2x is not None and p.latency_ms <= ref_2x + 1e-12]
    within = [
        1.0 / p.latency_ms
        for p in pts
        if p.accuracy >= base_acc - DROP - 1e-12 and p.latency_ms < 1.0
    ]
    return {
        "hv": hypervolume(pts, 1.0, base_acc - FLOOR),
        "acc_2x": max(at_2x, default=None),
        "speedup": max(within, default=1.0),
        "n": len(pts),  # 1.0: the base model itself
        "finetune_s": sum(r["finetune_s"] for r in recs),
    }


def extra_trials(run: dict[str, Any]) -> int:
    """Finetuned trials worth the default arm's screen: its screening worker-seconds over its
    mean finetuned trial's worker-seconds."""
    per_trial = statistics.mean(r["worker_s"] for r in run["records"]) if run["records"] else 0.0
    cost = float(run["screen"].get("screen_cpu_s", 0.0))
    return math.ceil(cost / per_trial) if per_trial > 0 else 0


def uniform_2x(run: dict[str, Any], lat: dict[str, float]) -> float | None:
    """Relative latency of the least-pruned uniform model that is at least 2x faster than base."""
    rel = [lat[r["signature"]] / lat["base"] for r in run["records"]]
    fast = [x for x in rel if x <= 0.5]
    return max(fast) if fast else None


def one_seed(task_name: str, seed: int, s: Settings, tmp: Path) -> dict[str, Any]:
    """The default arm first (its screen's cost sets the compute-matched extra trials), then the
    others (order rotated per seed), then every model re-timed side by side."""
    runs = {OURS: run_arm(s.arms[0], task_name, seed, s, tmp)}
    extra = extra_trials(runs[OURS]) if s.matched else 0
    rest = list(s.arms[1:])
    k = seed % max(1, len(rest))
    for arm in rest[k:] + rest[:k]:
        runs[arm.key] = run_arm(arm, task_name, seed, s, tmp, 0 if arm.screened else extra)
    task = build_task(task_name, s.task_options(seed))
    lat = remeasure(task, list(runs.values()), batch_of(task_name), s.passes, seed, s.timing)
    ref = uniform_2x(runs["uniform"], lat) if "uniform" in runs else None
    sc = {(a, b): scores(r, b, lat, ref) for a, r in runs.items() for b in s.budgets}
    matched = {
        (a, b): scores(r, b + r["extra"], lat, ref) for a, r in runs.items() for b in s.budgets
    }
    print(
        f"quality: {task_name} seed {seed} (extra {extra}) hypervolume: "
        + ", ".join(f"{a}@{b} {v['hv']:.4f}" for (a, b), v in sc.items()),
        file=sys.stderr,
        flush=True,
    )
    return {
        "ref_2x": ref,
        "base_ms": runs[OURS]["base_latency_ms"],  # as the default arm's search calibrated it
        "wall_s": {a: r["wall_s"] for a, r in runs.items()},
        "scores": sc,
        "matched": matched,
        "extra": extra,
        "screen": runs[OURS]["screen"],
        "proxy": runs[OURS]["proxy"],
        "trial_s": statistics.mean(r["worker_s"] for r in runs[OURS]["records"])
        if runs[OURS]["records"]
        else 0,
    }


# -- the report ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true")
    p.add_argument(
        "--tiny", action="store_true", help="smoke test: digits, 1 seed, 2 trials per arm"
    )
    p.add_argument(
        "--ablation", action="store_true", help="add an arm: the previous default (per-layer TPE)"
    )
    p.add_argument(
        "--finetune-matched",
        action="store_true",
        help="no compute-matched extra trials for the baselines (a shorter, finetune-matched run)",
    )
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the mode's)")
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="with --seeds N: seeds K..K+N-1 (more seeds later)",
    )
    p.add_argument("--budgets", help="comma-separated budgets, e.g. 6,12,24 (default: the mode's)")
    p.add_argument("--tasks", help="comma-separated tasks (default: the mode's)")
    p.add_argument(
        "--arms", help="comma-separated arm keys, e.g. ours,uniform-screen (default: all)"
    )
    p.add_argument(
        "--vary-base",
        action="store_true",
        help="seed k also trains the base model and splits the data with seed k (task option "
        "seed): seeds differ in the model pruned, not only in the search's draws",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--keep",
        type=Path,
        help="keep every arm's Optuna and MLflow SQLite files here (default: a temporary folder)",
    )
    p.add_argument(
        "--section",
        default="quality",
        help="the RESULTS.md section to write (e.g. quality-digits: one task's run of its own)",
    )
    args = p.parse_args(argv)
    s = MODES["tiny" if args.tiny else "full" if args.full else "quick"]
    if args.ablation:
        s = dataclasses.replace(s, arms=(*s.arms, ABLATION_ARM))
    if args.finetune_matched:
        s = dataclasses.replace(s, matched=False)
    if args.seeds:
        s = dataclasses.replace(
            s, seeds=tuple(range(args.first_seed, args.first_seed + args.seeds))
        )
    if args.vary_base:
        s = dataclasses.replace(s, vary_base=True)
    if args.budgets:
        s = dataclasses.replace(s, budgets=tuple(int(b) for b in args.budgets.split(",")))
    if args.tasks:
        s = dataclasses.replace(s, tasks=tuple(args.tasks.split(",")))
    if args.arms:
        keys = args.arms.split(",")
        unknown = sorted(set(keys) - {a.key for a in KNOWN_ARMS})
        if unknown or OURS not in keys:
            p.error(
                f"--arms: unknown {unknown} or without {OURS!r} (the arm the others are judged against)"
            )
        s = dataclasses.replace(s, arms=tuple(a for a in KNOWN_ARMS if a.key in keys))
    t0 = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    with _workdir(args.keep) as tmp:
        for (
            task
        ) in s.tasks:  # the section is rewritten as each task ends: a long run keeps its tasks
            results[task] = [one_seed(task, seed, s, tmp) for seed in s.seeds]
            out = write_section(
                args.section, report(results, s, time.perf_counter() - t0), args.out
            )
    return out


@contextlib.contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    """Where the arms' studies live: ``keep`` (so the picks can be read afterwards: each arm's
    study, and the default's screen as ``<name>.screen``), or a folder deleted at the end."""
    if keep is not None:
        if keep.exists() and any(keep.iterdir()):
            raise SystemExit(
                f"--keep {keep}: not empty (a run's studies would meet an earlier run's)"
            )
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


if __name__ == "__main__":
    print(main())
