"""What one trial became: its status, its latency and its result record."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from search_space import PruningPlan


class TrialStatus(StrEnum):
    """A trial's outcome, in the words the console, the study, MLflow and the report use.

    A ``StrEnum``: each member is its string value, so what is written (Optuna user attributes,
    MLflow tags, JSON) is the bare word, and a word read back compares equal to its member.
    """

    COMPLETE = "complete"  # finetuned and evaluated
    INFEASIBLE = "infeasible"  # over the latency constraint, not finetuned
    REJECTED = "rejected"  # dominated by the front before finetuning
    STOPPED = "stopped"  # hopeless after an epoch
    FAILED = "failed"  # an error, a timeout, a lost worker, or cancelled when the search stopped


@dataclass(frozen=True)
class TrialLatency:
    """A trial's latency as measured on its primary target, and on each other target (``targets``).

    The named fields are the figures the orchestrator reads; ``figures`` holds every other figure
    of the measurement (``mean_ms``, ``runs``, ``host``, ``pairs``, ...), recorded, never read. A
    figure the measurement did not give is None. ``from_dict`` and ``to_dict`` are where it turns
    into and from the plain mapping a bench returns and the study keeps:
    ``TrialLatency.from_dict(d).to_dict() == d``.
    """

    median_ms: float  # the trial's latency (paired: rebased on the calibration)
    p90_ms: float | None = None
    cv: float | None = None
    throughput: float | None = None  # samples per second at the target's batch size
    raw_median_ms: float | None = None  # paired: as timed, before rebasing
    ratio_spread: float | None = None  # paired: interquartile range of the per-pair ratios
    drift: float | None = None  # paired: the base model's run / its calibration, meanwhile
    reference: str | None = None  # paired: the architecture signature of the base model
    node: str | None = None  # the Ray node that timed it
    cached: bool | None = None  # from the latency cache (True) or timed for this trial (False)
    targets: Mapping[str, TrialLatency] = field(default_factory=dict)  # the other targets'
    figures: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialLatency:
        """From a measurement's plain figures (a bench's, ``LatencyStats.to_dict()``, the study's)."""
        figures = dict(data)
        targets = {n: cls.from_dict(t) for n, t in figures.pop("targets", {}).items()}
        named = {k: figures.pop(k) for k in _NAMED if figures.get(k) is not None}
        return cls(**named, targets=targets, figures=figures)

    def to_dict(self) -> dict[str, Any]:
        """The plain figures: what ``from_dict`` was given."""
        out = {k: getattr(self, k) for k in _NAMED if getattr(self, k) is not None}
        out |= self.figures
        if self.targets:
            out["targets"] = {n: t.to_dict() for n, t in self.targets.items()}
        return out


# The figures TrialLatency names; a None one stays among ``figures``, so to_dict gives it back.
_NAMED = tuple(f.name for f in fields(TrialLatency) if f.name not in ("targets", "figures"))


@dataclass
class TrialResult:
    """One trial's record: typed here, plain values only where it is written (the study, MLflow)."""

    number: int
    status: TrialStatus
    plan: PruningPlan  # as applied (an iterative recovery sets its steps)
    accuracy: float | None = None
    latency: TrialLatency | None = None
    macs: int | None = None
    params: int | None = None
    size_mb: float | None = None
    signature: str | None = None
    epoch_accuracy: list[float] = field(default_factory=list)  # the final finetune's
    recovery: dict[str, Any] = field(
        default_factory=dict
    )  # the recipe followed (search_space.Recovery)
    train_epochs: float | None = None  # forward/backward work, in epochs (see workers/_recovery.py)
    # groups each criterion ranked as pruned: the plan's, or l1 where it could not rank a group
    ranked_by: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per phase
    reason: str | None = None  # why infeasible / stopped / failed
    model_bytes: bytes | None = None  # safetensors, see workers.load_pruned
    node: str = ""  # where it ran (set by the orchestrator's Ray wrapper)
