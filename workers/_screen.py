"""Screening (fidelity 0): rank many candidate plans without finetuning any of them.

A candidate is pruned, its BatchNorm statistics are re-estimated on a few training batches
(adaptive BN, EagleEye, ECCV 2020: pruning shifts every later layer's activation statistics,
and scoring with the stale ones ranks candidates far worse than after even a short finetune),
and it is scored on a slice of the *training* data that the re-estimation did not see. The
validation data, which ranks the front, is never read here.

The proxy is the task's loss on that slice (negated: higher is better), not its accuracy: a
trained model is near 100 % on its own training data, so mildly pruned candidates all tie on
accuracy, while the loss still says how much each was damaged. Its standard error across the
slice's batches travels with it, so selection can tell a real lead from noise.

The allocator's profile of the groups (importances, the cost model) is ``_profile``'s.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from search_space import (
    Discovery,
    PruningPlan,
    architecture_signature,
    call_model,
)

from ._criteria import BaseGradients
from ._latency import Target, measure_latency
from ._proxy import OutputHead, Refit, proxy_measures
from ._prune import apply_plan, quiet_discover
from ._result import TrialStatus
from ._train import reestimate_norms, running_norms, sgd
from ._trial import _base_model as base_model
from ._trial import _cached_task as cached_task
from ._trial import _reseed_loaders as reseed_loaders

Batches = list[tuple[Any, Any]]
# (example_inputs, [(signature, model), ...]) -> latency stats of each, in order
MeasureMany = Callable[[Any, Sequence[tuple[str, nn.Module]]], list[dict[str, Any]]]


@dataclass
class ScreenResult:
    number: int  # the candidate's number in the screening study
    status: TrialStatus  # complete | failed
    proxy: float | None = None  # minus the task loss after adaptive BN on the training slice
    proxy_se: float | None = None  # the proxy's standard error across the slice's batches
    score: float | None = None  # the task's own score (accuracy) on the same slice, on record
    latency: dict[str, Any] | None = None
    signature: str | None = None
    params: int | None = None
    seconds: float = 0.0  # prune + adapt + score, and its share of the batch's timing
    reason: str | None = None
    refit: bool = False  # the proxy's loss is through the re-solved output layer (refit_head)
    # ``seconds`` by stage (SCREEN_STAGES): where a screen's time goes, so a user can tell what to cut
    stages: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def screen_candidates(
    job: Mapping[str, Any],
    base_state: Mapping[str, torch.Tensor] | None = None,
    *,
    measure: MeasureMany | None = None,
) -> list[ScreenResult]:
    """Screen ``job["candidates"]`` (each ``{"number", "plan"}``) of one task; never raises for
    a candidate's error (that candidate is returned as failed, the rest go on). Only the
    numbers in ``job["timed"]`` are timed when it is given (the others: ``latency`` None)."""
    torch.manual_seed(int(job.get("seed", 0)))
    torch.set_num_threads(int(job.get("threads", 1)))
    task = cached_task(job["task"], json.dumps(job.get("task_options", {}), sort_keys=True))
    base = base_model(task, base_state)
    bn, score = proxy_batches(
        task,
        int(job.get("seed", 0)),
        int(job.get("bn_batches", 8)),
        int(job.get("score_batches", 8)),
    )
    tune = Tune.of(job, task, bn, score, has_batchnorm(base))
    # search.screen.refit_head: found once per batch; None (the plain loss) where the model has
    # no output layer to re-solve.
    head = OutputHead.find(base, bn) if job.get("refit_head", True) else None
    # Traced once per batch, not per candidate: every candidate is a copy of the same base, so
    # are the gradient criteria's backward passes on the BatchNorm slice (taken when first needed).
    found = quiet_discover(base, task.example_inputs)
    grads = BaseGradients(base, bn, task.loss_fn)
    # Candidates not in ``job["timed"]`` (when given) are not timed: the orchestrator gives them
    # its cost model's latency (search.screen.time_share).
    timed = None if job.get("timed") is None else {int(n) for n in job["timed"]}
    results, models = [], []
    for cand in job["candidates"]:
        result, model = _screen_one(
            int(cand["number"]), cand["plan"], task, base, (bn, score, tune, head), (found, grads)
        )
        results.append(result)
        if model is not None and (timed is None or result.number in timed):
            models.append((result, model))
    if models:
        target = Target.from_dict(job.get("target", {}))
        measure = measure or (
            lambda inputs, items: [measure_latency(m, inputs, target).to_dict() for _, m in items]
        )
        t0 = time.perf_counter()
        timed = measure(task.example_inputs, [(r.signature, m) for r, m in models])
        share = (time.perf_counter() - t0) / len(models)  # the timing's cost, charged to each alike
        for (result, _), stats in zip(models, timed, strict=True):
            result.latency = stats
            result.seconds = round(result.seconds + share, 4)
            result.stages["time"] = round(share, 4)
    return results


def _screen_one(
    number: int,
    plan_dict: Mapping[str, Any],
    task,
    base: nn.Module,
    slices: tuple[Batches, Batches, Tune, OutputHead | None],
    of_base: tuple[Discovery, BaseGradients],
) -> tuple[ScreenResult, nn.Module | None]:
    bn, score, tune, head = slices
    found, grads = of_base
    result = ScreenResult(number=number, status=TrialStatus.FAILED)
    t0 = time.perf_counter()
    lap = _Laps(result.stages)
    try:
        # Gradient criteria (taylor, hessian) rank on the same training batches BN re-estimates on.
        model = apply_plan(
            base,
            task.example_inputs,
            PruningPlan.from_dict(plan_dict),
            calibration=bn,
            discovery=found,
            gradients=grads,
            loss_fn=task.loss_fn,
        )
        lap("prune")
        refit = _adapt(model, bn, tune, head)
        lap("adapt")
        result.proxy, result.proxy_se, result.score = proxy_measures(model, task, score, refit)
        result.refit = refit is not None
        result.params = sum(
            p.numel() for p in model.parameters()
        )  # MACs would cost a traced copy each
        result.signature = architecture_signature(model)
        lap("score")
        result.status = TrialStatus.COMPLETE
    except Exception as exc:  # a candidate that will not prune is data, not the end of the screen
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result.reason = f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
        model = None
    result.seconds = round(time.perf_counter() - t0, 4)
    return result, model


def _adapt(model: nn.Module, bn: Batches, tune: Tune, head: OutputHead | None) -> Refit | None:
    """Adaptive BN (after the short finetune, if any), and the output layer re-solved on the
    features of that last pass over the BatchNorm slice (``head``; None: no refit)."""
    if tune.batches:  # a short finetune, then BatchNorm again: SGD moved what it normalises
        adapt_batchnorm(model, bn)
        tune(model)
    if head is None:
        adapt_batchnorm(model, bn)
        return None
    with head.watch(model) as seen:
        if not adapt_batchnorm(model, bn):  # no BatchNorm, so no pass yet: one for the features
            with torch.no_grad():
                for x, _ in bn:
                    call_model(model, x)
    return head.solve(seen)


SCREEN_STAGES = ("prune", "adapt", "score", "time")  # a screened candidate's stages, in order


class _Laps:
    """Seconds since the last lap, written into ``stages`` under each lap's name."""

    def __init__(self, stages: dict[str, float]) -> None:
        self._stages, self._last = stages, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self._stages[name] = round(now - self._last, 4)
        self._last = now


def proxy_batches(task, seed: int, bn_batches: int, score_batches: int) -> tuple[Batches, Batches]:
    """Two disjoint slices of the training data: batches to re-estimate BatchNorm on, and
    batches to score on. Seeded, so every candidate of a search is scored on the same slice."""
    reseed_loaders(task, seed)
    taken: Batches = []
    for batch in task.train_loader:
        taken.append(batch)
        if len(taken) >= bn_batches + score_batches:
            break
    if not taken:
        raise ValueError("screening needs training data: the task's train_loader gave no batch")
    if len(taken) == 1:  # too little data to hold any out: score on what re-estimated BN
        return taken, taken
    cut = max(1, min(bn_batches, len(taken) * bn_batches // (bn_batches + score_batches)))
    return taken[:cut], taken[cut:]


# search.screen.steps auto, for a model without BatchNorm: on fully finetuned pools of such a
# model, 4 steps lifted the proxy's Kendall tau with finetuned accuracy from 0.26 to 0.63, and 8
# to 0.72; with BatchNorm, steps lowered adaptive BN's (0.56 to 0.43). RESULTS.md, proxy-steps-*.
AUTO_STEPS = 8


def screen_steps(steps: int | str, norms: bool) -> int:
    """``search.screen.steps`` resolved for a model: "auto" is ``AUTO_STEPS`` where the model has
    no BatchNorm (``norms`` False) and none where it has."""
    return (0 if norms else AUTO_STEPS) if steps == "auto" else int(steps)


def adapting(steps: int | str, norms: bool) -> str:
    """What the screen does to a pruned candidate before scoring it, in words."""
    n = screen_steps(steps, norms)
    tuned = f"{n} SGD step{'s' if n != 1 else ''}"
    if norms:
        return f"{tuned}, then re-estimate BatchNorm" if n else "re-estimate BatchNorm"
    return f"{tuned} (no BatchNorm to re-estimate)" if n else "no BatchNorm to re-estimate"


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has running statistics (BatchNorm, a tracking InstanceNorm) for
    adaptive BN to re-estimate."""
    return bool(running_norms(model))


@dataclass(frozen=True)
class Tune:
    """The screen's short finetune (``search.screen.steps``): one SGD step per batch, with the
    trial's optimiser (SGD, Nesterov momentum) at its learning rate, on training batches that
    neither the BatchNorm nor the scoring slice holds. No steps: the proxy is adaptive BN's."""

    task: Any
    batches: Batches
    lr: float = 0.01
    weight_decay: float = 5e-4

    @classmethod
    def of(cls, job: Mapping[str, Any], task, bn: Batches, score: Batches, norms: bool) -> Tune:
        """``job["steps"]``: a number, or "auto" (``screen_steps``)."""
        steps = screen_steps(job.get("steps", 0), norms)
        if steps <= 0:
            return cls(task, [])
        skip = len(bn) + (0 if score is bn else len(score))
        taken = _batches_after(task, int(job.get("seed", 0)), skip, steps)
        # Too little data for a slice of its own: tune on the BatchNorm slice, never the scored one.
        lr, decay = float(job.get("lr", 0.01)), float(job.get("weight_decay", 5e-4))
        return cls(task, taken or list(bn[:steps]), lr, decay)

    def __call__(self, model: nn.Module) -> None:
        opt = sgd(model, self.lr, self.weight_decay)
        model.train()
        with torch.enable_grad():
            for x, y in self.batches:
                loss = self.task.loss_fn(call_model(model, x), y)
                if not torch.isfinite(loss):  # collapsed: the proxy says so (WORST_PROXY)
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.zero_grad(set_to_none=True)
        model.eval()


def _batches_after(task, seed: int, skip: int, n: int) -> Batches:
    """``n`` training batches after the first ``skip`` of the seeded order (fewer if the data
    runs out): the proxy's slices come first in that order, so these are disjoint from them."""
    reseed_loaders(task, seed)
    return [b for i, b in zip(range(skip + n), task.train_loader, strict=False) if i >= skip]


def adapt_batchnorm(model: nn.Module, batches: Batches) -> int:
    """Re-estimate every normalisation's running statistics on ``batches`` (adaptive BN; see
    ``running_norms``). Returns how many layers were (0: the proxy is the plain score)."""
    return reestimate_norms(model, running_norms(model), batches)
