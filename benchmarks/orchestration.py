"""Orchestration overhead and worker utilisation: prunesearch's loop vs Ray Tune + OptunaSearch.

    python -m benchmarks.orchestration           # 40 trials, 0.2-1.2 s each, 2 workers (~1 min)
    python -m benchmarks.orchestration --full    # 40 trials, 1-5 s each

Both sides run the same workload on the same local Ray cluster (2 CPUs, 1 per trial): trial i
sleeps durations[i] (a fixed, varied list), then returns two objectives; both use Optuna's TPE
with the same seed. Ours runs the real loop: ask/tell on a SQLite study, a child run per trial
in a SQLite MLflow store, pareto tags and the front board. Ray Tune writes its usual result files.
Utilisation = sum of trial sleep time / (workers x wall time). Ours is timed from the loop's
start (study, MLflow parent run and front board already set up, as `run_search` does before its
loop), Ray Tune's from `Tuner.fit()`; on both sides the harness's duration actor is up first.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import ray

from orchestrator import (
    SearchContext,
    SearchRecorder,
    ask_trial,
    config_from_dict,
    open_study,
    search_loop,
    start_board,
)
from search_space import Discovery, PrunableGroup, PruningPlan, SearchSpace
from workers import TrialLatency, TrialResult, TrialStatus

from ._results import RESULTS, table, write_section

WORKERS = 2


def durations(n: int, low: float, high: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(low, high), 3) for _ in range(n)]


@ray.remote(num_cpus=0)
class Durations:
    """Hands the i-th trial to start the i-th duration, on both sides: identical workloads."""

    def __init__(self, ds: list[float]) -> None:
        self.ds, self.i = ds, 0

    def ready(self) -> bool:
        return True

    def next(self) -> float:
        self.i += 1
        return self.ds[self.i - 1]


@ray.remote(num_cpus=1)
def sleep_trial(spec: dict[str, Any], clock: Any, board: Any) -> TrialResult:
    board.started.remote(spec["number"])  # as the real trial task does (timeouts, queue-ahead)
    seconds = ray.get(clock.next.remote())
    time.sleep(seconds)
    ratio = spec["plan"]["ratios"]["all"]
    return TrialResult(
        number=spec["number"],
        status=TrialStatus.COMPLETE,
        plan=PruningPlan.from_dict(spec["plan"]),
        accuracy=1.0 - 0.1 * ratio,
        latency=TrialLatency(median_ms=1.0 + 10.0 * (0.8 - ratio)),
        seconds={"finetune": seconds},
    )


def run_ours(ds: list[float], tmp: Path) -> float:
    config = config_from_dict(
        {
            "name": "orch-bench",
            "search": {
                "trials": len(ds),
                "concurrency": WORKERS,
                "seed": 0,
                "space": {"granularity": "uniform", "criteria": ["l1"], "round_to": [1]},
            },
            "storage": f"sqlite:///{tmp}/ours.db",
            "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"},
        }
    )
    discovery = Discovery(groups=(PrunableGroup("x", "Conv2d", 64, ("x",)),), excluded=())
    study = open_study(config)
    recorder = SearchRecorder(config)
    base = {"accuracy": 1.0, "latency_ms": 10.0, "macs": 1.0, "params": 1.0}
    recorder.start(base)
    board = start_board(None, 1.01, 0.02)
    clock = Durations.remote(ds)
    ray.get(
        [clock.ready.remote(), board.start_times.remote()]
    )  # actors up: their start is not the loop's
    ctx = SearchContext(
        config, SearchSpace(granularity="uniform", criteria=("l1",), round_to=(1,)), discovery
    )
    loop = search_loop(
        lambda: ask_trial(ctx, study),
        lambda spec: sleep_trial.remote(spec.to_dict(), clock, board),
        study,
        recorder,
        board,
        base,
        0.0,
        lambda line: None,
    )
    t0 = time.perf_counter()
    loop.run()
    wall = time.perf_counter() - t0
    ray.kill(board)
    return wall


def run_tune(ds: list[float], tmp: Path) -> float:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    clock = Durations.remote(ds)
    ray.get(
        clock.ready.remote()
    )  # the harness's actor is up before the clock starts, as on our side

    def trainable(config: dict[str, Any]) -> None:
        time.sleep(ray.get(clock.next.remote()))
        tune.report(
            {
                "accuracy": 1.0 - 0.1 * config["ratio"],
                "latency": 1.0 + 10.0 * (0.8 - config["ratio"]),
            }
        )

    search = OptunaSearch(
        metric=["accuracy", "latency"],
        mode=["max", "min"],
        sampler=optuna.samplers.TPESampler(seed=0, constant_liar=True, n_startup_trials=8),
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"ratio": tune.quniform(0.0, 0.7, 0.05)},
        tune_config=tune.TuneConfig(
            search_alg=search, num_samples=len(ds), max_concurrent_trials=WORKERS
        ),
        run_config=tune.RunConfig(storage_path=str(tmp / "tune"), name="orch-bench", verbose=0),
    )
    t0 = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - t0
    assert len(results) == len(ds) and not results.errors, results.errors
    return wall


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true")
    p.add_argument("--tiny", action="store_true", help="smoke test: 4 short trials, one repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    n, low, high = (40, 1.0, 5.0) if args.full else (40, 0.2, 1.2)
    repeats = args.repeats
    if args.tiny:
        n, low, high, repeats = 4, 0.05, 0.1, 1
    ds = durations(n, low, high)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    walls: dict[str, list[float]] = {"prunesearch": [], "Ray Tune + OptunaSearch": []}
    try:
        for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
            with tempfile.TemporaryDirectory() as tmp:
                walls["prunesearch"].append(run_ours(ds, Path(tmp)))
            with tempfile.TemporaryDirectory() as tmp:
                walls["Ray Tune + OptunaSearch"].append(run_tune(ds, Path(tmp)))
    finally:
        if started_here:
            ray.shutdown()
    work = sum(ds)
    rows = []
    for name, ws in walls.items():
        wall = statistics.median(ws)
        rows.append(
            {
                "orchestrator": name,
                "wall s (median)": f"{wall:.2f}",
                "runs": ", ".join(f"{w:.2f}" for w in ws),
                "utilisation": f"{100 * work / (WORKERS * wall):.1f} %",
                "overhead / trial ms": f"{1000 * (WORKERS * wall - work) / n:.0f}",
            }
        )
    ours, tune_wall = (statistics.median(ws) for ws in walls.values())
    body = (
        f"## Orchestration overhead\n\n{n} trials sleeping {low}-{high} s (sum {work:.1f} s, ideal wall "
        f"{work / WORKERS:.1f} s), {WORKERS} workers of 1 CPU on one local Ray cluster, TPE (seed 0) on both sides, "
        f"{repeats} interleaved repeat(s). Overhead per trial = (workers x wall - sum of sleeps) / trials.\n\n"
        + table(rows, list(rows[0]))
        + f"\n\nWall-time ratio Ray Tune / prunesearch: {tune_wall / ours:.2f}x.\n"
    )
    return write_section("orchestration", body, args.out)


if __name__ == "__main__":
    print(main())
