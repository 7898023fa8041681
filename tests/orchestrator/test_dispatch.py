"""Dispatch on a real Ray cluster: where the cluster cannot run more than ``concurrency`` trials,
the next trial waits in Ray's queue (it starts the instant a worker frees); it never runs beyond
``concurrency``, and where the cluster could run more, nothing waits in Ray's queue."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from orchestrator import (
    Loop,
    SearchContext,
    SearchRecorder,
    cluster_slots,
    config_from_dict,
    open_study,
    start_board,
    trial_request,
)
from search_space import Discovery, PrunableGroup, SearchSpace
from workers import TrialResult

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
    ratio = spec["plan"]["ratios"]["all"]
    return TrialResult(
        number=spec["number"],
        status="complete",
        plan=spec["plan"],
        accuracy=1.0 - 0.1 * ratio,
        latency={"median_ms": 10.0 - ratio},
    )


class _Watched(Loop):
    """The real loop, noting the most trials it ever had in flight (running or queued in Ray)."""

    most = 0

    def _dispatch(self) -> None:
        super()._dispatch()
        self.most = max(self.most, len(self.in_flight))


def _search(
    tmp_path: Path, concurrency: int, lines: list[str] | None = None
) -> tuple[_Watched, list[tuple[int, float, float]]]:
    config = config_from_dict(
        {
            "name": f"dispatch-{concurrency}",
            "search": {"trials": TRIALS, "concurrency": concurrency, "seed": 0},
            "storage": f"sqlite:///{tmp_path}/optuna.db",
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        }
    )
    study = open_study(config)
    recorder = SearchRecorder(config)
    base = {"accuracy": 1.0, "latency_ms": 10.0, "macs": 1.0, "params": 1.0}
    recorder.start(base)
    board, spans = start_board(None, 1.01, 0.02), Spans.remote()
    space = SearchSpace(granularity="uniform", criteria=("l1",), round_to=(1,))
    discovery = Discovery(groups=(PrunableGroup("x", "Conv2d", 64, ("x",)),), excluded=())
    ctx = SearchContext(
        config,
        study,
        space,
        discovery,
        lambda spec: _sleep_trial.remote(spec, spans, board),
        recorder,
        board,
        base,
        0.0,
    )
    loop = _Watched(
        ctx,
        lambda number, plan: {"number": number, "plan": plan.to_dict()},
        progress=(lines if lines is not None else []).append,
    )
    try:
        assert loop.run() == "trials"
        return loop, ray.get(spans.get.remote())
    finally:
        recorder.finish([], None, {}, "trials")
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
    ray_cluster, tmp_path
):
    slots = int(cluster_slots(trial_request(config_from_dict({"name": "x"}).resources)))
    deadline = time.monotonic() + 30  # a previous test's workers may still be handing back CPUs
    while ray.available_resources().get("CPU", 0) < slots and time.monotonic() < deadline:
        time.sleep(0.5)
    if ray.available_resources().get("CPU", 0) < slots:
        pytest.skip(
            "another test's actor holds a CPU of the session cluster; the cluster is not ours to fill"
        )
    lines: list[str] = []
    loop, spans = _search(tmp_path, concurrency=slots, lines=lines)
    assert [n for n, _, _ in spans] == list(range(TRIALS))  # every trial ran once
    assert loop.most == slots + 1  # one waited in Ray's queue behind the running ones
    assert _most_running(spans) <= slots
    # The progress line tells the waiting trial from the running ones.
    counts = [re.search(r"\| running (\d+)(?:, queued (\d+))? \|", line) for line in lines]
    counts = [(int(m[1]), int(m[2] or 0)) for m in counts if m]
    # (a line may read "in flight N" instead, when the board is slow to answer on a loaded machine)
    assert counts and max(running for running, _ in counts) <= slots
    assert any(queued >= 1 for _, queued in counts)  # a snapshot: a trial may have begun since


def test_a_cluster_with_room_to_spare_queues_nothing_in_ray(ray_cluster, tmp_path):
    loop, spans = _search(tmp_path, concurrency=1)  # the session cluster could run 2
    assert [n for n, _, _ in spans] == list(range(TRIALS))
    assert loop.most == 1
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
