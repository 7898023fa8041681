"""The screen's short timing: one candidate at a time in pairs, or a batch against shared
reference runs (`workers.measure_group`). What each costs and how well each ranks.

    python -m benchmarks.screen_timing            # three tasks, 32 plans each, quiet and loaded (~14 min)
    python -m benchmarks.screen_timing --full     # 48 plans each (~20 min)
    python -m benchmarks.screen_timing --tiny     # smoke: digits, 8 plans, quiet
    python -m benchmarks.screen_timing --rounds 6 # search.screen.timing_rounds 6 beside the default

Per task, random plans (`benchmarks.cost_model.random_plans`: channel ratios, and block drops
where the model has blocks) are pruned from the base model and timed in batches of the screen's
size with the screen's short protocol (`orchestrator.screen_target`) each way (pairs, and a
base-model half per ``--shares`` candidates), side by side: batch by batch, the protocols take
turns going first. Then each plan is re-timed with the
target's full paired protocol twice (the median: the reference). Under 'loaded' a busy process
runs beside the timing, as a screen's worker runs beside its bench on a 2-core machine.
Reported: seconds of timing per candidate, Kendall tau with the reference, the median and the
worst relative error.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scipy.stats import kendalltau

from orchestrator import Screen, screen_target
from workers import GROUP_SHARE, Target, apply_plan, measure_group, measure_latency

from ._arms import batch_of
from ._results import RESULTS, SMOKE_TIMING, table, write_section
from .cost_model import TASKS, Setup, random_plans, retimed
from .latency import background_load


def _pairs(models: list, x: Any, full: Target, base: Any) -> list[float]:
    return [measure_latency(m, x, screen_target(full), base).ratio for m in models]


def _group(
    share: int, rounds: int | None = None
) -> Callable[[list, Any, Target, Any], list[float]]:
    def timer(models: list, x: Any, full: Target, base: Any) -> list[float]:
        # The screen's own protocol, at the default rounds or at ``rounds``.
        quick = screen_target(full) if rounds is None else screen_target(full, rounds)
        return [s.ratio for s in measure_group(models, x, quick, base, share=share)]

    return timer


def timers(shares: tuple[int, ...], rounds: tuple[int, ...] = ()) -> dict[str, Callable]:
    """'pairs', then 'group' (the screen's share) or 'group/k' (k candidates per base half),
    then 'group, r rounds' (the screen's share, search.screen.timing_rounds r)."""
    out: dict[str, Callable] = {"pairs": _pairs}
    for k in shares:
        out["group" if k == GROUP_SHARE else f"group/{k}"] = _group(k)
    for r in rounds:
        out[f"group, {r} rounds"] = _group(GROUP_SHARE, r)
    return out


def one_task(
    t: Setup,
    n: int,
    batch: int,
    seed: int,
    loaded: bool,
    smoke: bool,
    shares: tuple[int, ...],
    rounds: tuple[int, ...] = (),
) -> dict:
    """Short ratios and seconds per candidate of each protocol, and the reference ratios."""
    full = Target(batch_size=batch_of(t.name), threads=1, **(SMOKE_TIMING if smoke else {}))
    rng = random.Random(seed)
    plans = random_plans(t.found, t.blocks, n // 2, False, rng)
    plans += random_plans(t.found, t.blocks, n - n // 2, bool(t.blocks), rng)
    models = [apply_plan(t.base, t.x, p, discovery=t.found) for p in plans]
    ways = timers(shares, rounds)
    short: dict[str, list[float]] = {p: [] for p in ways}
    spent = dict.fromkeys(ways, 0.0)
    with background_load(on=loaded, processes=1):
        for i in range(0, n, batch):
            chunk = models[i : i + batch]
            turn = (i // batch) % len(ways)  # each protocol goes first in turn, batch by batch
            for name in [*ways][turn:] + [*ways][:turn]:
                t0 = time.perf_counter()
                short[name].extend(ways[name](chunk, t.x, full, t.base))
                spent[name] += time.perf_counter() - t0
    truth = retimed(models, t.x, full, t.base)
    return {"short": short, "seconds": {k: v / n for k, v in spent.items()}, "truth": truth}


def row(task: str, loaded: bool, got: dict) -> dict[str, Any]:
    truth, out = got["truth"], {"task": task, "load": "1 busy process" if loaded else "quiet"}
    for name in got["short"]:
        errors = sorted(abs(v / r - 1) for v, r in zip(got["short"][name], truth, strict=True))
        out[f"{name}: ms / candidate"] = f"{1000 * got['seconds'][name]:.0f}"
        out[f"{name}: tau"] = f"{kendalltau(got['short'][name], truth)[0]:.3f}"
        out[f"{name}: median, worst error"] = f"{statistics.median(errors):.3f}, {errors[-1]:.3f}"
    for name in [n for n in got["seconds"] if n != "pairs"]:
        out[f"pairs / {name} cost"] = f"{got['seconds']['pairs'] / got['seconds'][name]:.2f}x"
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="smoke test: digits, 8 plans, quiet")
    p.add_argument("--full", action="store_true", help="48 plans per task")
    p.add_argument("--plans", type=int, default=None)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shares", default=str(GROUP_SHARE), help="candidates per base-model half to try, e.g. 2,4"
    )
    p.add_argument(
        "--rounds", default="", help="search.screen.timing_rounds to try beside the default, e.g. 6"
    )
    p.add_argument("--section", default="screen-timing", help="the RESULTS.md section to write")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    tasks = ("digits",) if args.tiny else tuple(args.tasks.split(","))
    n = args.plans or (8 if args.tiny else 48 if args.full else 32)
    batch = min(n, Screen().batch)
    shares = tuple(int(k) for k in args.shares.split(","))
    rounds = tuple(int(r) for r in args.rounds.split(",") if r)
    rows = []
    for task in tasks:
        setup = Setup.of(task)
        for loaded in (False,) if args.tiny else (False, True):
            rows.append(
                row(
                    task,
                    loaded,
                    one_task(setup, n, batch, args.seed, loaded, args.tiny, shares, rounds),
                )
            )
    body = (
        "## The screen's short timing: candidate by candidate in pairs, or a batch against "
        "shared reference runs\n\n"
        f"{n} random plans per task (seed {args.seed}; half channels only, half with block drops "
        f"where the model has blocks), timed in batches of {batch} with the screen's short "
        "protocol both ways, side by side (the two take turns going first, batch by batch), then "
        "re-timed with the target's full paired protocol twice (the median: the reference). "
        "'pairs': each candidate in its own pairs against the base model (`measure_latency`); "
        f"'group': the batch as one sequence, a base-model half between every {GROUP_SHARE} "
        "candidates (`measure_group`; 'group/k': k candidates between base-model halves; "
        "'group, r rounds': `search.screen.timing_rounds` r instead of the default "
        f"{Screen().timing_rounds}). "
        "Kendall tau with the reference (higher ranks better), the median and worst relative "
        "error of the ratio.\n\n" + table(rows, list(rows[0])) + "\n"
    )
    return write_section(args.section, body, args.out)


if __name__ == "__main__":
    print(main())
