"""How a pruned model recovers its accuracy: the recipe a trial follows, and its search space.

A :class:`Recovery` is a trial's training recipe, kept apart from the :class:`PruningPlan`
(which describes the architecture change and travels into every saved model). Like the plan it
is a small frozen JSON-able value: sampled once, sent to the worker, recorded with the result.

Methods (the worker implements each in ``workers/_recovery.py``):

* ``oneshot``: prune to the plan at once, then finetune;
* ``iterative``: reach the plan in ``steps`` pruning steps, finetuning between them;
* ``sparse``: train with a group-sparsity regulariser (``sparse_pruner``, strength ``reg``)
  for ``sparse_share`` of the epoch budget before pruning, then prune and finetune.

``kd`` adds knowledge distillation from the unpruned base model to every finetune of any method.

Pure: no Optuna import. ``suggest_recovery`` takes anything with Optuna's ``suggest_*`` methods.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

METHODS = ("oneshot", "iterative", "sparse")
SPARSE_PRUNERS = ("group_norm", "bn_scale", "growing_reg")


class TrialLike(Protocol):
    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...
    def suggest_categorical(self, name: str, choices: Sequence) -> object: ...


@dataclass(frozen=True)
class Recovery:
    """One trial's recovery recipe. Fields a method does not use keep their defaults."""

    method: str = "oneshot"
    steps: int = 1  # iterative: pruning steps (finetuning after each but the last)
    sparse_share: float = 0.0  # sparse: share of the epoch budget spent on sparse training
    reg: float = 0.0  # sparse: regularisation strength
    sparse_pruner: str = "group_norm"  # sparse: the Torch-Pruning regulariser
    kd: bool = False  # distil from the unpruned base model while finetuning
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5  # weight of the distillation term; 1 - alpha weighs the task loss

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"recovery.method: {self.method!r} is not one of {list(METHODS)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"recovery.steps: {self.steps!r} must be a positive integer")
        if self.method == "iterative" and self.steps < 2:
            raise ValueError(f"recovery.steps: {self.steps} must be >= 2 for method 'iterative'")
        if not 0.0 <= self.sparse_share < 1.0:
            raise ValueError(f"recovery.sparse_share: {self.sparse_share} must lie in [0, 1)")
        if self.method == "sparse" and not (self.sparse_share > 0 and self.reg > 0):
            raise ValueError(
                "recovery: method 'sparse' needs sparse_share > 0 and reg > 0 "
                f"(got {self.sparse_share}, {self.reg})"
            )
        if self.reg < 0 or not math.isfinite(self.reg):
            raise ValueError(f"recovery.reg: {self.reg} must be a finite number >= 0")
        if self.sparse_pruner not in SPARSE_PRUNERS:
            raise ValueError(
                f"recovery.sparse_pruner: {self.sparse_pruner!r} is not one of {list(SPARSE_PRUNERS)}"
            )
        if not self.kd_temperature > 0:
            raise ValueError(f"recovery.kd_temperature: {self.kd_temperature} must be > 0")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"recovery.kd_alpha: {self.kd_alpha} must lie in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Recovery:
        """Missing keys take their defaults (an empty or absent recipe is ``oneshot``)."""
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"recovery: unknown keys {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class RecoverySpace:
    """What the search may choose for recovery. The defaults choose nothing (oneshot, no KD),
    so a search that does not mention recovery keeps its Optuna parameters unchanged."""

    methods: tuple[str, ...] = ("oneshot",)
    steps: tuple[int, ...] = (2, 3)  # iterative
    sparse_share: tuple[float, ...] = (0.25, 0.5)  # sparse
    reg: tuple[float, float] = (
        1e-4,
        1.0,
    )  # sparse, log-uniform: the useful strength falls with the steps trained
    sparse_pruners: tuple[str, ...] = ("group_norm",)
    kd: tuple[bool, ...] = (False,)
    kd_temperature: tuple[float, float] = (2.0, 8.0)
    kd_alpha: tuple[float, float] = (0.3, 0.9)

    def __post_init__(self) -> None:
        validate_recovery_space(self)


def validate_recovery_space(space: RecoverySpace, where: str = "search.space.recovery") -> None:
    """Raise ValueError naming the field and the fix."""
    _choices(f"{where}.methods", space.methods, METHODS)
    _choices(f"{where}.sparse_pruners", space.sparse_pruners, SPARSE_PRUNERS)
    if not space.kd or any(not isinstance(k, bool) for k in space.kd):
        raise ValueError(f"{where}.kd: {list(space.kd)} must be a non-empty list of true/false")
    if not space.steps or any(
        not isinstance(s, int) or isinstance(s, bool) or s < 2 for s in space.steps
    ):
        raise ValueError(
            f"{where}.steps: {list(space.steps)} must be integers >= 2 (1 step is oneshot)"
        )
    if not space.sparse_share or any(not 0 < s < 1 for s in space.sparse_share):
        raise ValueError(f"{where}.sparse_share: {list(space.sparse_share)} must lie in (0, 1)")
    _range(f"{where}.reg", space.reg, positive=True)
    _range(f"{where}.kd_temperature", space.kd_temperature, positive=True)
    _range(f"{where}.kd_alpha", space.kd_alpha)
    if not 0 <= space.kd_alpha[0] <= space.kd_alpha[1] <= 1:
        raise ValueError(
            f"{where}.kd_alpha: {list(space.kd_alpha)} must satisfy 0 <= low <= high <= 1"
        )


def _choices(where: str, given: Sequence[str], known: Sequence[str]) -> None:
    if not given:
        raise ValueError(f"{where}: give at least one of {list(known)}")
    for name in given:
        if name not in known:
            raise ValueError(f"{where}: unknown {name!r}; choose from {list(known)}")


def _range(where: str, rng: Sequence[float], positive: bool = False) -> None:
    if len(rng) != 2 or not rng[0] <= rng[1]:
        raise ValueError(f"{where}: give [low, high] with low <= high, got {list(rng)}")
    if positive and not rng[0] > 0:
        raise ValueError(f"{where}: {list(rng)} must be > 0")


def suggest_recovery(trial: TrialLike, space: RecoverySpace) -> Recovery:
    """Sample one recipe. A dimension with one choice is not a parameter; a method's own
    parameters (``recovery/steps``, ``recovery/reg``, ...) exist only in trials that chose it."""
    method = str(_pick(trial, "recovery/method", space.methods))
    options: dict[str, Any] = {"method": method}
    if method == "iterative":
        options["steps"] = int(_pick(trial, "recovery/steps", space.steps))
    if method == "sparse":
        options["sparse_share"] = float(_pick(trial, "recovery/sparse_share", space.sparse_share))
        options["reg"] = _float(trial, "recovery/reg", space.reg, log=True)
        options["sparse_pruner"] = str(_pick(trial, "recovery/sparse_pruner", space.sparse_pruners))
    if bool(_pick(trial, "recovery/kd", space.kd)):
        options["kd"] = True
        options["kd_temperature"] = _float(trial, "recovery/kd_temperature", space.kd_temperature)
        options["kd_alpha"] = _float(trial, "recovery/kd_alpha", space.kd_alpha)
    return Recovery(**options)


def _pick(trial: TrialLike, name: str, choices: Sequence) -> object:
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))


def _float(trial: TrialLike, name: str, rng: Sequence[float], log: bool = False) -> float:
    low, high = float(rng[0]), float(rng[1])
    return low if low == high else float(trial.suggest_float(name, low, high, log=log))
