"""Dispatch on a real Ray cluster: where the cluster cannot run more than ``concurrency`` trials,
the next trial waits in Ray's queue (it starts the instant a worker frees); it never runs beyond
``concurrency``, and where the cluster could run more, nothing waits in Ray's queue."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import ray

from orchestrator import (
    Config,
    Limits,
    Listener,
    Loop,
    Tally,
    TrialSpec,
    cluster_slots,
    config_from_dict,
    start_board,
    trial_request,
    trial_spec,
    warm_workers,
)
from search_space import PruningPlan
from workers import TrialLatency, TrialResult, TrialStatus

TRIALS = 8


@ray.remote(num_cpus=0)
class Spans:
    def __init__(self) -> None:
        self.spans: list[tuple[int, float, float]] = []

    def add(self, number: int, start: float, end: float) -> None:
        self.spans.append((number, start, end))

    def get(self) -> list[tuple[int, float, float]]:
        return sorted(self.spans)


@ray.remote(num_cpus=1)
def _sleep_trial(spec: dict[str, Any], spans: Any, board: Any) -> TrialResult:
    board.started.remote(spec["number"])
    start = time.time()
    time.sleep(0.15 + 0.05 * (spec["number"] % 3))
    ray.get(spans.add.remote(spec["number"], start, time.time()))
    return TrialResult(
        number=spec["number"],
        status=TrialStatus.COMPLETE,
        plan=PruningPlan.from_dict(spec["plan"]),
        accuracy=0.9,
        latency=TrialLatency(median_ms=10.0),
    )


@dataclass
class _Watch(Listener):
    """Notes what the loop tells its listeners: the most trials it ever had in flight (running or
    queued in Ray), each completion's tally, and every trial's result."""

    most: int = 0
    tallies: list[Tally] = field(default_factory=list)
    results: list[int] = field(default_factory=list)

    def on_trial_start(self, trial: Any, in_flight: int) -> None:
        self.most = max(self.most, in_flight)

    def on_trial_result(self, trial: Any, result: TrialResult) -> None:
        self.results.append(result.number)

    def on_trial_complete(self, result: TrialResult, tally: Tally) -> None:
        self.tallies.append(tally)


@ray.remote(num_cpus=1)
def _hung_trial(spec: dict[str, Any], board: Any) -> TrialResult:
    board.started.remote(spec["number"])
    time.sleep(120)
    raise AssertionError("the loop should have cancelled this trial long before")


class _SignalAfterStart(Listener):
    """Sends this process SIGTERM half a second after the last trial is dispatched: the loop has
    met its trial budget by then and waits on the trial in flight."""

    def on_trial_start(self, trial: Any, in_flight: int) -> None:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()


def _ask(config: Config) -> Any:
    """Trials numbered 0, 1, ... in the order asked, each with the spec a search would send."""
    numbers = itertools.count()

    def ask() -> tuple[Any, TrialSpec]:
        n = next(numbers)
        return SimpleNamespace(number=n), trial_spec(config, n, PruningPlan(ratios={}, units={}))

    return ask


def _search(concurrency: int) -> tuple[_Watch, list[tuple[int, float, float]]]:
    config = config_from_dict({"name": "dispatch", "search": {"concurrency": concurrency}})
    board, spans = start_board(None, 1.01, 0.02), Spans.remote()
    watch = _Watch()
    loop = Loop(
        _ask(config),
        lambda spec: _sleep_trial.remote(spec.to_dict(), spans, board),
        [watch],
        Limits.of(config, TRIALS),
        board,
    )
    try:
        assert loop.run() == "trials"
        assert sorted(watch.results) == list(range(TRIALS))  # each result reached the listener once
        assert sorted(r.number for r in loop.results) == list(range(TRIALS))
        assert [t.done for t in watch.tallies] == list(range(1, TRIALS + 1))  # one at a time
        return watch, ray.get(spans.get.remote())
    finally:
        ray.kill(board)
        ray.kill(spans)


def _most_running(spans: list[tuple[int, float, float]]) -> int:
    events = sorted([(s, 1) for _, s, _ in spans] + [(e, -1) for _, _, e in spans])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_a_full_cluster_queues_the_next_trial_in_ray_but_never_runs_more_than_allowed(
    ray_cluster,
):
    slots = int(cluster_slots(trial_request(config_from_dict({"name": "x"}).resources)))
    deadline = time.monotonic() + 30  # a previous test's workers may still be handing back CPUs
    while ray.available_resources().get("CPU", 0) < slots and time.monotonic() < deadline:
        time.sleep(0.5)
    if ray.available_resources().get("CPU", 0) < slots:
        pytest.skip(
            "another test's actor holds a CPU of the session cluster; the cluster is not ours to fill"
        )
    watch, spans = _search(concurrency=slots)
    assert [n for n, _, _ in spans] == list(range(TRIALS))  # every trial ran once
    assert watch.most == slots + 1  # one waited in Ray's queue behind the running ones
    assert _most_running(spans) <= slots
    # Each completion's tally tells the waiting trial from the running ones (running is None
    # when the board is slow to answer on a loaded machine: only "in flight" is known then).
    counts = [(t.running, t.queued) for t in watch.tallies if t.running is not None]
    assert counts and max(running for running, _ in counts) <= slots
    assert any(queued >= 1 for _, queued in counts)  # a snapshot: a trial may have begun since


def test_a_cluster_with_room_to_spare_queues_nothing_in_ray(ray_cluster):
    watch, spans = _search(concurrency=1)  # the session cluster could run 2
    assert [n for n, _, _ in spans] == list(range(TRIALS))
    assert watch.most == 1
    assert _most_running(spans) == 1


def test_slots_count_the_cluster_s_totals_and_a_label_selector_counts_none(ray_cluster):
    cpus = ray.cluster_resources()["CPU"]
    assert cluster_slots({"CPU": 1.0}) == cpus
    assert cluster_slots({"CPU": 0.5}) == 2 * cpus
    assert cluster_slots({"CPU": 1.0, "GPU": 1.0}) == 0  # no GPU here: no trial could run
    resources = config_from_dict(
        {"name": "x", "resources": {"label_selector": {"role": "trainer"}}}
    ).resources
    assert trial_request(resources) == {}
    assert cluster_slots({}) == float("inf")


def test_warm_workers_ready_one_process_per_trial_slot_and_one_for_a_trial_that_waits(ray_cluster):
    def config(concurrency, task="digits"):
        return config_from_dict({"name": "x", "task": task, "search": {"concurrency": concurrency}})

    # 2 CPUs, one reserved by a bench: one trial runs at a time, and a second waits in Ray's
    # queue, starting when the first blocks on the bench for its timing: two processes.
    said: list[str] = []
    assert len(warm_workers(config(2), 1.0, said.append)) == 2
    assert len(said) == 1 and said[0].startswith("starting 2 worker process(es)")  # not silent
    assert len(warm_workers(config(1), 1.0)) == 1  # nothing waits behind a lone trial
    assert len(warm_workers(config("auto"), 0.0)) == 2  # one per CPU, nothing queued
    # A task that will not build is not warm_workers' to report (the base model's measurement
    # says why, before any trial): no process, no error.
    assert warm_workers(config(2, "tests.no_such_module:build"), 1.0) == []
    gpu = config_from_dict({"name": "x", "resources": {"num_gpus": 1}})
    assert warm_workers(gpu, 1.0, said.append) == []  # must meet CUDA with the GPU Ray assigns
    assert len(said) == 1  # nothing started, nothing said


@pytest.mark.parametrize("stop", ["signal", "deadline"])
def test_a_signal_or_the_deadline_after_the_last_trial_is_asked_still_stops_the_search(
    ray_cluster, stop
):
    # The trial budget is met at the first dispatch (one trial); a signal or deadline coming after
    # that must still stop the search within the grace period, not wait for the hung trial.
    search = {"concurrency": 1, "grace_s": 1.0} | (
        {"deadline_s": 1.0} if stop == "deadline" else {}
    )
    config = config_from_dict({"name": "stop-late", "search": search})
    board = start_board(None, 1.01, 0.02)
    listeners = [_SignalAfterStart()] if stop == "signal" else []
    loop = Loop(
        _ask(config),
        lambda spec: _hung_trial.remote(spec.to_dict(), board),
        listeners,
        Limits.of(config, 1),
        board,
    )
    began = time.monotonic()
    try:
        assert loop.run() == stop
    finally:
        ray.kill(board)
    assert time.monotonic() - began < 30  # the grace period, not the trial's 120 s
    [result] = loop.results
    assert result.status == TrialStatus.FAILED and result.reason.startswith(f"{stop}: ")
