"""The search space: what a trial may choose, and how an Optuna trial becomes a PruningPlan.

Pure: no Optuna import. ``suggest_plan`` takes anything with Optuna's ``suggest_*`` methods.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from ._allocation import Profile, allocate
from ._discovery import Discovery
from ._plan import PruningPlan
from ._recovery import RecoverySpace

CRITERIA = ("l1", "l2", "bn_scale", "lamp", "fpgm", "taylor", "hessian", "random")
# allocation: one ratio per group, set by the latency-aware allocator (search_space/_allocation.py)
# from two knobs the trial samples, a latency level and a blend towards the uniform plan.
GRANULARITIES = ("allocation", "layer", "block", "uniform")


class TrialLike(Protocol):
    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None
    ) -> float: ...
    def suggest_categorical(self, name: str, choices: Sequence) -> object: ...


@dataclass(frozen=True)
class SearchSpace:
    granularity: str = "allocation"
    ratio: tuple[float, float] = (
        0.0,
        0.7,
    )  # allocation: the range of the level (a uniform ratio's saving)
    blend: tuple[float, float] = (0.0, 1.0)  # allocation: 0 is the uniform plan, 1 the allocator's
    step: float = 0.05
    max_ratio: float = 0.9
    # allocation: at most this many residual blocks dropped whole, least damaging first
    # (alloc/depth; search_space/_depth.py); None: any of them, the default; 0: channels only.
    # Dropping a block removes its ops, which no channel ratio can: where per-op overhead is
    # much of the latency (small batches) that is the fastest way down (README, Benchmarks).
    depth: int | None = None
    block_depth: int = (
        1  # block granularity: groups sharing this many leading name parts share a ratio
    )
    overrides: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # pattern -> range
    exclude: tuple[str, ...] = ()
    criteria: tuple[str, ...] = ("l1", "l2", "bn_scale", "lamp")
    per_layer_criteria: bool = False
    round_to: tuple[int, ...] = (1, 8)
    global_pruning: tuple[bool, ...] = (False,)
    isomorphic: tuple[bool, ...] = (False,)
    iterative_steps: tuple[int, ...] = (1,)
    # How each trial recovers accuracy (search_space/_recovery.py); sampled by suggest_recovery.
    recovery: RecoverySpace = field(default_factory=RecoverySpace)

    def __post_init__(self) -> None:
        validate_space(self)


def validate_space(space: SearchSpace) -> None:
    """Raise ValueError naming the field and the fix."""
    if space.granularity not in GRANULARITIES:
        raise ValueError(
            f"search.space.granularity: {space.granularity!r} is not one of {list(GRANULARITIES)}"
        )
    _check_range("search.space.ratio", space.ratio)
    if len(space.blend) != 2 or not 0.0 <= space.blend[0] <= space.blend[1] <= 1.0:
        raise ValueError(
            f"search.space.blend: {list(space.blend)} must be [low, high] with 0 <= low <= high <= 1"
        )
    for pattern, rng in space.overrides.items():
        _check_range(f"search.space.overrides[{pattern!r}]", rng)
    if not 0 < space.step < 1:
        raise ValueError(f"search.space.step: {space.step} must lie in (0, 1)")
    if not 0 < space.max_ratio < 1:
        raise ValueError(f"search.space.max_ratio: {space.max_ratio} must lie in (0, 1)")
    for name in space.criteria:
        if name not in CRITERIA:
            raise ValueError(
                f"search.space.criteria: unknown criterion {name!r}; choose from {list(CRITERIA)}"
            )
    if not space.criteria:
        raise ValueError("search.space.criteria: give at least one criterion")
    for r in space.round_to:
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"search.space.round_to: {r!r} must be a positive integer")
    for s in space.iterative_steps:
        if not isinstance(s, int) or s < 1:
            raise ValueError(f"search.space.iterative_steps: {s!r} must be a positive integer")
    if space.depth is not None and (
        isinstance(space.depth, bool) or not isinstance(space.depth, int) or space.depth < 0
    ):
        raise ValueError(
            f"search.space.depth: {space.depth!r} must be a whole number >= 0 (0: drop no "
            "block) or null (any block)"
        )
    if space.block_depth < 1:
        raise ValueError(f"search.space.block_depth: {space.block_depth} must be >= 1")
    if True in space.global_pruning and space.granularity in ("layer", "allocation"):
        raise ValueError(
            "search.space.global_pruning: global pruning ranks the groups of a unit against "
            f"each other; with granularity {space.granularity!r} every unit is one group, so it "
            "would prune exactly as local pruning does: set global_pruning: [false], or "
            "granularity: uniform (one ratio, ranked across all groups) or block"
        )
    if True in space.isomorphic and space.granularity != "uniform":
        raise ValueError(
            "search.space.isomorphic: isomorphic pruning ranks each group against the groups "
            "of its structure under one shared ratio, so it needs granularity: uniform; with "
            f"{space.granularity!r} each unit has a ratio of its own and it would change "
            "nothing: set isomorphic: [false] or granularity: uniform"
        )


def _check_range(where: str, rng: Sequence[float]) -> None:
    if len(rng) != 2:
        raise ValueError(f"{where}: give [low, high], got {list(rng)}")
    low, high = rng
    if not (0.0 <= low <= high < 1.0):
        raise ValueError(f"{where}: [{low}, {high}] must satisfy 0 <= low <= high < 1")


def units_for(space: SearchSpace, discovery: Discovery) -> dict[str, tuple[str, ...]]:
    """Group discovery's groups into the units that each get one ratio."""
    names = discovery.names
    if space.granularity == "uniform":
        return {"all": names} if names else {}
    if space.granularity in ("layer", "allocation"):
        return {n: (n,) for n in names}
    blocks: dict[str, list[str]] = {}
    for n in names:
        blocks.setdefault(".".join(n.split(".")[: space.block_depth]), []).append(n)
    return {b: tuple(gs) for b, gs in blocks.items()}


def ratio_range(space: SearchSpace, unit: str) -> tuple[float, float]:
    """The first override whose pattern matches the unit wins; else the space's range."""
    for pattern, rng in space.overrides.items():
        if fnmatch.fnmatchcase(unit, pattern):
            return float(rng[0]), float(rng[1])
    return float(space.ratio[0]), float(space.ratio[1])


def suggest_plan(
    trial: TrialLike,
    space: SearchSpace,
    discovery: Discovery,
    profile: Profile | None = None,
    *,
    per_layer: bool = False,
    subset: bool = False,
) -> PruningPlan:
    """Sample one plan. Parameter names are stable: ``ratio/<unit>`` (or ``alloc/level`` and
    ``alloc/blend`` for allocation), ``criterion``, ... Allocation needs the groups' ``profile``.
    ``per_layer``: under allocation, each group's ratio sampled on its own instead of allocated
    (blocks still dropped as allocation drops them): the screen's per-layer share. ``subset``:
    under allocation, each group is also sampled pruned or left whole (``alloc/whole/<unit>``),
    and the level's budget allocated over the pruned ones: the screen's subset share."""
    units = units_for(space, discovery)
    drop: dict[str, tuple[str, ...]] = {}
    # Sampled first: the allocator meets its latency level only if it knows the rounding.
    round_to = int(trial.suggest_categorical("round_to", list(space.round_to)))
    if space.granularity == "allocation" and not per_layer:
        ratios = _allocated(trial, space, units, profile, round_to, subset=subset)
        drop = _dropped(trial, space, profile)
    else:
        ratios = {}
        for unit in units:
            low, high = ratio_range(space, unit)
            ratios[unit] = (
                low
                if low == high
                else trial.suggest_float(f"ratio/{unit}", low, high, step=space.step)
            )
        if space.granularity == "allocation":
            drop = _dropped(trial, space, profile)
    criterion = str(trial.suggest_categorical("criterion", list(space.criteria)))
    criteria = {}
    if space.per_layer_criteria:
        criteria = {
            u: str(trial.suggest_categorical(f"criterion/{u}", list(space.criteria))) for u in units
        }
    return PruningPlan(
        ratios=ratios,
        units=units,
        criterion=criterion,
        criteria=criteria,
        round_to=round_to,
        global_pruning=bool(
            trial.suggest_categorical("global_pruning", list(space.global_pruning))
        ),
        isomorphic=bool(trial.suggest_categorical("isomorphic", list(space.isomorphic))),
        iterative_steps=int(
            trial.suggest_categorical("iterative_steps", list(space.iterative_steps))
        ),
        max_ratio=space.max_ratio,
        drop=drop,
    )


def _dropped(
    trial: TrialLike, space: SearchSpace, profile: Profile | None
) -> dict[str, tuple[str, ...]]:
    """The ``alloc/depth`` least damaging of the profile's residual blocks (at most
    ``space.depth``); no parameter where the space or the model allows none."""
    blocks = profile.blocks[: space.depth] if profile is not None else ()  # [:None]: all
    if not blocks:
        return {}
    k = int(trial.suggest_categorical("alloc/depth", list(range(len(blocks) + 1))))
    return {b.name: b.groups for b in blocks[:k]}


def _allocated(
    trial: TrialLike,
    space: SearchSpace,
    units: Mapping[str, tuple[str, ...]],
    profile: Profile | None,
    round_to: int,
    *,
    subset: bool = False,
) -> dict[str, float]:
    """The allocator's ratios for the sampled level and blend, each clipped to its unit's range
    (overrides, a sensitivity scan's bounds). ``round_to``: the plan's, so that no group is
    planned below what the pruner will keep of it (and the saving goes where it can be had).
    ``subset``: the groups left whole are sampled too (``_whole``)."""
    if profile is None or set(profile.groups) != set(units):
        raise ValueError(
            "granularity allocation needs the profile of every prunable group "
            "(workers.profile_groups); use granularity layer to sample ratios directly"
        )
    low, high = space.ratio
    level = low if low == high else trial.suggest_float("alloc/level", low, high, step=space.step)
    b_low, b_high = space.blend
    blend = (
        b_low if b_low == b_high else trial.suggest_float("alloc/blend", b_low, b_high, step=0.05)
    )
    ratios = allocate(
        profile,
        float(level),
        float(blend),
        max_ratio=min(space.max_ratio, high),
        round_to=round_to,
        whole=_whole(trial, units) if subset else (),
    )
    return {
        u: min(max(r, ratio_range(space, u)[0]), ratio_range(space, u)[1])
        for u, r in ratios.items()
    }


def _whole(trial: TrialLike, units: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The units a subset plan leaves whole, one yes/no each, so that the screen's sampler learns
    which groups are worth pruning at all. All of them whole would be the base model: then none
    (the plain allocation)."""
    whole = tuple(
        u for u in units if bool(trial.suggest_categorical(f"alloc/whole/{u}", [False, True]))
    )
    return () if len(whole) == len(units) else whole


def uniform_plan(
    discovery: Discovery, ratio: float, *, criterion: str = "l1", round_to: int = 1
) -> PruningPlan:
    """One ratio for every group: Torch-Pruning's default recipe, used as a baseline."""
    units = {"all": discovery.names}
    return PruningPlan(ratios={"all": ratio}, units=units, criterion=criterion, round_to=round_to)


def narrow_space(space: SearchSpace, bounds: Mapping[str, float]) -> SearchSpace:
    """Cap each unit's ratio range at ``bounds[unit]`` (from a sensitivity scan).

    The user's own overrides still win: a unit they matched keeps their range.
    """
    derived = {}
    for unit, bound in bounds.items():
        if any(fnmatch.fnmatchcase(unit, p) for p in space.overrides):
            continue
        low, high = space.ratio
        derived[unit] = (low, snap(min(high, max(bound, low)), low, space.step))
    return replace(space, overrides={**space.overrides, **derived})


def snap(value: float, low: float, step: float) -> float:
    """The grid point of ``low + k * step`` at or below ``value``."""
    k = int((value - low) / step + 1e-9)
    return round(low + k * step, 10)


def seed_params(
    space: SearchSpace,
    discovery: Discovery,
    bounds: Mapping[str, float],
    fractions: Sequence[float],
) -> list[dict[str, object]]:
    """Trial parameters that put every unit at a fraction of its safe bound (first trials of a search)."""
    units = units_for(space, discovery)
    seeds = []
    for f in fractions:
        params: dict[str, object] = {"criterion": space.criteria[0]}
        for unit in units:
            low, high = ratio_range(space, unit)
            if low < high:
                params[f"ratio/{unit}"] = snap(
                    max(low, min(high, f * bounds.get(unit, high))), low, space.step
                )
        seeds.append(params)
    return seeds


def anchor_params(space: SearchSpace, discovery: Discovery, count: int) -> list[dict[str, object]]:
    """Ratios of ``count`` anchor trials: every unit at one ratio, evenly spaced over the space's
    range ``(low, high]`` (``low`` itself is the least pruning, which sampling reaches anyway).

    Why: independent per-unit ratios average out mid-range, so sampled plans cluster at middling
    speed-ups; anchors put the first trials across the whole latency range, as a uniform sweep
    does, and give the sampler fast models to learn from. Each unit's value is clipped to its own
    range (overrides, a sensitivity scan's bounds) and snapped to the step grid; units with a
    fixed ratio are not parameters. Ordered so that any prefix spans the range (top first, then
    halves), for a search stopped before every anchor ran. The criterion is the space's first (as
    for sensitivity seeds) and rounding the finest, so an anchor prunes exactly its ratio and
    anchors differ only in it; recovery stays the sampler's. Duplicates (clipping can merge
    anchors) are dropped.
    """
    allocation = space.granularity == "allocation"  # one level stands for every unit's ratio
    units = {} if allocation else units_for(space, discovery)
    low, high = float(space.ratio[0]), float(space.ratio[1])
    out: list[dict[str, object]] = []
    for k in spread_order(count):
        level = low + (high - low) * k / count
        params: dict[str, object] = {}
        if allocation and low < high:  # the uniform plan at this level: blend at its lowest
            params["alloc/level"] = snap(level, low, space.step)
            if space.blend[0] < space.blend[1]:
                params["alloc/blend"] = space.blend[0]
            if space.depth != 0:  # and every block kept: the uniform plan
                params["alloc/depth"] = 0
        for unit in units:
            u_low, u_high = ratio_range(space, unit)
            if u_low < u_high:
                params[f"ratio/{unit}"] = snap(min(u_high, max(u_low, level)), u_low, space.step)
        if params and params not in out:
            out.append(params)
    return [{**p, "criterion": space.criteria[0], "round_to": min(space.round_to)} for p in out]


def spread_order(count: int) -> list[int]:
    """1..count, ordered so that every prefix is spread out: ``count`` first, then each next one
    as far as possible from those taken and from 0 (ties: the smaller)."""
    order: list[int] = []
    left = list(range(1, count + 1))
    while left:
        taken = [0, *order]
        best = count if not order else max(left, key=lambda k: (min(abs(k - t) for t in taken), -k))
        order.append(best)
        left.remove(best)
    return order
