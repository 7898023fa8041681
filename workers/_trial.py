"""One trial, top to bottom: seed/device, build, prune, measure, recover, finetune, evaluate, return.

``run_trial`` takes and returns plain values (JSON-able dicts, plus the pruned model's bytes),
so it runs the same in a Ray task, a test or a notebook.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Protocol

import torch
from torch import nn

from search_space import PruningPlan, Recovery, architecture_signature

from ._io import pruned_bytes
from ._latency import Target, measure_latency
from ._prune import apply_plan, count_macs_params
from ._recovery import Recipe, Trainer, make_distill, recipe
from ._result import TrialLatency, TrialResult, TrialStatus
from ._tasks import Task, build_task
from ._train import evaluate

# (model, example_inputs, signature) -> the latency's plain figures (see TrialLatency.from_dict)
Measure = Callable[[nn.Module, Any, str], Mapping[str, Any]]


class Rules(Protocol):
    """The orchestrator's verdicts on a running trial (see orchestrator/_services.py)."""

    def reject(self, latency: TrialLatency) -> tuple[TrialStatus, str] | None:
        """``(status, reason)`` not to finetune this candidate (status infeasible|rejected), or None."""

    def stop(self, latency_ms: float, epoch: int, accuracy: float) -> bool:
        """True when the trial cannot reach the front any more."""


@dataclass(frozen=True)
class ConstraintRules:
    """The rules a trial applies on its own: only the latency constraint."""

    max_latency_ms: float | None = None

    def reject(self, latency: TrialLatency) -> tuple[TrialStatus, str] | None:
        ms = float(latency.median_ms)
        if self.max_latency_ms is not None and ms > self.max_latency_ms:
            return (
                TrialStatus.INFEASIBLE,
                f"latency {ms:.3f} ms > constraint {self.max_latency_ms} ms: not finetuned",
            )
        return None

    def stop(self, latency_ms: float, epoch: int, accuracy: float) -> bool:
        return False


def run_trial(
    spec: Mapping[str, Any],
    base_state: Mapping[str, torch.Tensor] | None = None,
    *,
    measure: Measure | None = None,
    rules: Rules | None = None,
) -> TrialResult:
    """Run one trial from ``spec``; never raises for a trial-level error (it is returned as failed).

    ``measure`` times the pruned model on the target (default: here, with ``spec["target"]``);
    ``rules`` may reject the candidate before finetuning or stop it after an epoch.
    """
    plan = PruningPlan.from_dict(spec["plan"])
    result = TrialResult(number=int(spec["number"]), status=TrialStatus.FAILED, plan=plan)
    rules = rules or ConstraintRules(spec.get("max_latency_ms"))
    try:
        _run(spec, plan, base_state, measure, rules, result)
    except Exception as exc:  # a trial's error is data for the study, not a crash of the search
        result.status = TrialStatus.FAILED
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result.reason = f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
    return result


def _run(
    spec, plan, base_state, measure: Measure | None, rules: Rules, result: TrialResult
) -> None:
    clock = _Clock(result.seconds)
    # 1. seed and device: every trial is reproducible from its spec alone.
    torch.manual_seed(int(spec.get("seed", 0)))
    torch.set_num_threads(int(spec.get("threads", 1)))
    device = torch.device(spec.get("device", "cpu"))
    target = Target.from_dict(spec.get("target", {}))
    measure = measure or (
        lambda model, inputs, _sig: measure_latency(model, inputs, target).to_dict()
    )

    # 2. build the task and the base model (cached per worker process), and the recovery recipe.
    with clock("build"):
        task = _cached_task(spec["task"], json.dumps(spec.get("task_options", {}), sort_keys=True))
        _reseed_loaders(task, int(spec.get("seed", 0)))
        base = _base_model(task, base_state)
        trainer, how = _recovery(spec, plan, task, base, device, result)
        plan = replace(
            plan, iterative_steps=how.steps
        )  # the plan as applied (iterative sets its steps)
        result.plan = plan

    # 3. prune. Taylor/Hessian rank with gradients from a few training batches.
    with clock("prune"):
        calib = _calibration(task, int(spec.get("calibration_batches", 2)))
        model = _prune(base, task, plan, calib, result)
        _describe(model, task, result)

    # 4. measure latency before any training: it depends only on the architecture.
    with clock("measure"):
        result.latency = _timed(measure, model, task, result)
    if verdict := rules.reject(result.latency):
        # Not trained. Its accuracy as pruned (one cheap pass) lets the sampler learn from it.
        result.accuracy = evaluate(model.to(device=device), task, device)
        result.status, result.reason = verdict
        return

    # 5. recover: a method that trains before or between pruning steps prunes again from the base
    # (same channel counts under local pruning; global pruning may rank differently: re-measured).
    if how.trains_while_pruning:
        with clock("recover"):
            model = _prune(base, task, plan, calib, result, **how.prune_options)
            if _describe(model, task, result):
                result.latency = _timed(measure, model, task, result)
    # Its own dtype: timing at the target's (fp16, bf16) works on a copy (a float64 model stays one).
    model = model.to(device=device)

    # 6. finetune; the orchestrator's rule may stop a hopeless trial after any epoch.
    stopped: list[str] = []
    with clock("finetune"):
        hook = _stop_hook(rules, result, _epoch_offset(spec, how.final_epochs), stopped)
        result.epoch_accuracy = trainer.train(model, how.final_epochs, on_epoch=hook, validate=True)
    result.train_epochs = round(trainer.epochs_run, 4)

    # 7. evaluate, and 8. return the result with the weights.
    with clock("evaluate"):
        result.accuracy = (
            result.epoch_accuracy[-1] if result.epoch_accuracy else evaluate(model, task, device)
        )
    result.status, result.reason = (
        (TrialStatus.STOPPED, stopped[0]) if stopped else (TrialStatus.COMPLETE, None)
    )
    if spec.get("keep_model", True):
        result.model_bytes = pruned_bytes(model.cpu(), plan, base)


def _prune(
    base: nn.Module, task: Task, plan: PruningPlan, calib: list, result: TrialResult, **options: Any
) -> nn.Module:
    """``plan`` applied to a copy of ``base``, gradient criteria ranking by the task's own loss;
    ``result`` learns which criterion ranked how many groups."""
    result.ranked_by.clear()
    return apply_plan(
        base,
        task.example_inputs,
        plan,
        calibration=calib,
        on_ranked=result.ranked_by.update,
        loss_fn=task.loss_fn,
        **options,
    )


def _recovery(
    spec, plan: PruningPlan, task: Task, base: nn.Module, device: torch.device, result: TrialResult
) -> tuple[Trainer, Recipe]:
    """The trial's recovery recipe and a trainer that counts its work (see workers/_recovery.py)."""
    recovery = Recovery.from_dict(spec.get("recovery"))
    result.recovery, result.train_epochs = recovery.to_dict(), 0.0
    ft = spec.get("finetune", {})
    trainer = Trainer(
        task,
        lr=float(ft.get("lr", 0.01)),
        weight_decay=float(ft.get("weight_decay", 5e-4)),
        device=device,
        distill=make_distill(recovery, base, device),
    )
    return trainer, recipe(recovery, plan, float(ft.get("epochs", 1)), trainer)


def _describe(model: nn.Module, task: Task, result: TrialResult) -> bool:
    """Record the pruned architecture; True when it differs from the one recorded before."""
    before = result.signature
    result.macs, result.params = count_macs_params(model, task.example_inputs)
    result.signature = architecture_signature(model)
    result.size_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    return before is not None and before != result.signature


def _timed(measure: Measure, model: nn.Module, task: Task, result: TrialResult) -> TrialLatency:
    """The pruned model's latency, typed from the plain figures ``measure`` returns."""
    return TrialLatency.from_dict(measure(model, task.example_inputs, result.signature))


def _epoch_offset(spec, final_epochs: float) -> int:
    """Epochs of the budget spent before the final finetune: the rule counts epochs of the whole
    budget, so the final finetune's last epoch is the budget's last."""
    budget = float(spec.get("finetune", {}).get("epochs", 1))
    return max(0, math.ceil(budget - 1e-9) - math.ceil(final_epochs - 1e-9))


def _stop_hook(rules: Rules, result: TrialResult, offset: int, stopped: list[str]):
    def epoch_hook(epoch: int, acc: float) -> bool:
        if rules.stop(float(result.latency.median_ms), offset + epoch, acc):
            stopped.append(
                f"stopped after epoch {epoch + 1}: accuracy {acc:.4f} cannot reach the front"
            )
            return True
        return False

    return epoch_hook


@lru_cache(maxsize=2)
def _cached_task(ref: str, options_json: str) -> Task:
    # Ray reuses worker processes: build each task (data, base model) once per process.
    return build_task(ref, json.loads(options_json))


def cached_task(ref: str, options: Mapping[str, Any] | None = None) -> Task:
    """The task this process built for ``ref`` and ``options``, built once and shared by its trials."""
    return _cached_task(ref, json.dumps(dict(options or {}), sort_keys=True))


def _reseed_loaders(task: Task, seed: int) -> None:
    # A cached task's loaders keep their own generator's state from the worker's earlier trials:
    # reseed it, or a trial's data order would depend on what ran before it on that worker.
    for loader in (task.train_loader, task.val_loader):
        generator = getattr(loader, "generator", None)
        if generator is not None:
            generator.manual_seed(seed)


def _base_model(task: Task, base_state: Mapping[str, torch.Tensor] | None) -> nn.Module:
    if base_state is not None:
        load_base_state(task.model, base_state)
    return task.model.eval()


def load_base_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load the base model's tensors as the driver sent them. A plain mapping has lost the
    state dict's per-module versions, which some layers insist on when loading (torchvision's
    MNASNet raises without one): the worker's own model, built by the same code, supplies them."""
    if getattr(state, "_metadata", None) is None:
        own = model.state_dict()
        state = OrderedDict(state)
        state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state)


def _calibration(task: Task, n: int) -> list:
    out = []
    for i, batch in enumerate(task.train_loader):
        if i >= n:
            break
        out.append(batch)
    return out


class _Clock:
    """Seconds spent in each phase, recorded in the result (and so in MLflow)."""

    def __init__(self, sink: dict[str, float]) -> None:
        self.sink = sink

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sink[phase] = round(time.perf_counter() - t0, 4)
