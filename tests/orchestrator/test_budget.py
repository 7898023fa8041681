"""What counts toward the trial budget: trials that ran, not orphans re-asked or queued ones never run."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from orchestrator import finished_count


def test_orphans_and_never_started_trials_are_not_charged_to_the_budget():
    study = optuna.create_study(directions=["maximize", "minimize"])
    reasons = [
        None,
        "RuntimeError: boom",
        "orphaned: the driver stopped mid-trial",
        "signal: not started: queued when the search stopped",
        "signal: still running when the search stopped",
    ]
    for reason in reasons:
        trial = study.ask()
        trial.set_user_attr("reason", reason)
        study.tell(trial, state=TrialState.FAIL)
    complete = study.ask()
    study.tell(complete, [0.9, 1.0])
    study.ask()  # still running: not finished
    # complete + the boom + the one still running at the stop; not the orphan or the queued one.
    assert finished_count(study) == 4
