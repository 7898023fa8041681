"""The demo's cost: `make demo`'s search (examples/digits.yaml) as it ships, with depth off, and as
it was before the screen (per-layer TPE, every candidate finetuned).

    python -m benchmarks.demo              # 1 run of each variant (make bench)
    python -m benchmarks.demo --full       # 3 repeats of each, in rotating order (--repeats N)
    python -m benchmarks.demo --tiny       # smoke: 2 trials, 8 candidates, 1 repeat
    python -m benchmarks.demo --fresh      # a new Ray instance per run: cold workers, as make demo

The issue that made the screen the default asked that `make demo` still finish in about the same
time. Each run is the example config itself (its trials, screen, finetune and target), run
in-process on one Ray instance started before the first (Ray's start-up, ~5 s, is the same for
every variant and is not counted); storage and tracking go to a temporary folder. Reported per
variant: median wall seconds of the search (base model, discovery, screen, finetuned trials,
MLflow), the screen's share of it, the front's size, and what one screened candidate costs in
worker seconds against one finetuned trial of the example's own finetune (the quality benchmark
gives the same ratio against its one-epoch trials). Hypervolumes are each run's own
measurement (timed apart, minutes apart): the quality benchmark compares fronts side by side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import ray

from orchestrator import LOCAL_SYSTEM_CONFIG, load_config, prepare, run_search

from ._results import RESULTS, SMOKE_SCREEN, SMOKE_TIMING, table, worker_seconds, write_section

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits.yaml"
VARIANTS = {
    "as shipped (screen, allocation, depth)": [],
    "depth off": ["search.space.depth=0"],
    "before the screen (per-layer TPE)": [
        "search.screen.candidates=0",
        "search.space.granularity=layer",
    ],
}


def one_run(label: str, extra: list[str], repeat: int, tmp: Path, tiny: bool) -> dict:
    name = f"demo-{list(VARIANTS).index(label)}-{repeat}"
    overrides = [
        f"name={name}",
        f"storage=sqlite:///{tmp}/{name}.db",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"tracking.experiment={name}",
        *extra,
    ]
    if tiny:
        overrides += ["search.trials=2", *(f"target.{k}={v}" for k, v in SMOKE_TIMING.items())]
        if "search.screen.candidates=0" not in extra:
            overrides.append(f"search.screen.candidates={SMOKE_SCREEN}")
    config = load_config(EXAMPLE, overrides)
    t0 = time.perf_counter()
    outcome = run_search(prepare(config), progress=lambda line: None)
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=config.storage)
    stats = study.user_attrs.get("screen", {})
    return {
        "wall": wall,
        "screen": float(stats.get("screen_wall_s", 0.0)),
        "front": len(outcome.front),
        "per_candidate": float(stats.get("screen_s_per_candidate", 0.0)),
        "per_trial": _trial_worker_s(study),
    }


def _trial_worker_s(study: optuna.Study) -> float:
    """A finetuned trial's mean worker seconds, as the quality benchmark counts them."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return statistics.mean(worker_seconds(t) for t in done) if done else 0.0


def _cost_ratio(runs: list[dict]) -> str:
    """A screened candidate's worker seconds over a finetuned trial's (median over the runs
    that screened)."""
    ratios = [
        r["per_candidate"] / r["per_trial"] for r in runs if r["per_candidate"] and r["per_trial"]
    ]
    if not ratios:
        return "n/a"
    ratio = statistics.median(ratios)
    return f"{ratio:.3f} (1/{1 / ratio:.0f})"


def _row(label: str, runs: list[dict]) -> dict:
    wall = statistics.median(r["wall"] for r in runs)
    return {
        "variant": label,
        "wall s (median)": f"{wall:.0f}",
        "each run": ", ".join(f"{r['wall']:.0f}" for r in runs),
        "screen wall s": f"{statistics.median(r['screen'] for r in runs):.0f}",
        "front points": f"{statistics.median(r['front'] for r in runs):.0f}",
        "finetuned trial worker s": f"{statistics.median(r['per_trial'] for r in runs):.2f}",
        "candidate / trial cost": _cost_ratio(runs),
    }


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true", help="3 repeats of each variant")
    p.add_argument("--repeats", type=int, default=None, help="repeats of each variant")
    p.add_argument("--tiny", action="store_true", help="smoke test: 2 trials, 1 repeat")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="a new Ray instance for each run, as `make demo` has (its workers start cold)",
    )
    p.add_argument("--section", default="demo")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    repeats = 1 if args.tiny else args.repeats or (3 if args.full else 1)
    if not args.fresh and not ray.is_initialized():  # once, before the first run
        _start_ray()
    runs: dict[str, list[dict]] = {label: [] for label in VARIANTS}
    labels = list(VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            # Rotated per repeat: a machine that slows over the run slows every variant alike.
            for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                if args.fresh:
                    _start_ray()  # before the run's clock, as the CLI starts it before the search
                try:
                    runs[label].append(one_run(label, VARIANTS[label], r, Path(tmp), args.tiny))
                finally:
                    if args.fresh:
                        ray.shutdown()
    rows = [_row(label, runs[label]) for label in labels]
    shipped, before = (
        statistics.median(r["wall"] for r in runs[k]) for k in (labels[0], labels[2])
    )
    ray_note = (
        "each in a Ray instance of its own, started before its clock (not counted), its worker "
        "processes started by the search as `make demo`'s are"
        if args.fresh
        else "one Ray instance started beforehand (not counted)"
    )
    body = (
        "## The demo's wall time\n\n"
        f"`examples/digits.yaml` (what `make demo` runs), {repeats} run(s) per variant in rotating "
        f"order, {ray_note}. Wall: the whole search "
        "(base model, discovery, screen, finetuned trials, MLflow). Candidate / trial cost: a "
        "screened candidate's worker seconds (prune, re-estimate BatchNorm, score, its share of "
        "the short timing) over a finetuned trial's (prune, finetune, evaluate, time), with the "
        "example's own finetune and target.\n\n"
        + table(rows, list(rows[0]))
        + f"\n\nAs shipped / before the screen: **{shipped / before:.2f}x** the wall time.\n"
    )
    return write_section(args.section, body, args.out)


def _start_ray() -> None:
    """A local Ray instance as a local search starts one."""
    ray.init(address="local", include_dashboard=False, _system_config=LOCAL_SYSTEM_CONFIG)


if __name__ == "__main__":
    print(main())
