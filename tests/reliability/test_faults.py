"""Faults inside trials, on the real local Ray cluster: every trial is accounted for.

Workers are killed at random points (seeded) several times in one search, a trial raises, a
trial hangs past its timeout. After each search ``account`` settles it: every trial ended
COMPLETE, PRUNED or FAIL with a reason, the budget was met, and MLflow holds each trial once.
"""

from __future__ import annotations

import random

from optuna.trial import TrialState

from orchestrator import open_study, prepare, run_search
from workers import TrialStatus

from .helpers import account, faulty, kills, replace_search, states

SEED = 20261123
BASE_EVENTS = 3  # the base model's measurement: 2 calibration batches and one evaluate()
TRIAL_EVENTS = 26  # a trial at 1 epoch: 2 calibration batches, 23 training batches, 1 evaluate()


def test_workers_killed_at_random_points_and_a_raising_trial_leave_every_trial_accounted_for(
    tmp_path, ray_cluster, ledger
):
    trials = 4
    rng = random.Random(SEED)
    # Three kills anywhere in the first three trials' work (pruning, finetuning or evaluation,
    # whichever trial draws that event), and one exception in between.
    points = rng.sample(range(BASE_EVENTS + 4, BASE_EVENTS + 3 * TRIAL_EVENTS), 4)
    kill_at, raise_at = sorted(points[:3]), points[3:]
    config, counter = faulty(
        tmp_path, "kill", trials=trials, count_batches=True, kill_at=kill_at, raise_at=raise_at
    )
    outcome = run_search(prepare(config), progress=lambda line: None)

    fired = kills(counter)
    assert [int(k.split()[1]) for k in fired] == kill_at, fired  # every kill landed, each once
    ledger.fault("worker killed", len(fired))
    ledger.fault("exception in a trial")
    pids = {ln.split()[0] for ln in counter.read_text().splitlines() if not ln.startswith("KILL")}
    assert len(pids) >= 1 + len(fired)  # each killed worker process was replaced

    study = account(config, ledger)
    got = [
        t for t in states(config) if not (t[2] and "not started" in t[2])
    ]  # never ran: not counted
    assert len(got) == trials, got  # a killed trial is re-run by Ray, never asked again by Optuna
    raised = [t for t in got if t[2] and "injected failure" in t[2]]
    assert (
        len(raised) == 1 and raised[0][1] == "FAIL" and raised[0][2].startswith("RuntimeError: ")
    ), got
    # A kill is retried (resources.max_retries); only three kills of one trial would fail it.
    crashed = [t for t in got if t[1] == "FAIL" and t not in raised]
    assert all(r.startswith("WorkerCrashedError") for _, _, r in crashed), got
    assert len(crashed) + 1 == sum(1 for t in study.trials if t.state == TrialState.FAIL)
    assert sum(outcome.counts.values()) == trials and outcome.counts[TrialStatus.FAILED] == 1 + len(
        crashed
    )
    numbers = [r.number for r in outcome.results]
    assert len(numbers) == len(set(numbers)) == trials, numbers  # no trial counted twice
    ledger.check(7)


def _enqueue_slow_first(config, prepared, n_fast: int) -> None:
    study = open_study(config)
    names = prepared.discovery.names
    study.enqueue_trial({f"ratio/{n}": (0.0 if n == "stem.0" else 0.5) for n in names})  # slow
    for _ in range(n_fast):
        study.enqueue_trial({f"ratio/{n}": 0.5 for n in names})


def test_a_hung_trial_is_cancelled_at_its_timeout_and_the_search_goes_on(
    tmp_path, ray_cluster, ledger
):
    config, _ = faulty(tmp_path, "hang", trials=3, sleep_unpruned_s=120)
    config = replace_search(
        config, trial_timeout_s=20
    )  # a normal trial here takes 2-5 s; more on a busy CI
    prepared = prepare(config)
    _enqueue_slow_first(config, prepared, 2)
    outcome = run_search(prepared, progress=lambda line: None)
    ledger.fault("hung trial")
    got = states(config)
    assert got[0][1] == "FAIL" and got[0][2].startswith("timeout: still running after 20 s"), got
    assert [s for _, s, _ in got[1:]] == ["COMPLETE", "COMPLETE"], got
    assert outcome.counts[TrialStatus.FAILED] == 1
    account(config, ledger)
    ledger.check(3)
