"""Load: 300 short real trials on 2 workers; the driver's memory stays flat, and the study,
MLflow and the latency cache agree at the end.

Short: digits, no finetuning, one uniform ratio on a 0.05 grid (17 architectures, so most
trials reuse a cached latency). Each trial still prunes, measures or looks up its latency,
evaluates, ships its pruned weights to the driver and gets a child run with an artifact.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import optuna

from orchestrator import prepare, run_search
from tests.e2e.helpers import quick_config, runs_of
from workers import TrialStatus

TRIALS = 300
GROWTH_MB = 200  # bound on the driver's RSS growth from its first recorded trial to its peak


def _rss() -> int:
    """This process's resident memory in bytes (Linux: the second field of /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples this process's resident memory every 0.2 s while the search runs."""

    def __init__(self) -> None:
        self.start = self.peak = _rss()
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            rss = _rss()
            self.samples.append(rss)
            self.peak = max(self.peak, rss)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()


def test_300_short_trials_with_flat_driver_memory_and_agreeing_records(
    tmp_path, ray_cluster, ledger
):
    config = quick_config(
        tmp_path,
        name="load",
        search__trials=TRIALS,
        search__sampler="random",
        finetune__epochs=0,
        search__space={
            "granularity": "uniform",
            "ratio": [0.0, 0.8],
            "step": 0.05,
            "criteria": ["l1"],
            "round_to": [1],
        },
    )
    warm: list[int] = []  # RSS once the first trial is recorded: torch, MLflow and Ray are loaded

    def progress(line: str) -> None:
        if line.startswith("[") and not warm:
            warm.append(_rss())

    t0 = time.perf_counter()
    with _PeakRSS() as rss:
        outcome = run_search(prepare(config), progress=progress)
    wall = time.perf_counter() - t0
    mb = 2**20
    growth = (rss.peak - warm[0]) / mb
    # The last third of the search may not hold more memory than its first third did: no per-trial leak.
    third = len(rss.samples) // 3
    early, late = max(rss.samples[:third]) / mb, max(rss.samples[-third:]) / mb
    report = {
        "trials": TRIALS,
        "wall_s": round(wall, 1),
        "rss_before_mb": round(rss.start / mb),
        "rss_after_first_trial_mb": round(warm[0] / mb),
        "rss_peak_mb": round(rss.peak / mb),
        "growth_mb": round(growth),
        "peak_first_third_mb": round(early),
        "peak_last_third_mb": round(late),
    }
    out = Path(os.environ["PRUNESEARCH_CACHE"]).parent / "load-test.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("load test:", report)
    assert growth < GROWTH_MB, report
    assert late - early < 100, report

    # The study: every trial finished once.
    study = optuna.load_study(study_name="load", storage=config.storage)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(TRIALS))
    assert sum(outcome.counts.values()) == TRIALS and outcome.counts[TrialStatus.FAILED] == 0, (
        outcome.counts
    )
    # MLflow: one child run per trial, with the study's status.
    _, children = runs_of(config)
    by_number = {int(c.data.tags["prunesearch.trial"]): c for c in children}
    assert len(children) == len(by_number) == TRIALS
    assert all(by_number[t.number].data.tags["status"] == t.user_attrs["status"] for t in trials)
    # The latency cache: one entry per architecture (the base model's too), and every trial's
    # latency is its entry's.
    cache = {
        k.rsplit(":", 1)[1]: v
        for k, v in study.user_attrs.items()
        if k.startswith("latency:")  # one target: every cached entry is its
    }
    signatures = {t.user_attrs["signature"] for t in trials}
    assert signatures <= set(cache) and len(cache) <= 17
    assert all(
        t.user_attrs["latency"]["median_ms"] == cache[t.user_attrs["signature"]]["median_ms"]
        for t in trials
    )
    ledger.lost(TRIALS - len(children))
    ledger.check(7)
