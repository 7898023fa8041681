"""Recovery methods as search dimensions: the front with every method in the space, against
``oneshot`` alone, at equal compute.

    python -m benchmarks.recovery            # quick: digits, 1 seed, 10 trials (all methods), 2 epochs (~1 min)
    python -m benchmarks.recovery --full     # 3 seeds x 24 trials, 3 epochs: median of 3
    python -m benchmarks.recovery --tiny     # smoke test: 1 seed, 2 trials, 1 epoch
    python -m benchmarks.recovery --seeds 3  # quick settings, median of 3 seeds

Two real prunesearch runs per seed (config -> prepare -> run_search), same sampler seed, same
pruning space (block granularity, ratios in [0, 0.8]), every early-stop rule off so each trial
spends exactly its budget of ``finetune.epochs`` epochs:

- all methods: ``search.space.recovery`` = oneshot | iterative (2-3 steps) | sparse (share 0.25
  or 0.5, reg log-uniform in [1e-3, 1], group_norm | bn_scale | growing_reg), with KD on or off;
- oneshot only: the default recovery space.

Equal compute: every method splits the same epoch budget, but a KD trial also runs its teacher
(charged a third of an epoch per epoch), so the oneshot arm gets as many trials as the all-methods
arm's ``train_epochs`` sum buys. After each seed every model of both arms is rebuilt from its plan
and re-timed side by side (interleaved passes), so machine load hits both arms alike. Hypervolume
reference: latency 1.0 (the base model), accuracy base - 0.10.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import Point, config_from_dict, hypervolume, prepare, run_search
from search_space import architecture_signature
from workers import Target, Task, TrialStatus, apply_plan, build_task

from ._results import RESULTS, SMOKE_SCREEN, SMOKE_TIMING, table, time_interleaved, write_section

FLOOR = 0.10  # hypervolume's accuracy reference: base accuracy minus this
RULES_OFF = {"reject_infeasible": False, "reject_dominated": False, "stop_hopeless": False}
SPACE: dict[str, Any] = {
    "granularity": "block",
    "ratio": [0.0, 0.8],
    "criteria": ["l1", "lamp"],
    "round_to": [1],
}
ALL_METHODS: dict[str, Any] = {
    "methods": ["oneshot", "iterative", "sparse"],
    "steps": [2, 3],
    "sparse_share": [0.25, 0.5],
    "reg": [1e-3, 1.0],
    "sparse_pruners": ["group_norm", "bn_scale", "growing_reg"],
    "kd": [False, True],
}


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...]
    trials: int  # of the all-methods arm; the oneshot arm gets the same compute
    epochs: int
    passes: int = 5  # interleaved timing passes per model when re-timing
    smoke: bool = False  # time to the smoke test's looser precision (SMOKE_TIMING)


MODES = {
    "tiny": Settings((0,), 2, 1, passes=2, smoke=True),
    "quick": Settings((0,), 10, 2),
    "full": Settings((0, 1, 2), 24, 3),
}


def run_arm(
    key: str, recovery: dict[str, Any], trials: int, seed: int, s: Settings, tmp: Path
) -> dict[str, Any]:
    name = f"rec-{key}-{seed}"
    config = config_from_dict(
        {
            "name": name,
            "task": "digits",
            "search": {
                "trials": trials,
                "concurrency": 2,
                "seed": seed,
                "early_stop": RULES_OFF,
                "space": {**SPACE, "recovery": recovery},
                **({"screen": {"candidates": SMOKE_SCREEN}} if s.smoke else {}),
            },
            "finetune": {"epochs": s.epochs, "lr": 0.01},
            "target": {
                "batch_size": 1,
                "threads": 1,
                "warmup": 3,
                "rounds": 3,
                "runs": 10,
                **(SMOKE_TIMING if s.smoke else {}),
            },
            "storage": f"sqlite:///{tmp}/{name}.db",
            "tracking": {
                "uri": f"sqlite:///{tmp}/mlflow.db",
                "register": False,
            },  # not what is measured
        }
    )
    t0 = time.perf_counter()
    outcome = run_search(prepare(config), progress=lambda line: None)
    records = [
        {
            "number": r.number,
            "accuracy": r.accuracy,
            "plan": r.plan,
            "signature": r.signature,
            "recipe": label(r.recovery),
            "train_epochs": r.train_epochs or 0.0,
        }
        for r in outcome.results
        if r.status == TrialStatus.COMPLETE
    ]
    return {
        "records": records,
        "base_accuracy": outcome.base["accuracy"],
        "wall_s": time.perf_counter() - t0,
    }


def label(recovery: dict[str, Any]) -> str:
    method = recovery.get("method", "oneshot")
    name = f"sparse/{recovery.get('sparse_pruner')}" if method == "sparse" else method
    return name + ("+kd" if recovery.get("kd") else "")


# -- re-timing every model of a seed side by side ---------------------------------------------
def retime(task: Task, runs: list[dict[str, Any]], passes: int, seed: int) -> dict[str, float]:
    """Median latency (ms) of every architecture either arm found, and of the base ("base")."""
    models = {"base": task.model}
    for run in runs:
        for rec in run["records"]:
            if rec["signature"] not in models:
                model = apply_plan(task.model, task.example_inputs, rec["plan"])
                if architecture_signature(model) != rec["signature"]:
                    raise RuntimeError(
                        f"trial {rec['number']}: its plan rebuilt another architecture"
                    )
                models[rec["signature"]] = model
    target = Target(batch_size=1, threads=1, warmup=3, rounds=1, runs=10)
    return time_interleaved(models, task.example_inputs, target, passes, seed)


def front_of(run: dict[str, Any], lat: dict[str, float]) -> list[dict[str, Any]]:
    """The arm's non-dominated models (re-timed latency as a fraction of base), fastest first."""
    pts = sorted(
        ({**r, "rel": lat[r["signature"]] / lat["base"]} for r in run["records"]),
        key=lambda r: (r["rel"], -r["accuracy"]),
    )
    out: list[dict[str, Any]] = []
    for p in pts:
        if not out or p["accuracy"] > out[-1]["accuracy"]:
            out.append(p)
    return out


def score(run: dict[str, Any], lat: dict[str, float]) -> dict[str, Any]:
    front = front_of(run, lat)
    pts = [Point(r["number"], r["accuracy"], r["rel"]) for r in front]
    return {
        "hv": hypervolume(pts, 1.0, run["base_accuracy"] - FLOOR),
        "front": front,
        "n": len(run["records"]),
        "epochs": sum(r["train_epochs"] for r in run["records"]),
        "wall_s": run["wall_s"],
        "recipes": Counter(r["recipe"] for r in run["records"]),
    }


def one_seed(seed: int, s: Settings, tmp: Path) -> dict[str, Any]:
    every = run_arm("all", ALL_METHODS, s.trials, seed, s, tmp)
    spent = sum(r["train_epochs"] for r in every["records"])
    oneshot = run_arm("oneshot", {}, max(1, round(spent / s.epochs)), seed, s, tmp)
    lat = retime(build_task("digits"), [every, oneshot], s.passes, seed)
    return {"all": score(every, lat), "oneshot": score(oneshot, lat), "base_ms": lat["base"]}


# -- the report ------------------------------------------------------------------------------
def halves(seeds: list[dict[str, Any]]) -> dict[str, Counter]:
    """Recipes of the all-methods fronts' points, in the fast and the slow half of each front."""
    out = {"fast": Counter(), "slow": Counter()}
    for sd in seeds:
        front = sd["all"]["front"]
        cut = statistics.median(p["rel"] for p in front) if front else 0.0
        for p in front:
            out["fast" if p["rel"] <= cut else "slow"][p["recipe"]] += 1
    return out


def arm_rows(seeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for key, name in (("all", "all methods"), ("oneshot", "oneshot only")):
        per = [sd[key] for sd in seeds]
        rows.append(
            {
                "arm": name,
                "hypervolume (median)": f"{statistics.median(p['hv'] for p in per):.4f}",
                "per seed": ", ".join(f"{p['hv']:.4f}" for p in per),
                "trials": ", ".join(str(p["n"]) for p in per),
                "train epochs": ", ".join(f"{p['epochs']:.1f}" for p in per),
                "front points": ", ".join(str(len(p["front"])) for p in per),
            }
        )
    return rows


def front_rows(sd: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "latency (x base)": f"{p['rel']:.3f}",
            "accuracy": f"{p['accuracy']:.4f}",
            "recipe": p["recipe"],
            "trial": p["number"],
        }
        for p in sd["all"]["front"]
    ]


def report(seeds: list[dict[str, Any]], s: Settings, wall: float) -> str:
    h = halves(seeds)
    mid = sorted(seeds, key=lambda sd: sd["all"]["hv"])[len(seeds) // 2]
    wins = sum(sd["all"]["hv"] > sd["oneshot"]["hv"] + 1e-12 for sd in seeds)

    def common(c: Counter) -> str:
        return ", ".join(f"{k} {v}" for k, v in c.most_common()) or "none"

    return (
        f"## Recovery methods\n\nDigits; {len(s.seeds)} seed(s); all-methods arm {s.trials} trials, oneshot arm "
        f"as many as the same train epochs buy; {s.epochs} epochs of budget per trial; every early-stop rule "
        f"off; space: block granularity, ratios [0, 0.8], criteria l1/lamp. All methods: "
        f"oneshot | iterative | sparse (group_norm, bn_scale, growing_reg), KD on/off. Latency re-timed side "
        f"by side after each seed ({s.passes} interleaved passes, batch 1, 1 thread), as a fraction of the base "
        f"model's ({statistics.median(sd['base_ms'] for sd in seeds):.3f} ms). Hypervolume reference: latency "
        f"1.0, accuracy base - {FLOOR:.2f}.\n\n"
        + table(arm_rows(seeds), list(arm_rows(seeds)[0]))
        + f"\n\nAll methods beat oneshot only on {wins}/{len(seeds)} seed(s).\n\n"
        f"Finished trials per recipe in the all-methods arm (all seeds): "
        f"{common(sum((sd['all']['recipes'] for sd in seeds), Counter()))}.\n\n"
        f"Which recipes make the all-methods front (points over all seeds): fast half "
        f"(lower latency): {common(h['fast'])}; slow half: {common(h['slow'])}.\n\n"
        f"The all-methods front of the median seed:\n\n"
        + (table(front_rows(mid), list(front_rows(mid)[0])) if mid["all"]["front"] else "(empty)")
        + f"\n\nWall time: {wall / 60:.1f} min.\n"
    )


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true")
    p.add_argument("--tiny", action="store_true", help="smoke test: 1 seed, 2 trials, 1 epoch")
    p.add_argument("--seeds", type=int, help="how many seeds (default: the mode's)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    s = MODES["tiny" if args.tiny else "full" if args.full else "quick"]
    if args.seeds:
        s = dataclasses.replace(s, seeds=tuple(range(args.seeds)))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        seeds = [one_seed(seed, s, Path(tmp)) for seed in s.seeds]
    return write_section("recovery", report(seeds, s, time.perf_counter() - t0), args.out)


if __name__ == "__main__":
    print(main())
