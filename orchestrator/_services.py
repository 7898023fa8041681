"""Cluster services a trial talks to mid-flight: the latency bench of a target, and the front board.

``LatencyBench`` is one Ray actor per target, placed by the target's resources/labels, with
``max_concurrency=1``: measurements on a target never overlap, and it reserves the CPUs it
times on so Ray schedules no training there. It also holds the latency cache (architecture
signature -> stats), so a repeated architecture is never measured twice.

``FrontBoard`` holds the current feasible front (updated by the orchestrator after each tell)
and answers the two questions a worker asks: "reject before finetune?" and "stop after this
epoch?". Workers receive plain callables wrapping these handles; ``workers/`` never sees Ray.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
from torch import nn

from workers import Target, TrialResult, measure_latency, run_trial
from workers._trial import REJECTED, ConstraintRules


class LatencyBench:
    def __init__(self, target: dict[str, Any], cache: Mapping[str, dict] | None = None) -> None:
        self.target = Target.from_dict(target)
        self.cache: dict[str, dict] = dict(cache or {})
        self.measured = 0

    def lookup(self, signature: str) -> dict | None:
        hit = self.cache.get(signature)
        return {**hit, "cached": True} if hit else None

    def measure(self, signature: str, model: nn.Module, example_inputs: Any) -> dict:
        if signature in self.cache:  # a concurrent trial measured the same architecture meanwhile
            return {**self.cache[signature], "cached": True}
        stats = measure_latency(model, example_inputs, self.target).to_dict()
        stats["node"] = ray.get_runtime_context().get_node_id()  # proof it was timed on the target
        self.cache[signature] = stats
        self.measured += 1
        return {**stats, "cached": False}

    def stats(self) -> dict[str, int]:
        return {"measured": self.measured, "cached": len(self.cache)}


class FrontBoard:
    def __init__(self, max_latency_ms: float | None, best_possible_accuracy: float, margin: float) -> None:
        self.max_latency_ms = max_latency_ms
        self.best_possible = best_possible_accuracy  # no pruned model is expected to beat this
        self.margin = margin
        self.front: list[tuple[float, float]] = []  # (accuracy, latency_ms), feasible only
        self.starts: dict[int, float] = {}  # trial number -> wall-clock time its worker began

    def started(self, number: int) -> None:
        self.starts[number] = time.time()

    def start_times(self) -> dict[int, float]:
        return dict(self.starts)

    def update(self, front: list[tuple[float, float]]) -> None:
        self.front = list(front)

    def reject(self, latency_ms: float, dominated: bool = True) -> tuple[str, str] | None:
        """Constraint first (infeasible: the sampler learns), then dominance (rejected)."""
        verdict = ConstraintRules(self.max_latency_ms).reject({"median_ms": latency_ms})
        if verdict is not None or not dominated:
            return verdict
        for acc, lat in self.front:
            if lat <= latency_ms and acc >= self.best_possible:
                return REJECTED, (f"latency {latency_ms:.3f} ms is dominated by a front model ({lat:.3f} ms "
                                  f"at accuracy {acc:.4f}, the best reachable): not finetuned")
        return None

    def hopeless(self, latency_ms: float, accuracy: float, epoch: int, epochs: int) -> bool:
        """After epoch k of n: can this trial still reach the front? (the early-stopping rule)"""
        if epoch + 1 >= epochs:
            return False  # the last epoch: nothing left to save
        slack = self.margin * (epochs - epoch - 1)  # accuracy the remaining epochs could still add
        return any(lat <= latency_ms and acc > accuracy + slack for acc, lat in self.front)


@dataclass
class RemoteMeasure:
    """``measure(model, example_inputs, signature)`` for a worker, backed by a target's bench."""

    bench: Any  # ActorHandle

    def __call__(self, model: nn.Module, example_inputs: Any, signature: str) -> dict:
        hit = ray.get(self.bench.lookup.remote(signature))
        return hit if hit is not None else ray.get(self.bench.measure.remote(signature, model.cpu(), example_inputs))


@dataclass
class RemoteRules:
    """The board's verdicts, for a worker (implements workers._trial.Rules)."""

    board: Any  # ActorHandle
    epochs: int
    reject_dominated: bool = True
    stop_hopeless: bool = True

    def reject(self, latency: Mapping[str, Any]) -> tuple[str, str] | None:
        return ray.get(self.board.reject.remote(float(latency["median_ms"]), self.reject_dominated))

    def stop(self, latency_ms: float, epoch: int, accuracy: float) -> bool:
        return self.stop_hopeless and ray.get(self.board.hopeless.remote(latency_ms, accuracy, epoch, self.epochs))


def start_bench(target: Target, cache: Mapping[str, dict]) -> Any:
    """One bench actor on a node of the target, reserving the CPUs it times on."""
    options: dict[str, Any] = {"num_cpus": target.threads, "max_concurrency": 1, "max_restarts": 2,
                               "max_task_retries": 2}
    if target.device.startswith("cuda"):
        options["num_gpus"] = 1
    if target.resources:
        options["resources"] = dict(target.resources)
    if target.label_selector:
        options["label_selector"] = dict(target.label_selector)
    return ray.remote(LatencyBench).options(**options).remote(_plain(target), dict(cache))


def trial_task(spec: dict, base_state: Any, *, measure: Any, rules: Any, board: Any = None) -> TrialResult:
    """The Ray task around ``workers.run_trial``: it records which node trained the trial.

    It tells the board when it begins, so a trial's timeout counts from when it runs, not
    from when it was queued (a queued trial or a worker process still starting is not hung).
    """
    if board is not None:
        board.started.remote(int(spec["number"]))
    result = run_trial(spec, base_state, measure=measure, rules=rules)
    result.node = ray.get_runtime_context().get_node_id()
    return result


def start_board(max_latency_ms: float | None, best_possible: float, margin: float) -> Any:
    return ray.remote(FrontBoard).options(num_cpus=0).remote(max_latency_ms, best_possible, margin)


def _plain(target: Target) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(target)
    data["resources"], data["label_selector"] = dict(target.resources), dict(target.label_selector)
    return data
