"""What pruning a screened candidate costs by criterion: with the base model's gradients taken once
a batch (`workers.BaseGradients`, what the screen does) against each candidate calibrating its
own copy (what it did before).

    python -m benchmarks.screen_criteria           # digits and shifted_digits, 16 plans a criterion
    python -m benchmarks.screen_criteria --full    # 32 plans a criterion
    python -m benchmarks.screen_criteria --tiny    # smoke: digits, 3 plans, two criteria

Per task and criterion, a batch of uniform plans at spread ratios is pruned from the base model as
the screen prunes a batch (`apply_plan` on the screen's BatchNorm slice as calibration, the base's
discovery traced once), once each way, the two ways taking turns plan by plan. The gradients are
taken afresh for every batch, so the first candidate of each pays for them, as in the screen.
Reported: median and mean milliseconds a candidate each way, their ratio, and whether every pruned
model came out identical both ways.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

from search_space import discover, uniform_plan
from workers import BaseGradients, apply_plan, build_task, proxy_batches

from ._results import RESULTS, table, write_section

CRITERIA = ("l1", "taylor", "hessian")


def _pruned(task, found, bn, plan, gradients) -> tuple[float, dict]:
    """Milliseconds to prune ``plan`` as the screen does, and the pruned model's weights."""
    t0 = time.perf_counter()
    model = apply_plan(
        task.model, task.example_inputs, plan, calibration=bn, discovery=found, gradients=gradients
    )
    return (time.perf_counter() - t0) * 1000, model.state_dict()


def one_criterion(task, found, bn, criterion: str, n: int) -> dict[str, object]:
    ratios = [0.05 + 0.75 * i / max(1, n - 1) for i in range(n)]
    shared = BaseGradients(task.model, bn)  # one batch's: taken when its first plan needs it
    each, once, same = [], [], True
    for i, ratio in enumerate(ratios):
        plan = uniform_plan(found, ratio, criterion=criterion)
        ways = [None, shared] if i % 2 == 0 else [shared, None]  # take turns going first
        timed = {id(g): _pruned(task, found, bn, plan, g) for g in ways}
        (a, wa), (b, wb) = timed[id(None)], timed[id(shared)]
        each.append(a)
        once.append(b)
        same &= wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return {
        "criterion": criterion,
        "plans": n,
        "each ms (median / mean)": f"{statistics.median(each):.0f} / {statistics.mean(each):.0f}",
        "once ms (median / mean)": f"{statistics.median(once):.0f} / {statistics.mean(once):.0f}",
        "mean, once / each": f"{statistics.mean(once) / statistics.mean(each):.2f}x",
        "identical models": "yes" if same else "NO",
    }


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits,shifted_digits")
    ap.add_argument("--plans", type=int, default=16, help="plans a criterion: one screen batch")
    ap.add_argument("--full", action="store_true", help="32 plans a criterion")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--section", default="screen-criteria")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    tasks, n, criteria = args.tasks.split(","), 32 if args.full else args.plans, CRITERIA
    if args.tiny:
        tasks, n, criteria = ["digits"], 3, ("l1", "taylor")
    torch.set_num_threads(1)  # as a screen's worker runs
    rows = []
    t0 = time.perf_counter()
    for name in tasks:
        task = build_task(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = discover(task.model, task.example_inputs, verify=False, warn=False)
        bn, _ = proxy_batches(task, 0, 2, 4)  # search.screen's default slices
        _pruned(task, found, bn, uniform_plan(found, 0.5), None)  # warm-up: the first call's costs
        for criterion in criteria:
            torch.manual_seed(0)
            rows.append({"task": name} | one_criterion(task, found, bn, criterion, n))
    body = (
        "## Pruning a screened candidate, by criterion: the base model's gradients once a batch\n\n"
        + (__doc__ or "").split("\n\n", 2)[2].strip()
        + f"\n\nWall: {time.perf_counter() - t0:.0f} s.\n\n"
        + table(rows, list(rows[0]))
    )
    return write_section(args.section, body, args.out)


if __name__ == "__main__":
    main()
