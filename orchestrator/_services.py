"""Cluster services a trial talks to mid-flight: the latency bench of a target, and the front board.

``LatencyBench`` is one Ray actor per target placement, placed by the target's resources/labels,
with ``max_concurrency=1``: measurements on a target never overlap, and it reserves the CPUs it
times on so Ray schedules no training there. It also holds each target's latency cache
(architecture signature -> stats), so a repeated architecture is never measured twice.

``FrontBoard`` holds the current feasible front (updated by the orchestrator after each tell)
and answers the two questions a worker asks: "reject before finetune?" and "stop after this
epoch?". Workers receive plain callables wrapping these handles; ``workers/`` never sees Ray.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import ray
from torch import nn

from search_space import computed_weights
from workers import (
    ConstraintRules,
    Target,
    TrialLatency,
    TrialResult,
    TrialStatus,
    cached_task,
    calibrate,
    measure_group,
    measure_latency,
    profile_job,
    rebase,
    run_trial,
    screen_candidates,
)

from ._config import Config, Screen

SCREEN_ROUNDS = Screen().timing_rounds  # search.screen.timing_rounds' default


class LatencyBench:
    """Times models for the targets placed on one machine, one measurement at a time."""

    def __init__(
        self, targets: Mapping[str, dict[str, Any]], caches: Mapping[str, Mapping[str, dict]]
    ) -> None:
        self.targets = {name: Target.from_dict(t) for name, t in targets.items()}
        self.caches: dict[str, dict[str, dict]] = {
            name: dict(caches.get(name, {})) for name in targets
        }
        self.measured = 0
        self.screen_cache: dict[str, dict[str, dict]] = {}
        self.references: dict[str, nn.Module] = {}  # target -> the base model
        self.reference_signature = ""  # its architecture: paired figures are keyed on it
        self.calibrations: dict[str, dict[str, Any]] = {}  # target -> calibrate()'s figures
        self.screened = 0

    def lookup(self, target: str, signature: str) -> dict | None:
        hit = self.caches[target].get(signature)
        return {**self._on_scale(target, hit), "cached": True} if hit else None

    def measure(self, target: str, signature: str, model: nn.Module, example_inputs: Any) -> dict:
        """A trial's measurement: paired against the reference (the base model) when the target
        is paired and has one, else absolute. Cached per architecture as measured (a paired
        entry keeps its ratio, so it is re-based on whatever calibration reads it)."""
        cache = self.caches[target]
        if signature in cache:  # a concurrent trial measured the same architecture meanwhile
            return {**self._on_scale(target, cache[signature]), "cached": True}
        spec, reference = self.targets[target], self.references.get(target)
        paired = spec.paired and reference is not None
        stats = measure_latency(model, example_inputs, spec, reference if paired else None)
        stats = stats.to_dict()
        stats["node"] = ray.get_runtime_context().get_node_id()  # proof it was timed on the target
        if paired:
            stats["reference"] = self.reference_signature
            if signature == self.reference_signature:
                stats["ratio"] = 1.0  # the reference's own architecture runs as fast as itself
        cache[signature] = stats
        self.measured += 1
        return {**self._on_scale(target, stats), "cached": False}

    def set_reference(
        self,
        target: str,
        model: nn.Module,
        example_inputs: Any,
        calibration: Mapping[str, Any] | None = None,
        signature: str = "",
    ) -> dict[str, Any]:
        """Keep the base model here (sent once, not with every trial) and its calibration: the
        stored one of a resumed search, so all its trials share one scale, or a new one."""
        self.references[target] = model.cpu().eval()
        self.reference_signature = signature
        if calibration is None:
            calibration = calibrate(self.references[target], example_inputs, self.targets[target])
        self.calibrations[target] = dict(calibration)
        return dict(calibration)

    def _on_scale(self, target: str, stats: Mapping[str, Any]) -> dict:
        calibration = self.calibrations.get(target)
        if stats.get("ratio") is None or calibration is None:
            return dict(stats)
        return rebase(stats, float(calibration["ms"]))

    def screen(
        self,
        target: str,
        example_inputs: Any,
        items: list[tuple[str, nn.Module]],
        rounds: int = SCREEN_ROUNDS,
    ) -> list[dict]:
        """Time screening candidates with a short protocol: enough to bin hundreds of candidates
        by latency. With a reference (the base model), the batch is timed as one sequence against
        it, a reference half between every four candidates (``workers.measure_group``), and each
        candidate's latency is the centre of its ratios to the reference halves either side times
        the reference's calibrated latency, so drift between candidates timed minutes apart
        cancels. A trial's full measurement, when the cache has one, is used instead; short ones
        are kept apart from the trials' cache."""
        full, short = self.caches[target], self.screen_cache.setdefault(target, {})
        quick = screen_target(self.targets[target], rounds)
        new = {s: m for s, m in items if s not in full and s not in short}  # one per architecture
        reference = self.references.get(target)
        if new and reference is not None:
            # One sequence for the batch: the base model's runs shared between candidates.
            timed = measure_group(list(new.values()), example_inputs, quick, reference)
        else:
            timed = [measure_latency(m, example_inputs, quick, reference) for m in new.values()]
        for signature, stats in zip(new, timed, strict=True):
            short[signature] = stats.to_dict()
        self.screened += len(new)
        return [self._on_scale(target, full.get(s) or short[s]) for s, _ in items]

    def stats(self) -> dict[str, int]:
        return {"measured": self.measured, "cached": sum(len(c) for c in self.caches.values())}


class FrontBoard:
    def __init__(
        self, max_latency_ms: float | None, best_possible_accuracy: float, margin: float
    ) -> None:
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

    def reject(self, latency_ms: float, dominated: bool = True) -> tuple[TrialStatus, str] | None:
        """Constraint first (infeasible: the sampler learns), then dominance (rejected)."""
        verdict = ConstraintRules(self.max_latency_ms).reject(TrialLatency(median_ms=latency_ms))
        if verdict is not None or not dominated:
            return verdict
        for acc, lat in self.front:
            if lat <= latency_ms and acc >= self.best_possible:
                return TrialStatus.REJECTED, (
                    f"latency {latency_ms:.3f} ms is dominated by a front model ({lat:.3f} ms "
                    f"at accuracy {acc:.4f}, the best reachable): not finetuned"
                )
        return None

    def hopeless(self, latency_ms: float, accuracy: float, epoch: int, epochs: int) -> bool:
        """After epoch k of n: can this trial still reach the front? (the early-stopping rule)"""
        if epoch + 1 >= epochs:
            return False  # the last epoch: nothing left to save
        slack = self.margin * (epochs - epoch - 1)  # accuracy the remaining epochs could still add
        return any(lat <= latency_ms and acc > accuracy + slack for acc, lat in self.front)


@dataclass
class RemoteMeasure:
    """``measure(model, example_inputs, signature)`` for a worker, backed by the targets' benches.

    The primary target's stats are the trial's latency; every other target's stats ride along
    under ``"targets"`` (name -> stats).
    """

    benches: Mapping[str, Any]  # target name -> ActorHandle of the bench that times it
    primary: str

    def __call__(self, model: nn.Module, example_inputs: Any, signature: str) -> dict:
        model = computed_weights(model.cpu())  # what pickles (see search_space)
        stats = self._on(self.primary, model, example_inputs, signature)
        others = [name for name in self.benches if name != self.primary]
        if others:
            stats["targets"] = {
                name: self._on(name, model, example_inputs, signature) for name in others
            }
        return stats

    def _on(self, target: str, model: nn.Module, example_inputs: Any, signature: str) -> dict:
        bench = self.benches[target]
        hit = ray.get(bench.lookup.remote(target, signature))
        return (
            hit
            if hit is not None
            else ray.get(bench.measure.remote(target, signature, model, example_inputs))
        )

    def set_reference(
        self,
        model: nn.Module,
        example_inputs: Any,
        stored: Mapping[str, Mapping[str, Any]],
        signature: str,
    ) -> dict[str, dict[str, Any]]:
        """Every target's bench keeps the base model and its calibration (``stored`` by target
        name, from a resumed search, or measured now); returns the calibrations by target."""
        model = computed_weights(model.cpu())
        calls = {
            name: bench.set_reference.remote(
                name, model, example_inputs, stored.get(name), signature
            )
            for name, bench in self.benches.items()
        }
        return {name: ray.get(ref) for name, ref in calls.items()}

    def many(
        self,
        example_inputs: Any,
        items: list[tuple[str, nn.Module]],
        rounds: int = SCREEN_ROUNDS,
    ) -> list[dict]:
        """Screening candidates on the primary target, one call for the whole batch."""
        return ray.get(
            self.benches[self.primary].screen.remote(
                self.primary,
                example_inputs,
                [(sig, computed_weights(m.cpu())) for sig, m in items],
                rounds,
            )
        )


def screen_target(target: Target, rounds: int = SCREEN_ROUNDS) -> Target:
    """The short timing protocol of screening: a fifth of the warm-up, ``rounds`` pairs
    (search.screen.timing_rounds) before the stop rule looks at the spread, to a looser
    precision (3 %; or, unpaired, 3 rounds of half the runs), at most 4x a third of the full
    protocol's pairs, no time floor, no retries: one slow candidate moves a bin, not the front."""
    return replace(
        target,
        warmup=max(2, target.warmup // 5),
        rounds=min(3, target.rounds),
        runs=max(3, target.runs // 2),
        retries=0,
        pairs=max(1, rounds),
        precision=max(0.03, target.precision),
        max_pairs=max(rounds, 4 * max(6, target.pairs // 3)),
        min_seconds=0.0,
    )


@dataclass
class RemoteRules:
    """The board's verdicts, for a worker (implements workers._trial.Rules)."""

    board: Any  # ActorHandle
    epochs: int
    reject_dominated: bool = True
    stop_hopeless: bool = True

    def reject(self, latency: TrialLatency) -> tuple[TrialStatus, str] | None:
        return ray.get(self.board.reject.remote(float(latency.median_ms), self.reject_dominated))

    def stop(self, latency_ms: float, epoch: int, accuracy: float) -> bool:
        return self.stop_hopeless and ray.get(
            self.board.hopeless.remote(latency_ms, accuracy, epoch, self.epochs)
        )


def placements(targets: Sequence[Target]) -> list[list[Target]]:
    """Targets grouped by where they are timed: device kind, resources and labels."""
    groups: dict[str, list[Target]] = {}
    for t in targets:
        key = json.dumps(
            [t.device.split(":")[0], dict(t.resources), dict(t.label_selector)], sort_keys=True
        )
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def bench_cpus(group: Sequence[Target]) -> int:
    """The CPUs one bench reserves: enough for its most threaded target."""
    return max(t.threads for t in group)


def reserved_cpus(targets: Sequence[Target]) -> int:
    """The CPUs every bench of ``targets`` reserves together: none of them runs a trial."""
    return sum(bench_cpus(group) for group in placements(targets))


def start_benches(
    targets: Sequence[Target], caches: Mapping[str, Mapping[str, dict]]
) -> dict[str, Any]:
    """One bench actor per placement (device kind, resources, labels), shared by the targets
    placed alike: they are one machine's, so their measurements must not overlap either, and
    each reserves the CPUs (or the GPU) it times on, so Ray schedules no training there."""
    out: dict[str, Any] = {}
    for group in placements(targets):
        first = group[0]
        options: dict[str, Any] = {
            "num_cpus": bench_cpus(group),
            "max_concurrency": 1,
            "max_restarts": 2,
            "max_task_retries": 2,
        }
        if first.device.startswith("cuda"):
            options["num_gpus"] = 1
        if first.resources:
            options["resources"] = dict(first.resources)
        if first.label_selector:
            options["label_selector"] = dict(first.label_selector)
        bench = (
            ray.remote(LatencyBench)
            .options(**options)
            .remote(
                {t.name: _plain(t) for t in group},
                {t.name: dict(caches.get(t.name, {})) for t in group},
            )
        )
        out.update({t.name: bench for t in group})
    return out


def trial_task(
    spec: dict, base_state: Any, *, measure: Any, rules: Any, board: Any = None
) -> TrialResult:
    """The Ray task around ``workers.run_trial``: it records which node trained the trial.

    It tells the board when it begins, so a trial's timeout counts from when it runs, not
    from when it was queued (a queued trial or a worker process still starting is not hung).
    """
    if board is not None:
        board.started.remote(int(spec["number"]))
    result = run_trial(spec, base_state, measure=measure, rules=rules)
    result.node = ray.get_runtime_context().get_node_id()
    return result


def screen_task(job: dict, base_state: Any, *, measure: Any) -> list:
    """The Ray task around ``workers.screen_candidates``: one batch of candidates."""
    rounds = int(job.get("timing_rounds", SCREEN_ROUNDS))
    many = None if measure is None else functools.partial(measure.many, rounds=rounds)
    return screen_candidates(job, base_state, measure=many)


def profile_task(job: dict, base_state: Any, discovery: Any) -> dict[str, Any]:
    """The Ray task around ``workers.profile_groups``: the allocator's table, as plain values."""
    return profile_job(job, base_state, discovery).to_dict()


def warm_task(task: str, options: Mapping[str, Any]) -> int:
    """A worker process readied for trials: torch and the workers imported, ``task`` built (its
    data and base model, cached per process as each trial and screen batch finds it)."""
    cached_task(task, options)
    return os.getpid()


# How long the search waits for warm_workers before it goes on without them: a task whose data
# takes longer to build is built by the base model's measurement as before.
WARM_TIMEOUT_S = 300.0


def warm_workers(
    config: Config, bench_cpus_total: float, progress: Callable[[str], None] | None = None
) -> list[int]:
    """On a one-node cluster, start the worker processes the base model's measurement, the screen
    and the first trials will run in, all at once, while the latency benches start, and wait for
    them. Returns their process ids (none on a cluster of several nodes, where a task that asks
    no CPU may land on any node, not where trials will run; and none for trials on a GPU).

    Why: Ray starts a worker process only when a task needs one, and a new one imports torch
    and builds the task before its first trial or screen batch, holding the CPU meanwhile (5 s,
    and 3 s more in the task, on a 2-core AMD EPYC). On 2 CPUs, with one reserved for timing, a
    search needs two (one runs while the other waits on the bench): warmed together here,
    `make demo`'s search took 0.88-0.89x the wall time (RESULTS.md, ``demo-warm``). They ask no
    CPU, so they start at once; the search waits for them, so no import runs beside a timing.
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) != 1 or config.resources.num_gpus:
        # GPU trials: a worker that built the task with no GPU assigned may have initialised
        # CUDA seeing none, and would not see the GPU Ray assigns its next task.
        return []
    cpus = (nodes[0].get("Resources") or {}).get("CPU", 0.0)
    per_trial = config.resources.num_cpus or 1.0
    slots = max(1, int((cpus - bench_cpus_total) // per_trial))
    want = slots if config.search.concurrency == "auto" else int(config.search.concurrency)
    # One more than run at once: a trial that waits on the bench for its timing frees its CPU.
    n = min(want, slots) + (1 if want > slots else 0)
    if progress is not None:  # else the console is silent for the seconds this takes
        progress(
            f"starting {n} worker process(es): torch imported, the task built, before any timing"
        )
    remote = ray.remote(warm_task).options(num_cpus=0, max_retries=0)
    refs = [remote.remote(config.task, dict(config.task_options)) for _ in range(n)]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=WARM_TIMEOUT_S)
    pids = []
    for ref in done:
        # A task that will not build: the base model's measurement reports it, as before.
        with contextlib.suppress(Exception):
            pids.append(int(ray.get(ref)))
    return pids


def start_board(max_latency_ms: float | None, best_possible: float, margin: float) -> Any:
    return ray.remote(FrontBoard).options(num_cpus=0).remote(max_latency_ms, best_possible, margin)


def _plain(target: Target) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(target)
    data["resources"], data["label_selector"] = dict(target.resources), dict(target.label_selector)
    return data
