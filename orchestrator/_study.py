"""The Optuna study: samplers by name, objectives, and telling results back."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optuna
from optuna.samplers import BaseSampler, GPSampler, NSGAIISampler, RandomSampler
from optuna.trial import FrozenTrial, Trial, TrialState

from search_space import PruningPlan
from workers import Target, TrialLatency, TrialResult, TrialStatus

from ._sampler import OneReadTPESampler
from ._sqlite import use_fast_sqlite
from ._storage import study_storage

if TYPE_CHECKING:  # _config imports SAMPLERS from here
    from ._config import Config


# Objectives: accuracy up, everything else down. Their order is the order of trial.values.
def directions(config: Config) -> list[str]:
    return ["maximize"] + ["minimize"] * (len(config.search.objectives) - 1)


SAMPLERS: Mapping[str, Callable[[int | None], BaseSampler]] = {
    # constant_liar keeps concurrent TPE trials from piling onto the same point.
    "tpe": lambda seed: OneReadTPESampler(seed=seed, constant_liar=True, n_startup_trials=8),
    "nsga2": lambda seed: NSGAIISampler(seed=seed, population_size=16),
    "gp": lambda seed: GPSampler(seed=seed, n_startup_trials=8),
    "random": lambda seed: RandomSampler(seed=seed),
}


def open_study(config: Config) -> optuna.Study:
    """Create the study, or load it to resume (same name and storage)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    use_fast_sqlite()
    sampler = SAMPLERS[config.search.sampler](config.search.seed)
    study = optuna.create_study(
        study_name=config.name,
        storage=study_storage(config.storage, redact(config.storage)),
        sampler=sampler,
        directions=directions(config),
        load_if_exists=True,
    )
    stored = study.metric_names
    if len(study.directions) != len(config.search.objectives) or (
        stored and stored != list(config.search.objectives)
    ):
        raise ValueError(
            f"study {config.name!r} in {redact(config.storage)} was created with objectives "
            f"{stored}; rename the search to use {list(config.search.objectives)}"
        )
    with warnings.catch_warnings():  # set_metric_names is "experimental" but stable since 3.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(config.search.objectives))
    return study


def fail_orphans(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a driver that died are failed, so the budget re-asks them."""
    orphans = study.get_trials(
        deepcopy=False, states=(TrialState.RUNNING,)
    )  # WAITING = enqueued: keep
    for t in orphans:
        # No public setter for a finished-elsewhere trial's attrs; the storage call is the API.
        study._storage.set_trial_user_attr(
            t._trial_id, "reason", "orphaned: the driver stopped mid-trial"
        )
        study.tell(t.number, state=TrialState.FAIL)
    return [t.number for t in orphans]


NOT_STARTED = "not started"  # in the reason of a queued trial cancelled when the search stopped


def finished_count(study: optuna.Study) -> int:
    """Trials that count toward the budget: everything that ended, except orphans re-asked and
    queued trials that never ran."""
    done = study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    )
    return sum(1 for t in done if not _uncounted(str(t.user_attrs.get("reason", ""))))


def _uncounted(reason: str) -> bool:
    return reason.startswith("orphaned") or f": {NOT_STARTED}: " in reason


def tell(study: optuna.Study, trial: Trial, result: TrialResult, config: Config) -> FrozenTrial:
    """Record a worker's result; constraints make infeasible trials visible to the sampler."""
    have = trial.user_attrs
    for key, value in _summary(result).items():
        # One storage write each: skip what is unset or already there (the plan, set at ask time).
        if value is not None and have.get(key) != value:
            trial.set_user_attr(key, value)
    if result.status in (TrialStatus.COMPLETE, TrialStatus.INFEASIBLE):
        c = config.constraints
        latency = float(result.latency.median_ms)
        if c.max_latency_ms is not None:
            trial.set_constraint("latency_ms", latency - c.max_latency_ms)
        if c.min_accuracy is not None:
            trial.set_constraint("accuracy", c.min_accuracy - float(result.accuracy))
        if c.max_size_mb is not None:
            trial.set_constraint("size_mb", float(result.size_mb) - c.max_size_mb)
        return study.tell(trial, [objective(name, result) for name in config.search.objectives])
    if result.status in (TrialStatus.STOPPED, TrialStatus.REJECTED):
        return study.tell(trial, state=TrialState.PRUNED)
    return study.tell(trial, state=TrialState.FAIL)


def objective(name: str, result: TrialResult) -> float:
    if name == "latency_ms":
        return float(result.latency.median_ms)
    if name == "latency_p90_ms":
        return float(result.latency.p90_ms)
    return float(getattr(result, name))


def _summary(result: TrialResult) -> dict[str, Any]:
    """The result as the trial's user attributes: the Optuna edge (``result_of`` reads it back)."""
    return {
        "status": result.status,
        "reason": result.reason,
        "signature": result.signature,
        "macs": result.macs,
        "params": result.params,
        "size_mb": result.size_mb,
        "latency": result.latency.to_dict() if result.latency else {},
        "epoch_accuracy": result.epoch_accuracy,
        "seconds": result.seconds,
        "plan": result.plan.to_dict(),
        "recovery": result.recovery,
        "train_epochs": result.train_epochs,
        "ranked_by": result.ranked_by,
    }


def result_of(t: FrozenTrial) -> TrialResult:
    """A finished trial's result, read back from what ``tell`` wrote (the weights are not kept)."""
    a = t.user_attrs
    epochs = list(a.get("epoch_accuracy") or [])
    accuracy = t.values[0] if t.values else (epochs[-1] if epochs else None)
    return TrialResult(
        number=t.number,
        status=TrialStatus(a.get("status") or TrialStatus.FAILED),
        plan=plan_of(t) or _EMPTY_PLAN,
        accuracy=accuracy,
        latency=latency_of(t),
        macs=a.get("macs"),
        params=a.get("params"),
        size_mb=a.get("size_mb"),
        signature=a.get("signature"),
        epoch_accuracy=epochs,
        seconds=dict(a.get("seconds") or {}),
        reason=a.get("reason"),
        recovery=dict(a.get("recovery") or {}),
        train_epochs=a.get("train_epochs"),
        ranked_by=dict(a.get("ranked_by") or {}),
    )


_EMPTY_PLAN = PruningPlan(ratios={}, units={})


def plan_of(t: FrozenTrial) -> PruningPlan | None:
    """A trial's plan as its user attribute holds it (set at ask, as applied at tell); None when
    it has none, or one this version cannot read (an older study's)."""
    try:
        return PruningPlan.from_dict(t.user_attrs["plan"])
    except (KeyError, TypeError, ValueError):
        return None


def ranking_label(plan: PruningPlan | None, ranked_by: Mapping[str, int] | None) -> str | None:
    """The criteria that ranked a trial's groups, most groups first (``l1`` for a ``bn_scale``
    plan on a model without BatchNorm, whose groups l1 ranked); the plan's own criterion where
    the trial did not say (a study from before trials reported it)."""
    if ranked_by:
        return "+".join(sorted(ranked_by, key=lambda name: (-ranked_by[name], name)))
    return plan.criterion if plan else None


def latency_of(t: FrozenTrial) -> TrialLatency | None:
    """A told trial's latency, as ``tell`` wrote it; None when it was not measured."""
    stored = t.user_attrs.get("latency")
    return TrialLatency.from_dict(stored) if stored else None


def redact(url: str) -> str:
    """Drop the password from a storage URL before it is logged or printed."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


# -- the latency cache, persisted with the study ---------------------------------------------
def _target_key(target: Target, reference: str = "") -> str:
    """Latency depends on where and how it is timed: a changed target never reuses old numbers.
    Paired figures are ratios to a reference (the base model's architecture): they key on it."""
    what: dict[str, Any] = {
        k: getattr(target, k)
        for k in ("name", "device", "batch_size", "threads", "dtype", "runtime")
    }
    if target.paired:
        what["reference"] = reference
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]


def load_latency_cache(study: optuna.Study, target: Target, reference: str = "") -> dict[str, dict]:
    prefix = f"latency:{_target_key(target, reference)}:"
    return {k[len(prefix) :]: v for k, v in study.user_attrs.items() if k.startswith(prefix)}


def save_latency(study: optuna.Study, config: Config, result: TrialResult) -> None:
    """Each target's fresh measurement of this architecture, kept for the next run of the search."""
    if result.latency is None or not result.signature:
        return
    per_target = {config.target.name: result.latency, **result.latency.targets}
    for target in config.targets:
        stats = per_target.get(target.name)
        if stats and not stats.cached:
            key = _target_key(target, stats.reference or "")
            figures = {k: v for k, v in stats.to_dict().items() if k not in ("cached", "targets")}
            study.set_user_attr(f"latency:{key}:{result.signature}", figures)


def load_calibrations(
    study: optuna.Study, targets: Sequence[Target], reference: str
) -> dict[str, dict]:
    """The calibrations a resumed search keeps (target name -> figures), so every trial of one
    study is on one scale; a target without one is calibrated anew."""
    out = {}
    for t in targets:
        stored = study.user_attrs.get(f"calibration:{_target_key(t, reference)}")
        if t.paired and stored:
            out[t.name] = stored
    return out


def save_calibrations(
    study: optuna.Study, targets: Sequence[Target], reference: str, figures: Mapping[str, dict]
) -> None:
    for t in targets:
        if t.paired and t.name in figures:
            key = f"calibration:{_target_key(t, reference)}"
            if key not in study.user_attrs:
                study.set_user_attr(key, dict(figures[t.name]))


def warm_start(study: optuna.Study, config: Config) -> list[int]:
    """Enqueue the front of ``search.warm_start.study`` into a new study; returns their numbers there.

    Only a study with no trials yet is warm-started (a resumed search already has its start),
    and only parameters this search's space still has are carried over.
    """
    ws = config.search.warm_start
    if ws.study is None or study.trials:
        return []
    storage = ws.storage or config.storage
    try:
        source = optuna.load_study(study_name=ws.study, storage=storage)
    except KeyError:
        raise ValueError(
            f"search.warm_start.study: no study {ws.study!r} in {redact(storage)}"
        ) from None
    best = sorted(source.best_trials, key=lambda t: -t.values[0])[: ws.max_trials]
    for t in best:
        study.enqueue_trial(
            dict(t.params), user_attrs={"warm_start": f"{ws.study}#{t.number}"}, skip_if_exists=True
        )
    return [t.number for t in best]
