"""The search config: YAML -> frozen dataclasses, built and validated once, before any cluster work."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from search_space import CRITERIA, SearchSpace
from workers import Target, add_task_root

from ._limits import check_resources, check_values
from ._schema import ConfigError, build, to_plain
from ._secrets import has_secret, mask_text
from ._study import SAMPLERS
from ._yaml import load_mapping, parse_yaml

EXTRA_OBJECTIVES = ("macs", "params", "size_mb", "latency_p90_ms")  # all minimised
MAX_ANCHORS = (
    64  # more uniform-ratio anchors than this is a sweep, not a start: use granularity uniform
)
Sampler = Literal[tuple(SAMPLERS)]  # the names _study builds samplers for
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class EarlyStop:
    """Saving finetune time on candidates that cannot reach the front (Optuna's pruners do not
    work for multi-objective studies, so this is our own rule)."""

    reject_infeasible: bool = True  # skip finetuning a candidate over constraints.max_latency_ms
    reject_dominated: bool = (
        True  # skip finetuning when a front model is as fast and beats base accuracy...
    )
    dominance_margin: float = (
        0.01  # ...by this much (finetuned pruned models can edge past the base)
    )
    stop_hopeless: bool = True  # stop after epoch k when a faster front model leads by more than...
    margin: float = 0.02  # ...this much accuracy per remaining epoch

    def __post_init__(self) -> None:
        for name in ("margin", "dominance_margin"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(
                    f"search.early_stop.{name}: {getattr(self, name)} must lie in [0, 1]"
                )


@dataclass(frozen=True)
class Sensitivity:
    """An optional first phase: prune each group alone at a few ratios, without finetuning."""

    enabled: bool = False
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    max_drop: float = (
        0.10  # a unit's upper bound: the largest ratio losing at most this much accuracy
    )
    criterion: str = "l1"
    seed_trials: tuple[float, ...] = (
        1.0,
        0.5,
    )  # first trials: every unit at these fractions of its bound

    def __post_init__(self) -> None:
        if not self.ratios or not all(0 < r < 1 for r in self.ratios):
            raise ConfigError(
                f"search.sensitivity.ratios: {list(self.ratios)} must be values in (0, 1)"
            )
        if not 0 < self.max_drop <= 1:
            raise ConfigError(f"search.sensitivity.max_drop: {self.max_drop} must lie in (0, 1]")
        if self.criterion not in CRITERIA:
            raise ConfigError(
                f"search.sensitivity.criterion: unknown criterion {self.criterion!r}; choose from {list(CRITERIA)}"
            )


@dataclass(frozen=True)
class WarmStart:
    """Start a new search from another study's Pareto front (nightly runs start from last night's)."""

    study: str | None = None  # the other study's name; none: a cold start
    storage: str | None = None  # its Optuna storage; default: this search's storage
    max_trials: int = 8  # enqueue at most this many of its front trials (most accurate first)

    def __post_init__(self) -> None:
        if self.max_trials < 1:
            raise ConfigError(f"search.warm_start.max_trials: {self.max_trials} must be >= 1")


@dataclass(frozen=True)
class Screen:
    """Fidelity 0: prune many candidates, re-estimate BatchNorm, score each on a slice of the
    training data, time it on the target; only the best of each latency bin is finetuned."""

    candidates: int = 96  # candidates screened per search (0: off, every trial is sampled directly)
    batch: int = 16  # candidates per Ray task: the task and base model are sent once per batch
    bn_batches: int = 2  # training batches to re-estimate BatchNorm statistics on
    score_batches: int = 4  # further training batches to score on (never the validation data)
    # A short finetune before scoring: this many SGD steps (the trial's optimiser and finetune.lr),
    # one per further training batch, then BatchNorm re-estimated again. 0: adaptive BN alone.
    # auto: 8 for a model without BatchNorm, 0 for one with it. On fully finetuned pools (RESULTS.md
    # proxy-steps-*) steps lifted the plain post-prune loss's Kendall tau from 0.26 to 0.72 without
    # BatchNorm, and cut adaptive BN's from 0.56 to 0.43 with it.
    steps: int | Literal["auto"] = "auto"
    # Score through the output layer re-solved for each candidate's own features (ridge regression
    # onto the base model's outputs on the BatchNorm slice), not the base model's stale one, which
    # a finetune re-learns first: the loss then ranks what the features keep. Where the model's
    # output is not a Linear layer's, the plain loss (workers.OutputHead). RESULTS.md, proxy-refit-*.
    refit_head: bool = True
    # granularity allocation: first prune each group alone at 3 ratios, screened and timed, so the
    # allocator trades measured damage against measured latency (3 candidates per group, once).
    # Off by default: 5-seed quality runs found it level with Taylor importances, at a third
    # more screening (benchmarks/RESULTS.md, arm table / no-table).
    table: bool = False
    # granularity allocation: this share of the candidates is held to the uniform plan (blend 0),
    # its level, criterion and rounding still sampled by the screen's sampler, so the uniform
    # family is searched as densely as the allocator's, not only seeded (0: seeds only). Half:
    # 5-seed quality runs found it ahead of seeds only on all three tasks' medians
    # (benchmarks/RESULTS.md, quality-split and quality-split-tasks).
    uniform_share: float = 0.5
    # granularity allocation: this share of the candidates gets per-group ratios sampled on
    # their own (the screen's sampler learns them) instead of the allocator's, blocks dropped as
    # the allocator's are: plain per-layer plans, ranked by the same proxy (0: none).
    layer_share: float = 0.0
    # granularity allocation: this share of the candidates also samples which groups are pruned
    # at all (each pruned or left whole, learnt by the screen's sampler) and allocates the level's
    # budget over the pruned ones: plans that cut a few groups hard and leave the rest whole,
    # which an importance ranking spreads out (0: none).
    subset_share: float = 0.0
    # granularity allocation: of the candidates screened after the cost model is refitted to the
    # first half's timings, this share is timed on the target too; the others take the refitted
    # model's latency (1: time every candidate). Timing is most of a screen's cost at larger
    # batches; fitted on one half, the model ranked the other half's channel-only plans about
    # as well as their own screen timings did (benchmarks/RESULTS.md, cost-model). Off (1) by
    # default: level in 5-seed runs on three tasks (quality-time-share-*, quality-refit-sd-b), and
    # it saves little where most candidates drop a block (timed anyway: 1-5 of 96 predicted on
    # colour_shapes, 3 on digits, 25-29 on shifted_digits).
    time_share: float = 1.0
    # Rounds of the screen's short timing before its stop rule first looks at the spread (then
    # in blocks of as many, until a 3 % standard error or 4x the full protocol's third). Each
    # round times the batch in order, the next in reverse, so 2 cancels order effects. 2: on
    # all three built-in tasks it ranked about as well as 6 (Kendall tau with a careful re-timing
    # 0.01 lower on average over 10 rows, within one run's spread) at 0.38-0.63 of the timing's
    # cost (benchmarks/RESULTS.md, screen-timing-rounds); inside 5-seed searches the fronts were
    # level on all three tasks at 0.73-0.88 of a candidate's cost (quality-rounds-*). Raise it on
    # a target whose timings are noisy.
    timing_rounds: int = 2

    def __post_init__(self) -> None:
        for name, what in (
            ("uniform_share", "held to the uniform plan"),
            ("layer_share", "sampled per layer"),
            ("subset_share", "that sample which groups are pruned"),
            ("time_share", "timed on the target after the cost model's refit"),
        ):
            share = getattr(self, name)
            if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
                raise ConfigError(
                    f"search.screen.{name}: {share!r} must be a number in [0, 1] "
                    f"(the share of screened candidates {what})"
                )
        if self.uniform_share + self.layer_share + self.subset_share > 1:
            raise ConfigError(
                f"search.screen: uniform_share {self.uniform_share} + layer_share "
                f"{self.layer_share} + subset_share {self.subset_share} is more than 1; "
                "lower one of them"
            )
        for name, what in (
            ("table", "true: measure each group alone before allocating"),
            ("refit_head", "true: score through the output layer re-solved per candidate"),
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"search.screen.{name}: {getattr(self, name)!r} must be true or false ({what})"
                )
        for name, low in (
            ("candidates", 0),
            ("batch", 1),
            ("bn_batches", 1),
            ("score_batches", 1),
            ("timing_rounds", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"search.screen.{name}: {value!r} must be an integer >= {low}")
        steps = self.steps
        if steps != "auto" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ConfigError(f"search.screen.steps: {steps!r} must be an integer >= 0 or auto")
        if self.candidates > 100_000:
            raise ConfigError(
                f"search.screen.candidates: {self.candidates} is more than 100000; screen fewer"
            )


@dataclass(frozen=True)
class SearchConfig:
    trials: int = 24  # budget: finished trials, counted across resumes
    concurrency: int | Literal["auto"] = (
        2  # trials in flight at once; auto: as many as free resources allow
    )
    sampler: Sampler = "tpe"
    seed: int | None = 0
    space: SearchSpace = field(default_factory=SearchSpace)
    # A new search's first trials: every unit at one ratio, evenly spaced over space.ratio, so the
    # front spans the latency range from the start (sampled per-unit ratios cluster mid-range).
    anchors: int = 4
    trial_timeout_s: float | None = None  # a trial running longer is cancelled and FAILs
    deadline_s: float | None = None  # wall-clock budget: stop asking after this long
    stall_trials: int | None = None  # stop asking after this many trials without hypervolume gain
    grace_s: float = 60.0  # on deadline or a signal: how long running trials may still finish
    objectives: tuple[str, ...] = (
        "accuracy",
        "latency_ms",
    )  # extras: macs, params, size_mb, latency_p90_ms
    early_stop: EarlyStop = field(default_factory=EarlyStop)
    screen: Screen = field(default_factory=Screen)
    sensitivity: Sensitivity = field(default_factory=Sensitivity)
    warm_start: WarmStart = field(default_factory=WarmStart)

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"search.trials: {self.trials} must be >= 1")
        if self.concurrency != "auto" and self.concurrency < 1:
            raise ConfigError(f"search.concurrency: {self.concurrency} must be >= 1 or 'auto'")
        if not 0 <= self.anchors <= MAX_ANCHORS:
            raise ConfigError(
                f"search.anchors: {self.anchors} must lie in [0, {MAX_ANCHORS}] "
                "(uniform-ratio first trials; 0 turns them off)"
            )
        for name in ("deadline_s", "stall_trials", "trial_timeout_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"search.{name}: {value} must be > 0 (or omit it)")
        if tuple(self.objectives[:2]) != ("accuracy", "latency_ms"):
            raise ConfigError(
                "search.objectives: must start with [accuracy, latency_ms]; add extras after them"
            )
        unknown = [o for o in self.objectives[2:] if o not in EXTRA_OBJECTIVES]
        if unknown or len(set(self.objectives)) != len(self.objectives):
            raise ConfigError(
                f"search.objectives: {unknown or 'duplicates'}; extras are {list(EXTRA_OBJECTIVES)}"
            )


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 2
    lr: float = 0.01
    weight_decay: float = 5e-4
    calibration_batches: int = 2  # gradient batches for the taylor/hessian criteria

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"finetune.epochs: {self.epochs} must be >= 0")
        if not self.lr > 0:
            raise ConfigError(f"finetune.lr: {self.lr} must be > 0")


@dataclass(frozen=True)
class Constraints:
    max_latency_ms: float | None = None  # candidates slower than this are not finetuned
    min_accuracy: float | None = None
    max_size_mb: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_latency_ms", "max_size_mb"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"constraints.{name}: {v} must be > 0")
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 1:
            raise ConfigError(f"constraints.min_accuracy: {self.min_accuracy} must lie in [0, 1]")


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str | None = None  # default: the search name
    register: bool = True  # at the end, log each front model and register it in the model registry
    model_name: str | None = None  # registered model name; default: the search name
    alias_drop: float = (
        0.01  # alias fastest-within-1pct: fastest front model within this accuracy of base
    )

    def __post_init__(self) -> None:
        if not 0 <= self.alias_drop < 1:
            raise ConfigError(
                f"tracking.alias_drop: {self.alias_drop} must lie in [0, 1) (0.01 = one point)"
            )
        if self.model_name is not None and not _NAME.match(self.model_name):
            raise ConfigError(
                f"tracking.model_name: {self.model_name!r} must be 1-100 letters, digits, '_', '.' or '-'"
            )
        for key in ("uri",):
            value = getattr(self, key)
            if value and has_secret(value):
                raise ConfigError(
                    f"tracking.{key}: holds a password; set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD in the environment instead"
                )

    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


@dataclass(frozen=True)
class NightlyConfig:
    """``prunesearch nightly``: which registry alias a night may move, and by how much it must win."""

    alias: str = "production-candidate"
    gate: float = (
        0.05  # tonight's pick must be this much faster (0.05 = 5 %) than the alias's model
    )

    def __post_init__(self) -> None:
        if not 0 <= self.gate < 1:
            raise ConfigError(f"nightly.gate: {self.gate} must lie in [0, 1) (0.05 = 5 % faster)")
        if not _NAME.match(self.alias):
            raise ConfigError(
                f"nightly.alias: {self.alias!r} must be letters, digits, '_', '.' or '-'"
            )


@dataclass(frozen=True)
class Resources:
    """What each trial asks Ray for. On a GPU cluster set num_gpus: 1."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_mb: int | None = None
    max_retries: int = 2  # re-runs after a worker or node dies mid-trial
    # Keep training off the target machines: ask for a resource or label only trainer nodes have.
    custom: Mapping[str, float] = field(default_factory=dict)
    label_selector: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    name: str
    task: str = "digits"
    task_options: Mapping[str, Any] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    target: Target = field(default_factory=Target)  # the primary target: objectives, constraint
    extra_targets: tuple[
        Target, ...
    ] = ()  # also measured and recorded (from a list under `target`)
    constraints: Constraints = field(default_factory=Constraints)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: str = "sqlite:///optuna.db"  # Optuna storage URL (PostgreSQL on a cluster)
    resources: Resources = field(default_factory=Resources)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)
    ray_address: str | None = None  # None: RAY_ADDRESS if set, else a local cluster

    def __post_init__(self) -> None:
        if len(self.name) > 100:
            raise ConfigError(
                f"name: {len(self.name)} characters, more than 100; shorten it (it names the "
                "study, the experiment and the registered model)"
            )
        if not _NAME.match(self.name):
            raise ConfigError(
                f"name: {self.name!r} must start with a letter or digit and hold only letters, digits, '_', '.', '-'"
            )
        if not re.match(r"^[a-z][a-z0-9+]*://", self.storage):
            raise ConfigError(
                f"storage: {mask_text(self.storage)!r} is not a URL; use sqlite:///optuna.db or postgresql://..."
            )

        if (
            self.tracking.uri
            and self.tracking.uri.split("?")[0] == self.storage.split("?")[0]
            and not self.storage.startswith("sqlite")
        ):
            raise ConfigError(
                "tracking.uri and storage name the same database; MLflow and Optuna both keep an "
                "alembic_version table there. Give each its own database (e.g. .../mlflow and .../optuna)"
            )

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def targets(self) -> tuple[Target, ...]:
        """Every target measured: the primary one first."""
        return (self.target, *self.extra_targets)

    @property
    def device(self) -> str:
        """Where trials train: on a GPU whenever Ray gives the task one."""
        return "cuda" if self.resources.num_gpus > 0 else "cpu"

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Read YAML (bounded: see _yaml), apply ``--set key.path=value`` overrides, build and
    validate. Nothing in the file is executed or imported here."""
    raw = load_mapping(Path(path))
    config = config_from_dict(apply_overrides(raw, overrides))
    add_task_root(Path(path).parent)  # `task: my_task:build` beside the config resolves
    return config


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"config: the config must be a mapping of keys (e.g. `name: my-search`), not a "
            f"{type(raw).__name__}"
        )
    if "name" not in raw:
        raise ConfigError(
            "name: missing; every search needs a name (it names the study and the experiment)"
        )
    config = build(Config, split_targets(raw))
    check_values(config)
    check_resources(config)
    return config


def split_targets(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``target`` may be one mapping or a list, and ``batch_size`` one size or a list of sizes.

    Each (target, batch size) becomes one Target; the first is the primary one (the latency
    objective, the constraint and early rejection use it), the others are measured too and
    recorded beside it, so one search answers "how fast at batch 1 and at batch 32, here and there".
    """
    out = dict(raw)
    items = raw.get("target", {})
    listed = isinstance(items, (list, tuple))
    items = list(items) if listed else [items]
    if not items:
        raise ConfigError("target: an empty list; give one target mapping or a list of them")
    expanded: list[Any] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            where = f"target[{i}]" if listed else "target"
            raise ConfigError(
                f"{where}: expected a mapping such as {{device: cpu, batch_size: 1}} (or a list of "
                f"them), got {item!r}"
            )
        sizes = item.get("batch_size") if isinstance(item, Mapping) else None
        if not isinstance(sizes, (list, tuple)):
            expanded.append(item)
            continue
        if not sizes:
            where = f"target[{i}]" if listed else "target"
            raise ConfigError(
                f"{where}.batch_size: an empty list; give a size or a list of sizes, e.g. [1, 32]"
            )
        stem = item.get("name") or item.get("device", "cpu")
        expanded += [{**item, "batch_size": bs, "name": f"{stem}-b{bs}"} for bs in sizes]
    out["target"] = expanded[0]
    extra = raw.get("extra_targets") or []
    if not isinstance(extra, list):
        raise ConfigError(
            f"extra_targets: expected a list of target mappings, got {extra!r}; or list them "
            "all under `target`"
        )
    out["extra_targets"] = [*extra, *expanded[1:]]
    names = [
        t.get("name", "cpu") if isinstance(t, Mapping) else t.name
        for t in [out["target"], *out["extra_targets"]]
    ]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(
                f"target: two targets are named {name!r}; give each target a distinct `name`"
            )
    return out


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``search.trials=8`` sets raw['search']['trials'] = 8; values are parsed as YAML."""
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write key.path=value, e.g. --set search.trials=8")
        node = out
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: an empty key part; write key.path=value")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = parse_yaml(text, f"--set {item!r}") if text else None
    return out


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
