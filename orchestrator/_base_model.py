"""The base model, measured like a trial before any is dispatched: its accuracy, latency and size,
and its latency calibration on each target (paired timing compares every candidate with it).

The base figures are the search's yardsticks: the front's accuracy floor and latency reference,
the early-stopping bound, each trial's speed-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import optuna
import ray
import torch

from search_space import PruningPlan, call_model
from workers import ConstraintRules, TrialResult, TrialStatus

from ._ask import trial_spec
from ._services import RemoteMeasure
from ._study import load_calibrations, save_calibrations, save_latency

if TYPE_CHECKING:
    from ._search import Prepared

Progress = Callable[[str], None]


@dataclass(frozen=True)
class RaySide:
    """How this search's work reaches Ray: the trial task, the base weights, the latency benches."""

    remote: Any  # trial_task with the trial's resource options
    base_ref: Any  # the base model's weights, put once in the object store
    measure: RemoteMeasure


def measure_base(
    prepared: Prepared, study: optuna.Study, ray_side: RaySide, reference: str, progress: Progress
) -> dict[str, float]:
    """The base model's figures (accuracy, latency_ms, macs, params, size_mb), measured like a
    trial, with its latency calibration (calibration_ms, calibration_noise when paired)."""
    calibration = _calibrate(prepared, study, ray_side.measure, reference, progress)
    base = _measure_base(prepared, study, ray_side) | calibration
    progress(
        f"base model: accuracy {base['accuracy']:.4f}, latency {base['latency_ms']:.3f} ms "
        f"on {prepared.config.target.name}, {base['macs'] / 1e6:.2f} M MACs, "
        f"{base['params'] / 1e3:.1f} k params"
    )
    if warning := untrained_warning(prepared.task, base["accuracy"], prepared.config.task):
        progress(warning)
    return base


GUESSING_MARGIN = 0.05  # accuracy within this of 1/classes reads as an untrained model


def untrained_warning(task: Any, accuracy: float, task_name: str) -> str | None:
    """A warning when the base model scores about what guessing scores: pruning keeps what a
    model learned, so a search over an untrained one (its checkpoint not loaded, a training
    that diverged) spends its whole budget on noise. Only for the default top-1 accuracy, whose
    classes are the width of the model's output; a task's own ``evaluate`` has no known floor."""
    if task.evaluate is not None:
        return None
    training = task.model.training
    try:
        with torch.no_grad():
            out = call_model(task.model.eval(), task.example_inputs)
    finally:
        task.model.train(training)
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[1] < 2:
        return None
    classes = int(out.shape[1])
    if accuracy > 1 / classes + GUESSING_MARGIN:
        return None
    return (
        f"warning: the base model's accuracy {accuracy:.4f} is no better than guessing among its "
        f"{classes} outputs (1/{classes} = {1 / classes:.4f}): pruning keeps what a model has "
        f"learned, so every candidate will score about this. Does task {task_name!r} load the "
        "trained weights (or train the model) before returning it? The search goes on."
    )


def _calibrate(
    prepared: Prepared,
    study: optuna.Study,
    measure: RemoteMeasure,
    reference: str,
    progress: Progress,
) -> dict[str, float]:
    """Hand every bench the base model (trials and screening are timed against it, pair by pair)
    and its calibrated latency: kept with the study, so a resumed search stays on one scale."""
    targets = prepared.config.targets
    stored = load_calibrations(study, targets, reference)
    if any(t.paired and t.name not in stored for t in targets):
        progress("calibrating: the base model timed against itself on each target")
    figures = measure.set_reference(
        prepared.task.model, prepared.task.example_inputs, stored, reference
    )
    save_calibrations(study, targets, reference, figures)
    primary = prepared.config.target
    if not primary.paired:
        return {}
    cal = figures[primary.name]
    progress(
        f"latency is paired: each candidate / the base model, run by run, x the base's "
        f"{cal['ms']:.3f} ms on {primary.name} ({'kept from' if primary.name in stored else 'measured for'} "
        f"this study; noise floor {100 * cal['noise']:.1f} %)"
    )
    return {"calibration_ms": float(cal["ms"]), "calibration_noise": float(cal["noise"])}


def _measure_base(prepared: Prepared, study: optuna.Study, ray_side: RaySide) -> dict[str, float]:
    """The unpruned model measured exactly like a trial: same worker path, same target, and kept in
    the latency cache like a trial's measurement (a trial that prunes nothing reuses it)."""
    config = prepared.config
    unpruned = trial_spec(config, -1, PruningPlan(ratios={}, units={}))
    spec = replace(unpruned, finetune=replace(config.finetune, epochs=0), keep_model=False)
    r = ray_side
    result: TrialResult = ray.get(
        r.remote.remote(spec.to_dict(), r.base_ref, measure=r.measure, rules=ConstraintRules(None))
    )
    if result.status != TrialStatus.COMPLETE:
        raise RuntimeError(f"measuring the base model failed: {result.reason}")
    save_latency(study, config, result)
    return {
        "accuracy": result.accuracy,
        "latency_ms": result.latency.median_ms,
        "macs": float(result.macs),
        "params": float(result.params),
        "size_mb": result.size_mb,
    }
