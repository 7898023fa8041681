"""A slow trial does not hold back the others (dispatch is asynchronous). The fault tests
(killed workers, exceptions, hung trials) are in tests/reliability."""

from __future__ import annotations

import dataclasses

import optuna
from optuna.trial import TrialState

from orchestrator import open_study, prepare, run_search

from ..reliability.helpers import faulty, replace_search


def test_a_slow_trial_does_not_hold_back_the_others(tmp_path, ray_cluster):
    config, _ = faulty(tmp_path, "async", trials=4, sleep_unpruned_s=25)
    config = replace_search(config, concurrency=2)
    config = dataclasses.replace(
        config, resources=dataclasses.replace(config.resources, num_cpus=0.5)
    )
    prepared = prepare(config)
    study = open_study(config)
    names = prepared.discovery.names
    study.enqueue_trial({f"ratio/{n}": (0.0 if n == "stem.0" else 0.5) for n in names})  # slow
    for _ in range(3):
        study.enqueue_trial({f"ratio/{n}": 0.5 for n in names})
    run_search(prepared, progress=lambda line: None)
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    slow, *fast = study.trials
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    # The three fast trials were dispatched and finished while the slow one still ran.
    assert all(t.datetime_complete < slow.datetime_complete for t in fast), [
        (t.number, t.datetime_start, t.datetime_complete) for t in study.trials
    ]
    assert fast[-1].datetime_start < slow.datetime_complete
