"""Faults during a search on the real local Ray cluster: every trial is accounted for."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from orchestrator import prepare, run_search
from orchestrator._study import open_study

from ..e2e.helpers import quick_config, runs_of

NO_EARLY_RULES = {"reject_infeasible": False, "reject_dominated": False, "stop_hopeless": False}


def faulty(tmp_path: Path, name: str, trials: int, **options):
    counter = tmp_path / "calls.txt"
    config = quick_config(tmp_path, name=name, task="tests.fixtures.faulty_task:build",
                          task_options={"counter": str(counter), **options},
                          search__trials=trials, search__early_stop=NO_EARLY_RULES)
    return config, counter


def states(config) -> list[tuple[int, str, str | None]]:
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    return [(t.number, t.state.name, t.user_attrs.get("reason")) for t in study.trials]


def test_a_killed_worker_is_retried_and_every_trial_completes(tmp_path, ray_cluster):
    # Call 1 is the base model; trials run one at a time here, so calls 3 and 5 hit two trials.
    config, counter = faulty(tmp_path, "kill", trials=4, kill_at=[3, 5])
    outcome = run_search(prepare(config), progress=lambda line: None)
    assert [s for _, s, _ in states(config)] == ["COMPLETE"] * 4, states(config)
    calls = counter.read_text().split()
    assert len(calls) == 7  # 1 base + 4 trials + 2 re-runs
    assert len(set(calls)) >= 3  # the killed processes were replaced
    assert outcome.counts["complete"] == 4
    _, children = runs_of(config)
    assert sorted(int(c.data.tags["prunesearch.trial"]) for c in children) == [0, 1, 2, 3]


def test_an_exception_in_a_trial_fails_it_and_the_search_goes_on(tmp_path, ray_cluster):
    # Call 1 is the base model; call 3 fails whichever trial makes it (two may be in flight).
    config, _ = faulty(tmp_path, "raise", trials=3, raise_at=[3])
    run_search(prepare(config), progress=lambda line: None)
    got = states(config)
    assert sorted(s for _, s, _ in got) == ["COMPLETE", "COMPLETE", "FAIL"], got
    number, _, reason = next(t for t in got if t[1] == "FAIL")
    assert "RuntimeError: injected failure at evaluate call 3" in reason
    _, children = runs_of(config)
    failed = next(c for c in children if c.data.tags["prunesearch.trial"] == str(number))
    assert failed.info.status == "FAILED" and "injected failure" in failed.data.tags["reason"]


def _enqueue_slow_first(config, prepared, n_fast: int) -> None:
    study = open_study(config)
    names = prepared.discovery.names
    study.enqueue_trial({f"ratio/{n}": (0.0 if n == "stem.0" else 0.5) for n in names})  # slow
    for _ in range(n_fast):
        study.enqueue_trial({f"ratio/{n}": 0.5 for n in names})


def test_a_hung_trial_is_cancelled_at_its_timeout(tmp_path, ray_cluster):
    config, _ = faulty(tmp_path, "hang", trials=3, sleep_unpruned_s=120)
    config = quick_config_replace(config, trial_timeout_s=8)
    prepared = prepare(config)
    _enqueue_slow_first(config, prepared, 2)
    outcome = run_search(prepared, progress=lambda line: None)
    got = states(config)
    assert got[0][1] == "FAIL" and got[0][2].startswith("timeout: still running after 8 s"), got
    assert [s for _, s, _ in got[1:]] == ["COMPLETE", "COMPLETE"], got
    assert outcome.counts["failed"] == 1


def test_a_slow_trial_does_not_hold_back_the_others(tmp_path, ray_cluster):
    config, _ = faulty(tmp_path, "async", trials=4, sleep_unpruned_s=25)
    config = quick_config_replace(config, concurrency=2)
    config = config.__class__(**{**config.__dict__, "resources": config.resources.__class__(num_cpus=0.5)})
    prepared = prepare(config)
    _enqueue_slow_first(config, prepared, 3)
    run_search(prepared, progress=lambda line: None)
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    slow, *fast = study.trials
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    # The three fast trials were dispatched and finished while the slow one still ran.
    assert all(t.datetime_complete < slow.datetime_complete for t in fast), [(t.number, t.datetime_start, t.datetime_complete) for t in study.trials]
    assert fast[-1].datetime_start < slow.datetime_complete


def quick_config_replace(config, **search):
    import dataclasses

    return dataclasses.replace(config, search=dataclasses.replace(config.search, **search))
