"""The front: which trials are not dominated, and the hypervolume they cover."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from ._study import latency_of, plan_of, ranking_label


@dataclass(frozen=True)
class Point:
    number: int
    accuracy: float
    latency_ms: float


def front(study: optuna.Study, base: Mapping[str, float] | None = None) -> list[FrozenTrial]:
    """The feasible Pareto front, sorted by latency (Optuna applies the constraints).

    With ``base`` (its ``accuracy`` and ``latency_ms``), without the trials the base model
    dominates: a pruned model no faster than the model the user already has, and no more
    accurate, is no pick (on a target where pruning buys no speed the front may be empty).
    Faster means by more than the latency's noise floor where the target measured one
    (``calibration_noise``: the spread of the base model timed against itself): within it the
    base model may be as fast."""
    kept = study.best_trials
    if base is not None:
        faster = faster_than_base(base)
        kept = [t for t in kept if t.values[1] < faster or t.values[0] > base["accuracy"]]
    return sorted(kept, key=lambda t: t.values[1])


def faster_than_base(base: Mapping[str, float]) -> float:
    """The latency a model must beat to count as faster than the base model: the base's, less
    its noise floor where one was measured."""
    return base["latency_ms"] * (1.0 - float(base.get("calibration_noise", 0.0)))


def points(trials: Sequence[FrozenTrial]) -> list[Point]:
    return [Point(t.number, t.values[0], t.values[1]) for t in trials]


def hypervolume(front_points: Sequence[Point], ref_latency_ms: float, ref_accuracy: float) -> float:
    """Area dominated by the front inside the box [ref_accuracy, 1] x [0, ref_latency].

    The reference is the base model's latency and an accuracy floor, so the number reads as
    "how much faster at how little accuracy cost", comparable across searches of one model.
    """
    pts = sorted(
        (p for p in front_points if p.latency_ms < ref_latency_ms and p.accuracy > ref_accuracy),
        key=lambda p: p.latency_ms,
    )
    area, best_acc = 0.0, ref_accuracy
    for i, p in enumerate(pts):
        best_acc = max(best_acc, p.accuracy)
        right = pts[i + 1].latency_ms if i + 1 < len(pts) else ref_latency_ms
        area += (right - p.latency_ms) * (best_acc - ref_accuracy)
    return area


def front_table(study: optuna.Study, base: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for t in front(study, base):
        plan, latency = plan_of(t), latency_of(t)
        rows.append(
            {
                "trial": t.number,
                "accuracy": round(t.values[0], 4),
                "latency_ms": round(t.values[1], 4),
                "speedup": round(base["latency_ms"] / t.values[1], 3),
                "macs": t.user_attrs.get("macs"),
                "params": t.user_attrs.get("params"),
                "criterion": ranking_label(plan, t.user_attrs.get("ranked_by")),
                # the same model on every other target the search measures (see `target` in README)
                **{
                    f"{name}_ms": round(stats.median_ms, 4)
                    for name, stats in (latency.targets if latency else {}).items()
                },
            }
        )
    return rows
