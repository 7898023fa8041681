"""How well the screen's latency sources rank candidates: its short timing, and the cost model
fitted to half of them, against a careful re-timing.

    python -m benchmarks.cost_model                  # digits, shifted_digits, colour_shapes; 40 plans
    python -m benchmarks.cost_model --tiny           # smoke: digits, 8 plans

For each task, random plans are pruned from the base model: a third uniform, the rest with each
group's ratio moved off the uniform one, and (in the second family) up to three residual blocks
dropped. Each is timed with the screen's short protocol (`orchestrator.screen_target`, in batches
against shared base-model runs, `workers.measure_group`, as the screen times them) and then
with the target's full protocol twice (the median: the reference). The cost model is fitted
(`search_space.fit_costs`) to the first half's short timings, as the screen's halfway refit is,
and ranks the second half. Reported: Kendall tau with the reference over the second half for the
short timing, the model, and the model without block overheads (each block's ops beyond its
layers' MACs), and the worst relative error of each. What `search.screen.time_share` stands on.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
from pathlib import Path
from typing import Any

from scipy.stats import kendalltau

from orchestrator import Screen, screen_target
from search_space import PruningPlan, discover, fit_costs, residual_blocks, uniform_plan
from workers import (
    Target,
    apply_plan,
    build_task,
    measure_group,
    measure_latency,
    profile_groups,
)

from ._arms import batch_of
from ._results import RESULTS, SMOKE_TIMING, table, write_section

TASKS = ("digits", "shifted_digits", "colour_shapes")


def random_plans(discovery: Any, blocks: list, n: int, drops: bool, rng: random.Random) -> list:
    plans = []
    for i in range(n):
        plan = uniform_plan(discovery, rng.uniform(0.05, 0.8))
        if i % 3:
            ratios = {
                k: round(min(0.85, max(0.0, v + rng.uniform(-0.3, 0.3))), 2)
                for k, v in plan.ratios.items()
            }
            plan = PruningPlan.from_dict({**plan.to_dict(), "ratios": ratios})
        k = rng.randint(0, min(3, len(blocks))) if drops else 0
        if k:
            drop = {b.name: list(b.groups) for b in rng.sample(blocks, k)}
            plan = PruningPlan.from_dict({**plan.to_dict(), "drop": drop})
        plans.append(plan)
    return plans


def retimed(models: list, x: Any, full: Target, base: Any) -> list[float]:
    """The reference ratios: each model timed with the target's full paired protocol twice, the
    median (what the short timings and the cost model are ranked against)."""
    return [
        statistics.median(measure_latency(m, x, full, base).ratio for _ in range(2)) for m in models
    ]


@dataclasses.dataclass(frozen=True)
class Setup:
    """One task's base model, its groups, blocks and profile: built once, shared by both families."""

    name: str
    base: Any
    x: Any
    found: Any
    blocks: list
    profile: Any

    @classmethod
    def of(cls, task_name: str) -> Setup:
        task = build_task(task_name)
        base, x = task.model.eval(), task.example_inputs
        found = discover(base, x, verify=False, warn=False)
        blocks = list(residual_blocks(base, x, found))
        profile = profile_groups(task, base, found, batches=2)
        return cls(
            task_name, base, x, found, blocks, dataclasses.replace(profile, blocks=tuple(blocks))
        )


def one_family(t: Setup, drops: bool, n: int, seed: int, smoke: bool) -> dict[str, Any]:
    if drops and not t.blocks:
        return {}
    base, x, found, blocks, profile = t.base, t.x, t.found, t.blocks, t.profile
    full = Target(batch_size=batch_of(t.name), threads=1, **(SMOKE_TIMING if smoke else {}))
    quick = screen_target(full)
    plans = random_plans(found, blocks, n, drops, random.Random(seed))
    models = [apply_plan(base, x, plan, discovery=found) for plan in plans]
    ratios = [plan.applied_ratios(profile.channels, profile.splits) for plan in plans]
    batch = Screen().batch  # timed as the screen times them: a batch against shared base runs
    short = [
        s.ratio
        for i in range(0, n, batch)
        for s in measure_group(models[i : i + batch], x, quick, base)
    ]
    truth = retimed(models, x, full, base)
    half = n // 2
    fitted = fit_costs(profile, ratios[:half], short[:half])
    plain = fit_costs(dataclasses.replace(profile, blocks=()), ratios[:half], short[:half])
    held = truth[half:]

    def scores(values: list[float]) -> tuple[float, float]:
        worst = max(abs(v / t - 1) for v, t in zip(values, held, strict=True))
        return float(kendalltau(values, held)[0]), worst

    return {
        "short": scores(short[half:]),
        "model": scores([fitted.predict(r) for r in ratios[half:]]),
        "plain": scores([plain.predict(r) for r in ratios[half:]]),
        "blocks": len(blocks),
    }


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="smoke test: digits, 8 plans")
    p.add_argument("--full", action="store_true", help="80 plans per task and family")
    p.add_argument("--plans", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    tasks = ("digits",) if args.tiny else TASKS
    n = args.plans or (8 if args.tiny else 80 if args.full else 40)
    rows = []
    for task in tasks:
        setup = Setup.of(task)
        for drops in (False, True):
            got = one_family(setup, drops, n, args.seed, args.tiny)
            if not got:
                continue
            rows.append(
                {
                    "task": task,
                    "plans": "drop up to 3 blocks" if drops else "channels only",
                    "short timing: tau, worst error": "{:.3f}, {:.3f}".format(*got["short"]),
                    "cost model: tau, worst error": "{:.3f}, {:.3f}".format(*got["model"]),
                    "without block overheads": "{:.3f}, {:.3f}".format(*got["plain"]),
                }
            )
    body = (
        "## The screen's latency sources: short timings and the cost model\n\n"
        f"{n} random plans per task and family (seed {args.seed}); the second half ranked against "
        "a careful re-timing (the target's full paired protocol, median of two) by each source. "
        "The cost model is fitted to the first half's short timings, as the screen's halfway "
        "refit is. Kendall tau (higher ranks better) and the worst relative error over the second "
        "half; 'without block overheads': the model with only its layers and intercept.\n\n"
        + table(rows, list(rows[0]))
        + "\n"
    )
    return write_section("cost-model", body, args.out)


if __name__ == "__main__":
    print(main())
