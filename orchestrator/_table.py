"""The damage table: every prunable group pruned alone at a few ratios, screened like any candidate.

First-order importances (Taylor, on the base model) rank channels within a group well and groups
against each other badly: they miss what re-estimating BatchNorm recovers and what a layer's
neighbours make up for. The table measures it instead. Each group is pruned alone at
``RATIOS``, BatchNorm is re-estimated and the task's loss scored on the training slice, exactly
as the screen scores a candidate; how far the loss rose is that group's damage curve
(``search_space.with_damage`` turns the curves into the allocator's importances). Each entry is
timed on the target as well, so the cost model is fitted to measured milliseconds before the
first allocated candidate is drawn: a design that moves one group at a time, which tells the
groups' costs apart better than random plans do. Costs ``len(groups) * len(RATIOS) + 1``
screenings, never more than the screen's candidates (``table_ratios``), once per search (kept in
the screen study: a resumed search measures nothing again).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optuna
import ray

from search_space import Profile, PruningPlan, fit_costs, with_damage
from workers import ScreenResult, TrialStatus

if TYPE_CHECKING:  # the screen's setup, whose module imports this one
    from ._screen import ScreenSetup

RATIOS = (0.25, 0.5, 0.75)
ATTR = "damage_table"  # the screen study's user attribute that keeps the table


def damage_profile(sstudy: optuna.Study, s: ScreenSetup) -> Profile:
    """``s.profile`` with measured damage as importance and its costs fitted to the table's
    timings; the table is measured once and kept in ``sstudy``. A model with so many groups that
    the table would cost more screenings than the screen's candidates is measured at one ratio,
    or (more than that) not at all: the profile as it is, first-order importances."""
    table = sstudy.user_attrs.get(ATTR)
    if table is None:
        groups, cfg = list(s.profile.groups), s.config.search.screen
        ratios = table_ratios(len(groups), cfg.candidates)
        if not ratios:
            s.progress(
                f"damage table: skipped, {len(groups)} groups would cost more screenings than "
                f"the {cfg.candidates} candidates; the allocator uses first-order importances"
            )
            return s.profile
        plans = table_plans(groups, ratios, s.space.criteria[0])
        s.progress(
            f"damage table: each of {len(groups)} groups pruned alone at "
            f"{', '.join(f'{r:g}' for r in ratios)}, screened and timed ({len(plans)} candidates)"
        )
        chunks = [plans[i : i + cfg.batch] for i in range(0, len(plans), cfg.batch)]
        refs = [s.submit(s.job | {"candidates": chunk}) for chunk in chunks]
        results = [
            r
            for ref, chunk in zip(refs, chunks, strict=True)
            for r in batch_results(ref, [c["number"] for c in chunk])
        ]
        table = to_table(plans, results)
        sstudy.set_user_attr(ATTR, table)
    return table_profile(s.profile, table)


def table_ratios(groups: int, candidates: int) -> tuple[float, ...]:
    """``RATIOS`` when the table (one screening per group and ratio, and the reference) costs no
    more than the screen's candidates; else the middle ratio alone if that fits; else none."""
    for ratios in (RATIOS, (0.5,)):
        if groups * len(ratios) + 1 <= candidates:
            return ratios
    return ()


def table_plans(
    groups: Sequence[str], ratios: Sequence[float], criterion: str
) -> list[dict[str, Any]]:
    """The unpruned reference (number 0), then each group alone at each of ``ratios``."""
    entries = [(groups[0], 0.0)] + [(g, r) for g in groups for r in ratios]
    return [
        {
            "number": i,
            "plan": PruningPlan(
                ratios={group: ratio}, units={group: (group,)}, criterion=criterion
            ).to_dict(),
        }
        for i, (group, ratio) in enumerate(entries)
    ]


def to_table(plans: Sequence[Mapping[str, Any]], results: Sequence[ScreenResult]) -> dict:
    """Plain values for the study: ``points`` are ``[group, ratio, proxy, ms]`` (the first the
    unpruned reference), a failed entry left out and counted."""
    points, failed = [], 0
    for cand, r in zip(plans, results, strict=True):
        if r.status != TrialStatus.COMPLETE or r.proxy is None or r.latency is None:
            failed += 1
            continue
        ((group, ratio),) = cand["plan"]["ratios"].items()
        points.append([group, float(ratio), float(r.proxy), float(r.latency["median_ms"])])
    seconds = round(sum(r.seconds for r in results), 3)
    return {"points": points, "failed": failed, "seconds": seconds}


def table_profile(profile: Profile, table: Mapping[str, Any]) -> Profile:
    """The allocator's profile from a table: costs fitted to its timings, importance its damage.
    Without the unpruned reference (it failed) there is no damage to measure: ``profile``."""
    points = table["points"]
    base = [p for p in points if p[1] == 0.0]
    if not base:
        return profile
    damage: dict[str, dict[float, float]] = {}
    for group, ratio, proxy, _ in points:
        if ratio > 0.0:  # the proxy is minus the loss: damage is how far it fell
            damage.setdefault(group, {})[ratio] = max(0.0, base[0][2] - proxy)
    fitted = fit_costs(profile, *table_timings(table))
    return with_damage(fitted, damage)


def table_timings(table: Mapping[str, Any] | None) -> tuple[list[dict[str, float]], list[float]]:
    """The table's plans (group -> ratio) and their measured milliseconds: data for the fit."""
    if not table:
        return [], []
    points = table["points"]
    return [{g: r} for g, r, _, _ in points], [ms for _, _, _, ms in points]


def batch_results(ref: ray.ObjectRef, numbers: Sequence[int]) -> list[ScreenResult]:
    """A screening batch's results; if its worker died past its retries, every entry of the batch
    fails with the reason (the screen goes on)."""
    try:
        return ray.get(ref)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        reason = f"{type(exc).__name__}: {first}"
        return [ScreenResult(number=n, status=TrialStatus.FAILED, reason=reason) for n in numbers]
