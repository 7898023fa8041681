"""Sensitivity scan: prune one group at a time, without finetuning, and record the accuracy.

It tells the search which layers tolerate pruning, so per-layer upper bounds can be narrowed
and the first trials seeded. One call scans some groups; the orchestrator spreads groups over
Ray tasks and caches the table per base model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from search_space import PruningPlan

from ._prune import apply_plan
from ._train import evaluate


def scan_groups(
    task_ref: str,
    task_options: Mapping[str, Any],
    base_state: Mapping[str, torch.Tensor] | None,
    groups: Sequence[str],
    ratios: Sequence[float],
    criterion: str = "l1",
) -> dict[str, dict[str, float]]:
    """``{group: {str(ratio): accuracy}}`` for each group pruned alone at each ratio."""
    from ._trial import _cached_task, load_base_state  # the per-process task cache trials use

    task = _cached_task(task_ref, json.dumps(dict(task_options), sort_keys=True))
    if base_state is not None:
        load_base_state(task.model, base_state)
    task.model.eval()
    torch.manual_seed(0)
    calib = [b for _, b in zip(range(2), task.train_loader, strict=False)]
    table: dict[str, dict[str, float]] = {}
    for group in groups:
        row = {}
        for r in ratios:
            plan = PruningPlan(ratios={group: r}, units={group: (group,)}, criterion=criterion)
            model = apply_plan(
                task.model, task.example_inputs, plan, calibration=calib, loss_fn=task.loss_fn
            )
            row[f"{r:g}"] = evaluate(model, task)
        table[group] = row
    return table


def upper_bounds(
    table: Mapping[str, Mapping[str, float]],
    base_accuracy: float,
    units: Mapping[str, Sequence[str]],
    max_drop: float,
) -> dict[str, float]:
    """Per unit: the largest scanned ratio at which every group of the unit loses at most ``max_drop``.

    A unit that loses more than that even at the smallest scanned ratio keeps the smallest one
    (finetuning recovers more than a scan without it suggests; the bound narrows, never closes).
    """
    bounds = {}
    for unit, groups in units.items():
        rows = [table[g] for g in groups if g in table]
        if not rows:
            continue
        ratios = sorted(float(r) for r in rows[0])
        ok = [r for r in ratios if all(base_accuracy - row[f"{r:g}"] <= max_drop for row in rows)]
        bounds[unit] = max(ok) if ok else ratios[0]
    return bounds
