"""The pruning plan: the one value that crosses every boundary (worker, MLflow, saved model)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

PLAN_VERSION = 1
DROPPED = "block:"  # cost_ratios' key of a dropped block: DROPPED + its name


@dataclass(frozen=True)
class PruningPlan:
    """How to prune one model: a channel ratio per unit, and how channels are ranked.

    A *unit* is what the search assigns one ratio to: a single prunable group (``layer``
    granularity), several groups sharing one ratio (``block``), or every group (``uniform``).
    ``units`` maps each unit name to the names of the DepGraph groups it covers; a group that
    is in no unit is left untouched.
    """

    ratios: Mapping[str, float]
    units: Mapping[str, tuple[str, ...]]
    criterion: str = "l1"
    round_to: int = 1
    global_pruning: bool = False
    isomorphic: bool = False
    iterative_steps: int = 1
    max_ratio: float = 0.95
    # Optional per-unit criterion overrides (``per_layer_criteria`` in the space).
    criteria: Mapping[str, str] = field(default_factory=dict)
    # Residual blocks replaced by the identity after the channels are pruned (search_space/
    # _depth.py), each with the groups wholly inside it, which go with it.
    drop: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if set(self.ratios) != set(self.units):
            missing = sorted(set(self.ratios) ^ set(self.units))
            raise ValueError(
                f"plan: ratios and units must name the same units; differ on {missing}"
            )
        for unit, ratio in self.ratios.items():
            if not 0.0 <= float(ratio) < 1.0:
                raise ValueError(f"plan.ratios[{unit!r}] = {ratio}: a ratio must lie in [0, 1)")
        if self.round_to < 1:
            raise ValueError(f"plan.round_to = {self.round_to}: must be a positive integer")
        if self.iterative_steps < 1:
            raise ValueError(f"plan.iterative_steps = {self.iterative_steps}: must be >= 1")
        # Normalise containers so equality and JSON round trips are exact.
        object.__setattr__(self, "ratios", {k: float(v) for k, v in sorted(self.ratios.items())})
        object.__setattr__(self, "units", {k: tuple(v) for k, v in sorted(self.units.items())})
        object.__setattr__(self, "criteria", dict(sorted(self.criteria.items())))
        object.__setattr__(self, "drop", {k: tuple(v) for k, v in sorted(self.drop.items())})

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["units"] = {k: list(v) for k, v in self.units.items()}
        data["drop"] = {k: list(v) for k, v in self.drop.items()}
        if not self.drop:  # a plan that drops nothing reads (and hashes) as before depth existed
            del data["drop"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningPlan:
        data = dict(data)
        version = data.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise ValueError(f"plan version {version} is not supported (expected {PLAN_VERSION})")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"plan: unknown keys {unknown}")
        data["units"] = {k: tuple(v) for k, v in data.get("units", {}).items()}
        data["drop"] = {k: tuple(v) for k, v in data.get("drop", {}).items()}
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        return cls.from_dict(json.loads(text))

    # -- summaries -----------------------------------------------------------------------
    def group_ratios(self) -> dict[str, float]:
        """The ratio each DepGraph group receives."""
        return {g: self.ratios[u] for u, groups in self.units.items() for g in groups}

    def cost_ratios(self) -> dict[str, float]:
        """``group_ratios`` as a cost model reads them: the groups inside a dropped block, and
        the block (``block:<name>``), wholly removed (1.0), so its layers cost nothing."""
        return {**self.group_ratios(), **self._dropped_groups()}

    def applied_ratios(
        self, channels: Mapping[str, int], splits: Mapping[str, int] | None = None
    ) -> dict[str, float]:
        """``cost_ratios`` as the pruner applies them to groups of ``channels`` channels, each
        split in ``splits[g]`` equal slices (grouped convs, GroupNorm, heads; 1 when not named):
        what ``kept_channels`` keeps of each, the unit's ratio capped by its smallest group.

        Why: with ``round_to`` 8 a 16-channel group planned at 0.8 loses 8 channels, and one
        planned at 0.1 also loses 8, so the plan's own ratios put a cost model's prediction far
        off the timing (on colour_shapes a plan timed at 6.5 ms was predicted 4.4). Global pruning
        decides per-group counts as it ranks: its plan ratios, as planned."""
        if not self.exact:
            return self.cost_ratios()
        splits = splits or {}
        applied = {}
        for unit, groups in self.units.items():
            if not all(g in channels for g in groups):
                applied.update({g: self.ratios[unit] for g in groups})
                continue
            cap = kept_ratio_cap(self.ratios[unit], min(channels[g] for g in groups), self.round_to)
            applied.update(
                {
                    g: pruned_fraction(cap, channels[g], self.round_to, splits.get(g, 1))
                    for g in groups
                }
            )
        return {**applied, **self._dropped_groups()}

    @property
    def exact(self) -> bool:
        """Whether each group's kept channels follow from the plan alone (``kept_channels``):
        local pruning, in one step or several (the last keeps them). Global and isomorphic
        pruning decide counts as they rank."""
        return not self.global_pruning and not self.isomorphic

    def _dropped_groups(self) -> dict[str, float]:
        """The groups inside a dropped block, each wholly removed (1.0), and each dropped block
        itself (``block:<name>``: a cost model that knows the block's layers counts them gone,
        those whose channels are the residual stream's too)."""
        return {
            **{g: 1.0 for groups in self.drop.values() for g in groups},
            **{DROPPED + name: 1.0 for name in self.drop},
        }

    def mean_ratio(self) -> float:
        ratios = list(self.group_ratios().values())
        return sum(ratios) / len(ratios) if ratios else 0.0

    def max_group_ratio(self) -> float:
        return max(self.group_ratios().values(), default=0.0)

    def digest(self) -> str:
        """A short content hash, stable across processes."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]


def kept_ratio_cap(ratio: float, channels: int, round_to: int) -> float:
    """``ratio`` capped so at least ``round_to`` of ``channels`` remain.

    Torch-Pruning rounds the kept channels down to a multiple of ``round_to``; when that is
    zero it silently skips the whole group, so a high ratio would prune *less* than a lower one.
    """
    if round_to <= 1:
        return ratio
    if channels <= round_to:
        return 0.0
    return min(ratio, (channels - round_to) / channels)


def pruned_fraction(ratio: float, channels: int, round_to: int, split: int = 1) -> float:
    """The fraction of ``channels`` our pruner removes at ``ratio`` (``kept_channels``).

    Why one helper: every cost of a plan "as pruned" goes through it, and without the cap a
    16-channel group at 0.6 with ``round_to`` 8 counts as wholly removed (1.0) while the
    pruner removes half; the allocator's budget then overstated the uniform plan's saving."""
    return (channels - kept_channels(ratio, channels, round_to, split)) / channels


def kept_channels(ratio: float, channels: int, round_to: int = 1, split: int = 1) -> int:
    """The channels our pruner keeps of a group planned at ``ratio``: ``int(channels * (1 -
    ratio))`` (after ``kept_ratio_cap``), rounded down to a multiple of ``round_to`` and of
    ``split``, and never fewer than that step: at least one channel of every slice stays.

    ``split``: the equal slices Torch-Pruning cuts alike (a grouped conv's groups, GroupNorm's
    groups, attention heads: the same index from each). Left to itself Torch-Pruning keeps
    ``split * int(channels / split * (1 - ratio))``, skips the whole group when that is 0 (a
    GroupNorm(8, 32) at 0.9 kept all 32) and, with ``round_to`` above 1, rounds the per-slice
    count as if it were the group's (nothing of such a group was pruned at ``round_to`` 8).
    ``workers.apply_plan`` hands it the ratio that keeps exactly this."""
    if channels < 1:
        return channels
    step = math.lcm(max(1, round_to), max(1, split))
    if step >= channels:
        return channels  # every slice holds one channel (or the step is the group)
    kept = int(channels * (1 - kept_ratio_cap(ratio, channels, round_to)))
    if kept >= channels:
        return channels
    return max(step, kept - kept % step)


def exact_ratio(kept: int, channels: int, split: int = 1) -> float:
    """The ratio at which Torch-Pruning, rounding nothing itself, keeps exactly ``kept`` of a
    group's ``channels`` cut in ``split`` equal slices: half a channel per slice above it, so
    that no float lands it a step lower; 0 where it keeps them all."""
    if kept >= channels:
        return 0.0
    return max(0.0, 1.0 - (kept + 0.5 * split) / channels)
