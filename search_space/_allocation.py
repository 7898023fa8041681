"""Latency-aware allocation: per-group ratios that keep the most importance for a latency budget.

Pure: takes a :class:`Profile` (measured by ``workers.profile_groups``) and returns ratios. The
allocator is HALP's idea (NeurIPS 2022) reduced to its core: every channel has an importance (how
much the loss leans on it, comparable across groups) and a cost (the latency its removal saves);
removing channels in order of least importance per unit of latency saved is the greedy solution
of "save this much latency, lose the least importance".

Costs come from a model of the network's layers, not from a per-group constant: a layer's work
scales with the channels kept on *both* its sides (``cost * keep_out * keep_in``), so pruning a
layer's producer and the layer itself saves less than the two savings added. The model starts in
MACs and is refitted to measured latencies (``fit_costs``): each layer gets its own milliseconds
per unit of work, and an intercept holds what no channel ratio changes (per-op overhead).

The budget is a *level*: what the uniform plan at that ratio saves, under the same model. So
``level`` spans the range a uniform sweep spans, and ``blend`` moves from the uniform plan (0) to
the allocation (1): the space contains Torch-Pruning's default recipe.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ._depth import DroppableBlock, dropped_modules
from ._plan import DROPPED, pruned_fraction


@dataclass(frozen=True)
class GroupProfile:
    """One prunable group: its channels' importances, ascending (the order its criterion would
    prune them in), unnormalised so that groups compare."""

    channels: int
    importance: tuple[float, ...]
    # Equal slices the pruner cuts alike (grouped convs, GroupNorm, heads): it removes channels
    # ``split`` at a time, one from each slice (``search_space.kept_channels``).
    split: int = 1

    def __post_init__(self) -> None:
        if self.channels < 1 or len(self.importance) != self.channels:
            raise ValueError(
                f"GroupProfile: {len(self.importance)} importances for {self.channels} channels"
            )
        if self.split < 1 or self.channels % self.split:
            raise ValueError(
                f"GroupProfile: {self.channels} channels do not split in {self.split} slices"
            )
        ordered = tuple(
            sorted(max(0.0, float(v)) if math.isfinite(v) else 0.0 for v in self.importance)
        )
        object.__setattr__(self, "importance", ordered)


@dataclass(frozen=True)
class LayerCost:
    """One layer's work at full width, and the groups that prune its output and input channels
    (None: that side is never pruned; a depthwise conv's input follows its output: None)."""

    name: str
    cost: float
    out_group: str | None = None
    in_group: str | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.cost) or self.cost < 0:
            raise ValueError(f"LayerCost {self.name!r}: cost {self.cost} must be finite and >= 0")


@dataclass(frozen=True)
class Profile:
    """What the allocator knows of a model: its groups and a cost model of its layers."""

    groups: Mapping[str, GroupProfile]
    layers: tuple[LayerCost, ...] = ()
    intercept: float = 0.0  # cost no ratio changes (fitted: per-op overhead, unmodelled layers)
    unit: str = "macs"  # "ms" once fitted to measured latencies
    # Residual blocks a plan may drop (search_space/_depth.py), least damaging first; empty
    # unless the search's space allows depth.
    blocks: tuple[DroppableBlock, ...] = ()
    _by_group: dict[str, list[LayerCost]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _block_of: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for layer in self.layers:
            for g in (layer.out_group, layer.in_group):
                if g is not None and g not in self.groups:
                    raise ValueError(
                        f"Profile: layer {layer.name!r} names group {g!r} the profile does not have"
                    )
            for g in {layer.out_group, layer.in_group} - {None}:
                self._by_group.setdefault(g, []).append(layer)
        inside = {m: DROPPED + b.name for b in self.blocks for m in dropped_modules([b.name])}
        for layer in self.layers:
            module = layer.name.split(":")[0]  # "<layer>:outputs" is the layer's outputs term
            parts = module.split(".")
            for k in range(len(parts), 0, -1):  # the innermost block the layer lies in
                if (key := inside.get(".".join(parts[:k]))) is not None:
                    self._block_of[layer.name] = key
                    break

    @property
    def channels(self) -> dict[str, int]:
        """Each group's channel count (what ``PruningPlan.applied_ratios`` reads a plan by)."""
        return {g: p.channels for g, p in self.groups.items()}

    @property
    def splits(self) -> dict[str, int]:
        """Each group's slices (``GroupProfile.split``): ``applied_ratios``' second argument."""
        return {g: p.split for g, p in self.groups.items()}

    def predict(self, ratios: Mapping[str, float]) -> float:
        """The model's cost of a plan (group -> ratio; a group not named keeps every channel)."""
        return self.intercept + sum(self.works(ratios))

    def works(self, ratios: Mapping[str, float]) -> list[float]:
        """Each layer's work under ``ratios`` (``PruningPlan.cost_ratios``): its channels kept
        on both sides, none where the plan drops the block it lies in (``block:<name>``)."""
        keep = {g: 1.0 - float(ratios.get(g, 0.0)) for g in self.groups}
        gone = {k for k in set(self._block_of.values()) if float(ratios.get(k, 0.0)) >= 1.0}
        return [
            0.0 if self._block_of.get(layer.name) in gone else _work(layer, keep)
            for layer in self.layers
        ]

    def to_dict(self) -> dict[str, object]:
        return {
            "groups": {g: list(p.importance) for g, p in self.groups.items()},
            **({"splits": self.splits} if any(p.split > 1 for p in self.groups.values()) else {}),
            "layers": [[x.name, x.cost, x.out_group, x.in_group] for x in self.layers],
            "intercept": self.intercept,
            "unit": self.unit,
            **({"blocks": [b.to_list() for b in self.blocks]} if self.blocks else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Profile:
        splits = dict(data.get("splits", {}))
        groups = {
            g: GroupProfile(len(v), tuple(float(x) for x in v), int(splits.get(g, 1)))
            for g, v in dict(data["groups"]).items()
        }
        layers = tuple(LayerCost(str(n), float(c), o, i) for n, c, o, i in data.get("layers", []))
        blocks = tuple(DroppableBlock.from_list(b) for b in data.get("blocks", []))
        return cls(
            groups,
            layers,
            float(data.get("intercept", 0.0)),
            str(data.get("unit", "macs")),
            blocks,
        )


def _work(layer: LayerCost, keep: Mapping[str, float]) -> float:
    out = keep[layer.out_group] if layer.out_group is not None else 1.0
    inp = keep[layer.in_group] if layer.in_group is not None else 1.0
    return layer.cost * out * inp


def allocate(
    profile: Profile,
    level: float,
    blend: float = 1.0,
    *,
    max_ratio: float = 0.9,
    round_to: int = 1,
    precision: int = 4,
    whole: Collection[str] = (),
) -> dict[str, float]:
    """Per-group ratios saving what the uniform plan at ratio ``level`` saves, keeping the most
    importance; ``blend`` 0 returns exactly that uniform plan, 1 the allocation, between the two
    a mix of their ratios.

    ``whole``: groups left unpruned (ratio 0). The uniform plan is then ``level`` on every other
    group, and the allocation saves what that plan saves, from those groups alone: a plan that
    prunes a few groups and leaves the rest whole, which no importance ranking of channels
    proposes (it spreads a budget over every group whose channels rank low).

    ``max_ratio`` caps every group. ``round_to``: the pruner keeps a multiple of it of every
    group it prunes (Torch-Pruning rounds the kept channels down), so the allocator removes
    channels in those steps and returns ratios that keep exactly what it allocated; a ratio
    between two steps would be rounded to the lower one, spending a whole block of importance
    the allocation never chose.
    """
    if not 0.0 <= level < 1.0:
        raise ValueError(f"allocate: level {level} must lie in [0, 1)")
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"allocate: blend {blend} must lie in [0, 1]")
    uniform = {g: 0.0 if g in whole else min(level, max_ratio) for g in profile.groups}
    if blend == 0.0 or level == 0.0:
        return uniform
    applied = {
        g: pruned_fraction(uniform[g], p.channels, round_to, p.split)
        for g, p in profile.groups.items()
    }
    budget = profile.predict({}) - profile.predict(applied)
    removed = _greedy(profile, budget, max_ratio, round_to, frozenset(whole))
    out = {}
    for g, p in profile.groups.items():
        mixed = (1 - blend) * uniform[g] + blend * removed[g] / p.channels
        if round_to > 1 or p.split > 1 or blend == 1.0:
            step = _step(round_to, p.split)
            least = p.channels - _cap(p.channels, max_ratio, step)
            kept = _nearest_kept(mixed, p.channels, step, least)
            out[g] = _ratio_keeping(kept, p.channels, precision)
        else:
            out[g] = round(mixed, precision)
    return out


def _step(round_to: int, split: int) -> int:
    """Channels the pruner removes at a time from a group (``kept_channels``)."""
    return math.lcm(max(1, round_to), max(1, split))


def _nearest_kept(ratio: float, channels: int, step: int, least: int) -> int:
    """The count the pruner can keep (all, or a multiple of ``step``; at least ``least``)
    nearest to what ``ratio`` asks for."""
    want = channels * (1 - ratio)
    options = [channels] + [k for k in range(step, channels, step) if k >= least]
    return min(options, key=lambda k: (abs(k - want), -k))


def _ratio_keeping(kept: int, channels: int, precision: int) -> float:
    """The ``precision``-digit ratio at which ``int(channels * (1 - ratio))`` is exactly
    ``kept`` (a count ``kept_channels`` leaves as it is): the plain quotient rounded to nearest
    can land a hair above it (48 channels, 32 removed: 0.6667 keeps 15.998, truncated to 15,
    then rounded down by a whole block)."""
    step = 10.0**-precision
    ratio = round((channels - kept) / channels, precision)
    for _ in range(100):
        got = int(channels * (1 - ratio))
        if got == kept:
            break
        ratio = round(ratio + (step if got > kept else -step), precision)
    return max(0.0, ratio)


def _steps(channels: int, cap: int, step: int) -> list[int]:
    """The counts of removed channels the pruner can apply, ascending, up to ``cap``: those
    that leave a multiple of ``step`` (every count when it is 1), never fewer than ``step``."""
    step = max(1, step)
    kept = channels - (channels % step or step)
    out = []
    while kept >= step and channels - kept <= cap:
        out.append(channels - kept)
        kept -= step
    return out


def _greedy(
    profile: Profile, budget: float, max_ratio: float, round_to: int, whole: frozenset[str]
) -> dict[str, int]:
    """Channels to remove per group, in the steps the pruner applies (``_steps``), least
    importance per unit of cost saved first, until ``budget`` is saved. A step's saving shrinks
    as its neighbours are pruned, so other groups' keys only grow: a lazy heap (re-key the top;
    take it if it is still the least) stays exact. A step that would overshoot the budget by
    more than it leaves short is passed over, so a smaller step elsewhere can close the gap.
    Groups in ``whole`` take no step."""
    groups = profile.groups
    steps = {
        g: [] if g in whole else _steps(p.channels, _cap(p.channels, max_ratio, step), step)
        for g, p in groups.items()
        if (step := _step(round_to, p.split))
    }
    taken = dict.fromkeys(groups, 0)  # steps taken per group
    removed = dict.fromkeys(groups, 0)
    keep = dict.fromkeys(groups, 1.0)

    def key(g: str) -> tuple[float, float]:
        n = steps[g][taken[g]] - removed[g]
        saving = _saving(profile, g, keep, n)
        lost = sum(groups[g].importance[removed[g] : removed[g] + n])
        return (lost / saving if saving > 0 else math.inf), saving

    heap = [(key(g)[0], g) for g in groups if steps[g]]
    heapq.heapify(heap)
    saved = 0.0
    while heap and saved < budget - 1e-12 * max(1.0, budget):
        _, g = heapq.heappop(heap)
        fresh, saving = key(g)
        if math.isinf(fresh):
            continue  # removing it saves nothing any more
        if heap and fresh > heap[0][0] + 1e-15:
            heapq.heappush(heap, (fresh, g))
            continue
        if saved + saving - budget > budget - saved:
            continue  # overshoots more than it closes; smaller steps elsewhere may fit
        removed[g] = steps[g][taken[g]]
        taken[g] += 1
        keep[g] = 1.0 - removed[g] / groups[g].channels
        saved += saving
        if taken[g] < len(steps[g]):
            heapq.heappush(heap, (key(g)[0], g))
    return removed


def _saving(profile: Profile, g: str, keep: Mapping[str, float], n: int = 1) -> float:
    """What removing ``n`` more channels of ``g`` saves, given what every group keeps now."""
    after = dict(keep)
    after[g] = keep[g] - n / profile.groups[g].channels
    layers = profile._by_group.get(g, [])
    return sum(_work(x, keep) - _work(x, after) for x in layers)


def _cap(channels: int, max_ratio: float, step: int) -> int:
    """Most channels a group may lose: the ratio cap, and at least ``step`` (and one) kept."""
    return max(0, min(int(channels * max_ratio + 1e-9), channels - max(1, step)))


def fit_costs(
    profile: Profile,
    plans: Sequence[Mapping[str, float]],
    latencies: Sequence[float],
    *,
    prior_weight: float = 0.1,
) -> Profile:
    """Refit the cost model to measured latencies (ms): ``latency ~ intercept + sum_l w_l *
    work_l(plan) + sum_b o_b * kept_b(plan)`` with every ``w_l, o_b >= 0``, the ``w_l`` pulled
    toward one common ms-per-MAC (least squares of the latencies on the model's MACs) so that
    layers the plans barely vary keep their share.

    ``o_b`` is what dropping block ``b`` saves beyond its layers' work: the time of its other
    ops (normalisations, activations, the addition, each op's dispatch), which no MAC count
    holds and which is most of a small block's time at small batches. Fitted on half of 40
    plans that drop blocks, the model ranked the other half's careful re-timings on digits at
    Kendall tau 0.97 with these terms, 0.83 without (RESULTS.md, cost-model); on colour_shapes
    (7 blocks) 0.88 against 0.72 fitted on 48 plans, as a default screen's refit is; on 20,
    one draw 0.85 against 0.73, another 0.81 against 0.88 (too few plans for 7 terms).
    Fitted for each block that at least ``MIN_DROPS`` plans drop
    and as many keep; kept as a layer ``<module>:overhead`` with no group (its work is its
    cost, none when its block is dropped).

    Returns the profile with layer costs and intercept in ms; the profile as given when there
    are fewer measured plans than three, or when it has no layers.
    """
    import numpy as np
    from scipy.optimize import nnls

    if len(plans) < 3 or not profile.layers:
        return profile
    # Refitted from the layers alone: a fitted profile's overhead terms are fitted anew.
    profile = replace(profile, layers=tuple(x for x in profile.layers if not _is_overhead(x)))
    x = np.array([profile.works(p) for p in plans])
    y = np.asarray(latencies, dtype=float)
    # The prior: one ms-per-MAC for every layer, and the intercept, from a two-parameter fit.
    total = x.sum(axis=1)
    a_mat = np.vstack([total, np.ones_like(total)]).T
    (scale, _), _ = nnls(a_mat, y) if len(y) >= 2 else ((0.0, 0.0), 0.0)
    n_layers = len(profile.layers)
    blocks, kept = _varied_blocks(profile, plans)
    lam = prior_weight * math.sqrt(len(y)) * (float(np.std(x)) or 1.0)
    design = np.hstack([x, kept.reshape(len(y), len(blocks)), np.ones((len(y), 1))])
    ridge = np.zeros((n_layers, design.shape[1]))
    ridge[:, :n_layers] = lam * np.eye(n_layers)
    coef, _ = nnls(np.vstack([design, ridge]), np.concatenate([y, lam * np.full(n_layers, scale)]))
    layers = tuple(
        LayerCost(layer.name, float(coef[i] * layer.cost), layer.out_group, layer.in_group)
        for i, layer in enumerate(profile.layers)
    ) + tuple(
        LayerCost(min(dropped_modules([b.name])) + OVERHEAD, float(coef[n_layers + j]))
        for j, b in enumerate(blocks)
    )
    return replace(profile, layers=layers, intercept=float(coef[-1]), unit="ms")


OVERHEAD = ":overhead"  # a block's ops beyond its layers' work, fitted (``fit_costs``)
MIN_DROPS = 3  # plans that must drop a block, and keep it, before its overhead is fitted


def _is_overhead(layer: LayerCost) -> bool:
    return layer.name.endswith(OVERHEAD)


def _varied_blocks(profile: Profile, plans: Sequence[Mapping[str, float]]):
    """The blocks that at least MIN_DROPS plans drop and as many keep, and for each plan 1.0
    where it keeps each of them (a plans x blocks array)."""
    import numpy as np

    def keeps(p: Mapping[str, float], b: DroppableBlock) -> float:
        return 0.0 if float(p.get(DROPPED + b.name, 0.0)) >= 1.0 else 1.0

    blocks = [
        b
        for b in profile.blocks
        if MIN_DROPS <= sum(keeps(p, b) for p in plans) <= len(plans) - MIN_DROPS
    ]
    return blocks, np.array([[keeps(p, b) for b in blocks] for p in plans], dtype=float)


def with_damage(profile: Profile, damage: Mapping[str, Mapping[float, float]]) -> Profile:
    """``profile`` with each group's channel importances replaced by what pruning that group
    alone was measured to cost. ``damage[g][r]`` is how much the task's loss rose (after adaptive
    BatchNorm) with only ``g`` pruned at ratio ``r``.

    The k-th channel removed is charged the slope of the damage curve through (0, 0) and the
    measured points (held non-decreasing: a point below an earlier one is noise), and beyond the
    last point the last slope. All groups are then in one unit, the loss, which first-order
    importances are not: they miss what BatchNorm re-estimation recovers and what a channel's
    neighbours compensate. A group with no measured point gets the median slope, so the
    allocator neither prefers nor spares it.
    """
    slopes = {g: _slopes(p.channels, damage.get(g) or {}) for g, p in profile.groups.items()}
    measured = sorted(v for s in slopes.values() if s for v in s)
    neutral = measured[len(measured) // 2] if measured else 1.0
    groups = {
        g: GroupProfile(p.channels, tuple(slopes[g] or [neutral] * p.channels), p.split)
        for g, p in profile.groups.items()
    }
    return replace(profile, groups=groups)


def _slopes(channels: int, curve: Mapping[float, float]) -> list[float]:
    points = [(0.0, 0.0)]
    for ratio in sorted(r for r in curve if 0.0 < r < 1.0 and math.isfinite(curve[r])):
        points.append((ratio * channels, max(points[-1][1], float(curve[ratio]))))
    if len(points) < 2:
        return []
    out, seg = [], 1
    for k in range(channels):
        while seg < len(points) - 1 and k + 0.5 > points[seg][0]:
            seg += 1
        (x0, y0), (x1, y1) = points[seg - 1], points[seg]
        out.append((y1 - y0) / (x1 - x0) if x1 > x0 else 0.0)
    return out
