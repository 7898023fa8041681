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
  round_to 1/8), ``search.screen`` (96 candidates screened with adaptive BN on training data,
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
import math
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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

from ._results import (
    RESULTS,
    SMOKE_SCREEN,
    SMOKE_TIMING,
    paired_interleaved,
    table,
    write_section,
)

MAX_RATIO = 0.8  # every arm's ratios lie in [0, MAX_RATIO]
FLOOR = 0.10  # hypervolume's accuracy reference: base accuracy minus this
DROP = 0.01  # "within one point": accuracy >= base - DROP
RULES_OFF = {"reject_infeasible": False, "reject_dominated": False, "stop_hopeless": False}
# Each task's target: digits at batch 1 (per-op overhead dominates), the others at batch 16
# (compute dominates). The search times with a cheap target; the score re-times (see remeasure).
TASKS = {"digits": 1, "shifted_digits": 16, "colour_shapes": 16}
OURS = "default"  # the arm every other is judged against


def batch_of(task: str) -> int:
    """The timing batch of a task: a built-in's own, 16 for any other (a ``module:build`` task,
    which is how a model family outside the repository is benchmarked with the same arms)."""
    return TASKS.get(task, 16)


@dataclass(frozen=True)
class Arm:
    label: str
    key: str
    sampler: str
    space: dict[str, Any]
    sweep: bool = False  # trials enqueued at evenly spaced uniform ratios
    anchors: int | None = None  # search.anchors; None: the product's default
    screen: int | None = None  # search.screen.candidates; None: the product's default
    baseline: bool = True  # judged against the default (an ablation of prunesearch is not)
    table: bool | None = None  # search.screen.table; None: the product's default
    uniform_share: float | None = None  # search.screen.uniform_share; None: the default

    @property
    def screened(self) -> bool:
        return self.screen != 0


SEARCH_SPACE: dict[str, Any] = {"ratio": [0.0, MAX_RATIO]}  # the rest: prunesearch's defaults
LAYER_SPACE: dict[str, Any] = {"granularity": "layer", "ratio": [0.0, MAX_RATIO]}
SWEEP_SPACE: dict[str, Any] = {
    "granularity": "uniform",
    "ratio": [0.0, MAX_RATIO],
    "step": 0.005,
    "criteria": ["l2"],
    "round_to": [1],
}
UNIFORM_SCREEN_SPACE: dict[str, Any] = {
    "granularity": "uniform",
    "ratio": [0.0, MAX_RATIO],
    "step": 0.01,
}
ARMS = (
    Arm("prunesearch (default)", OURS, "tpe", SEARCH_SPACE),
    Arm("random search", "random", "random", LAYER_SPACE, anchors=0, screen=0),
    Arm("uniform (TP default)", "uniform", "random", SWEEP_SPACE, sweep=True, anchors=0, screen=0),
    Arm(
        "TP global pruning",
        "global",
        "random",
        {**SWEEP_SPACE, "global_pruning": [True]},
        sweep=True,
        anchors=0,
        screen=0,
    ),
    Arm("uniform + screen", "uniform-screen", "tpe", UNIFORM_SCREEN_SPACE, anchors=0),
)
# Arms by key (--arms default,table,no-table,...), not baselines: the default with the damage
# table on, and with it off (the allocator on first-order Taylor importances), whatever the
# product's default is.
TABLE_ARM = Arm(
    "prunesearch + damage table", "table", "tpe", SEARCH_SPACE, baseline=False, table=True
)
NO_TABLE_ARM = Arm(
    "prunesearch, Taylor importance (no damage table)",
    "no-table",
    "tpe",
    SEARCH_SPACE,
    baseline=False,
    table=False,
)
# The default with residual blocks droppable whole (search.space.depth null: any of them), and
# without (depth 0: channels only), whatever the product's default is.
DEPTH_ARM = Arm(
    "prunesearch + depth (blocks dropped)",
    "depth",
    "tpe",
    {**SEARCH_SPACE, "depth": None},
    baseline=False,
)
NO_DEPTH_ARM = Arm(
    "prunesearch, channels only (depth 0)",
    "no-depth",
    "tpe",
    {**SEARCH_SPACE, "depth": 0},
    baseline=False,
)
# The default with half its screen held to uniform plans (their level, criterion and rounding
# sampled), and with none beyond the seeds, whatever the product's default is.
SPLIT_ARM = Arm(
    "prunesearch, half the screen uniform",
    "split",
    "tpe",
    SEARCH_SPACE,
    baseline=False,
    uniform_share=0.5,
)
NO_SPLIT_ARM = Arm(
    "prunesearch, uniform seeds only",
    "no-split",
    "tpe",
    SEARCH_SPACE,
    baseline=False,
    uniform_share=0.0,
)
# The share itself, a quarter and three quarters: where between the two the default should sit.
SHARE_ARMS = tuple(
    Arm(
        f"prunesearch, {pct} % of the screen uniform",
        f"split-{pct}",
        "tpe",
        SEARCH_SPACE,
        baseline=False,
        uniform_share=pct / 100,
    )
    for pct in (25, 75)
)
# --ablation: the previous default (per-layer TPE after 4 uniform anchors, no screen).
ABLATION_ARM = Arm(
    "per-layer TPE + anchors (no screen)", "tpe-layer", "tpe", LAYER_SPACE, screen=0, baseline=False
)
KNOWN_ARMS = (
    *ARMS,
    ABLATION_ARM,
    TABLE_ARM,
    NO_TABLE_ARM,
    DEPTH_ARM,
    NO_DEPTH_ARM,
    SPLIT_ARM,
    NO_SPLIT_ARM,
    *SHARE_ARMS,
)  # what --arms may name


@dataclass(frozen=True)
class Settings:
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    budgets: tuple[
        int, ...
    ]  # the last is the run's length; each earlier one divides it by a power of 2
    epochs: int
    arms: tuple[Arm, ...] = ARMS
    passes: int = 3  # paired timing passes per model when re-measuring
    screen: int | None = None  # candidates of the screened arms; None: the product's default
    smoke: bool = False  # time to the smoke test's looser precision (SMOKE_TIMING)
    matched: bool = True  # False: no compute-matched extra trials (a finetune-matched run only)

    @property
    def timing(self) -> dict[str, float]:
        return dict(SMOKE_TIMING) if self.smoke else {}

    @property
    def trials(self) -> int:
        return self.budgets[-1]


MODES = {
    # The smoke test: every arm and every table, at a size where the screen (and so the
    # compute-matched extra trials it buys the baselines) stays small.
    "tiny": Settings(("digits",), (0,), (1, 2), 1, passes=2, screen=SMOKE_SCREEN, smoke=True),
    "quick": Settings(("shifted_digits",), (0, 1, 2), (6, 12), 1),
    "full": Settings(tuple(TASKS), (0, 1, 2, 3, 4), (6, 12, 24), 1),
}


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
    if arm.table is not None:
        search["screen"] = {**search.get("screen", {}), "table": arm.table}
    if arm.uniform_share is not None:
        search["screen"] = {**search.get("screen", {}), "uniform_share": arm.uniform_share}
    return config_from_dict(
        {
            "name": name,
            "task": task,
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
            "worker_s": sum(t.user_attrs.get("seconds", {}).values()),
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
    for run in runs:
        for rec in run["records"]:
            if rec["signature"] not in models:
                models[rec["signature"]] = rebuild(task, rec)
    target = Target(batch_size=batch, threads=1, warmup=3, **(timing or {}))
    return paired_interleaved(models, "base", task.example_inputs, target, passes, seed)


def rebuild(task: Task, rec: dict[str, Any]) -> nn.Module:
    model = apply_plan(task.model, task.example_inputs, PruningPlan.from_dict(rec["plan"]))
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
    task = build_task(task_name)
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
def spread(values: list[float | None], fmt: str) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "n/a"
    missing = f", {len(values) - len(got)} seed(s) none" if len(got) < len(values) else ""
    text = fmt.format(statistics.median(got))
    return (
        text
        if len(got) == 1 and not missing
        else f"{text} [{fmt.format(min(got))}-{fmt.format(max(got))}{missing}]"
    )


def task_rows(
    task: str, seeds: list[dict[str, Any]], s: Settings, key: str = "scores"
) -> list[dict[str, Any]]:
    """One row per budget and arm; ``key`` "matched" reads each baseline at its compute-matched budget."""
    rows = []
    for b in s.budgets:
        for arm in s.arms:
            per = [sd[key][(arm.key, b)] for sd in seeds]
            ours = [sd[key][(OURS, b)]["hv"] for sd in seeds]
            wins = sum(o > p["hv"] + 1e-12 for o, p in zip(ours, per, strict=True))
            rows.append(
                {
                    "task": task,
                    "budget": b,
                    "arm": arm.label,
                    "hypervolume": spread([p["hv"] for p in per], "{:.4f}"),
                    "acc @ 2x-uniform latency": spread([p["acc_2x"] for p in per], "{:.4f}"),
                    "best speed-up, <= 1 pt drop": spread([p["speedup"] for p in per], "{:.2f}x"),
                    "finetuned": statistics.median(p["n"] for p in per),
                    "finetune s": f"{statistics.median(p['finetune_s'] for p in per):.1f}",
                    "default's HV higher": "-" if arm.key == OURS else f"{wins}/{len(per)} seeds",
                }
            )
    return rows


def ratios(results: dict[str, list[dict[str, Any]]], s: Settings, key: str) -> list[str]:
    """Median hypervolume of the default over the best baseline's, per task and budget, plainly."""
    lines = []
    for task, seeds in results.items():
        for b in s.budgets:
            med = {
                a.key: statistics.median(sd[key][(a.key, b)]["hv"] for sd in seeds) for a in s.arms
            }
            rivals = [a for a in s.arms if a.baseline and a.key != OURS]
            if not rivals:  # the default arm run alone (a cost measurement): nothing to compare
                continue
            best = max(rivals, key=lambda a: med[a.key])
            r = med[OURS] / med[best.key] if med[best.key] > 0 else math.inf
            verdict = "beaten" if r > 1 + 1e-9 else "**not beaten**"
            lines.append(
                f"- {task}, budget {b}: default {med[OURS]:.4f} vs best baseline {best.label} "
                f"{med[best.key]:.4f}: **{r:.2f}x**, {verdict}."
            )
    return lines


def screen_rows(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for task, seeds in results.items():
        tau = [sd["proxy"].get("proxy_kendall_tau") for sd in seeds]
        rho = [sd["proxy"].get("proxy_spearman") for sd in seeds]
        per = [sd["screen"].get("screen_s_per_candidate", 0.0) for sd in seeds]
        rows.append(
            {
                "task": task,
                "proxy Kendall tau": spread(tau, "{:.2f}"),
                "proxy Spearman": spread(rho, "{:.2f}"),
                "candidates": spread(
                    [sd["screen"].get("screen_candidates") for sd in seeds], "{:.0f}"
                ),
                "plans told, not screened again": spread(
                    [sd["screen"].get("screen_duplicates", 0.0) for sd in seeds], "{:.0f}"
                ),
                "worker s / candidate": spread(per, "{:.3f}"),
                "candidates / s / core": spread([1 / x if x else None for x in per], "{:.1f}"),
                "finetuned trial worker s": spread([sd["trial_s"] for sd in seeds], "{:.2f}"),
                "candidate / trial cost": spread(
                    [
                        x / sd["trial_s"] if sd["trial_s"] else None
                        for x, sd in zip(per, seeds, strict=True)
                    ],
                    "{:.3f}",
                ),
                "screen wall s": spread(
                    [sd["screen"].get("screen_wall_s") for sd in seeds], "{:.1f}"
                ),
                "extra trials (compute-matched)": spread([sd["extra"] for sd in seeds], "{:.0f}"),
            }
        )
    return rows


def report(results: dict[str, list[dict[str, Any]]], s: Settings, wall: float) -> str:
    rows = [r for task, seeds in results.items() for r in task_rows(task, seeds, s)]
    matched = [r for task, seeds in results.items() for r in task_rows(task, seeds, s, "matched")]
    refs = "; ".join(
        f"{t}: base {statistics.median(sd['base_ms'] for sd in seeds):.3f} ms at batch {batch_of(t)}, "
        f"2x-uniform model at {spread([sd['ref_2x'] for sd in seeds], '{:.3f}')} x base latency"
        for t, seeds in results.items()
    )
    return (
        f"## Search quality: {', '.join(results)}, {len(s.seeds)} seed(s)\n\nTasks {', '.join(results)}; {len(s.seeds)} seed(s); budgets {list(s.budgets)} "
        f"finetuned trials per arm ({s.epochs} finetune epoch(s) each, every early-stop rule off); arms "
        f"{', '.join(a.label for a in s.arms)}. Each arm is a real prunesearch run (see the docstring of "
        "`benchmarks/quality.py` for what each arm gets). Latency: every model of a seed re-timed side by side "
        f"after the seed's runs, each paired against the base model (the product's paired protocol; {s.passes} passes in "
        "shuffled orders, median ratio), so latency is a fraction of the base model's. "
        f"Hypervolume reference: latency 1.0 (base), accuracy base - {FLOOR:.2f}. Cells: median [min-max] over "
        "seeds. 'acc @ 2x-uniform latency': best accuracy at or below the latency of the least-pruned uniform "
        "model that is >= 2x faster than base (n/a: none was, or the arm found nothing that fast). 'Best "
        f"speed-up': fastest model within {DROP * 100:.0f} point of base accuracy (1.00x: none faster).\n\n"
        f"Reference latencies: {refs}.\n\n### Finetune-matched (every arm: B finetuned trials)\n\n"
        + table(rows, list(rows[0]))
        + "\n\nDefault vs the best baseline (median hypervolume):\n\n"
        + "\n".join(ratios(results, s, "scores"))
        + (
            "\n\n### Compute-matched (baselines without a screen: B + E finetuned trials, E = the "
            "screen's cost in finetuned trials)\n\n"
            + table(matched, list(matched[0]))
            + "\n\nDefault vs the best baseline, compute-matched (median hypervolume):\n\n"
            + "\n".join(ratios(results, s, "matched"))
            if s.matched
            else "\n\nCompute-matched: not run (`--finetune-matched`: every arm ran B trials only)."
        )
        + "\n\n### The screen: proxy quality and cost\n\nKendall tau / Spearman between the proxy (adaptive-BN "
        "score on a training slice) and finetuned validation accuracy over the default arm's finetuned picks; "
        "cost in worker seconds (prune, re-estimate BN, score, and its share of the short timing) per plan "
        "actually screened (a plan the sampler asked for again is told the first result: 'plans told').\n\n"
        + table(screen_rows(results), list(screen_rows(results)[0]))
        + f"\n\nWall time: {wall / 60:.1f} min.\n"
    )


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
    p.add_argument("--budgets", help="comma-separated budgets, e.g. 6,12,24 (default: the mode's)")
    p.add_argument("--tasks", help="comma-separated tasks (default: the mode's)")
    p.add_argument(
        "--arms", help="comma-separated arm keys, e.g. ours,uniform-screen (default: all)"
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
        s = dataclasses.replace(s, seeds=tuple(range(args.seeds)))
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
