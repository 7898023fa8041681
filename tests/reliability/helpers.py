"""Shared by the reliability suite: faulty searches, and the account every fault test settles."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
from optuna.trial import TrialState

from orchestrator import NOT_STARTED, finished_count
from workers import TrialStatus

from ..e2e.helpers import quick_config, runs_of

NO_EARLY_RULES = {"reject_infeasible": False, "reject_dominated": False, "stop_hopeless": False}
ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def faulty(tmp_path: Path, name: str, trials: int, **options):
    """A config for the faulty digits task (tests/reliability/faulty_task.py) and its event file."""
    counter = tmp_path / "events.txt"
    config = quick_config(
        tmp_path,
        name=name,
        task="tests.reliability.faulty_task:build",
        task_options={"counter": str(counter), **options},
        search__trials=trials,
        search__early_stop=NO_EARLY_RULES,
    )
    return config, counter


def replace_search(config, **search):
    return dataclasses.replace(config, search=dataclasses.replace(config.search, **search))


def states(config) -> list[tuple[int, str, str | None]]:
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    return [(t.number, t.state.name, t.user_attrs.get("reason")) for t in study.trials]


def kills(counter: Path) -> list[str]:
    """The KILL lines the faulty task wrote just before a worker process died."""
    return (
        [ln for ln in counter.read_text().splitlines() if ln.startswith("KILL")]
        if counter.exists()
        else []
    )


def account(config, ledger, *, budget: bool = True) -> optuna.Study:
    """Settle what a search left behind, counting each check in the ledger:

    every trial ended COMPLETE, PRUNED or FAIL (a FAIL with its reason); MLflow holds exactly one
    finished child run per trial, in the study's state and with the study's accuracy (a trial
    the study has and MLflow lacks is a lost result); and, with ``budget``, the finished trials
    counted toward the budget equal ``search.trials``.
    """
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    trials = study.trials
    unended = [(t.number, t.state.name) for t in trials if t.state not in ENDED]
    assert not unended, f"trials left unended: {unended}"
    silent = [
        t.number for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("reason")
    ]
    assert not silent, f"failed trials without a reason: {silent}"

    _, children = runs_of(config)
    numbers = [int(c.data.tags["prunesearch.trial"]) for c in children]
    twice = sorted({n for n in numbers if numbers.count(n) > 1})
    assert not twice, f"trials logged twice in MLflow: {twice}"
    # A trial asked but never started when the search stopped holds no result: it may have no run.
    ran = {
        t.number for t in trials if f": {NOT_STARTED}: " not in str(t.user_attrs.get("reason", ""))
    }
    lost = sorted(ran - set(numbers))
    ledger.lost(len(lost))
    assert not lost, f"finished trials with no MLflow run (results lost): {lost}"
    assert set(numbers) <= {t.number for t in trials}, "MLflow has runs for trials the study lacks"

    by_number = {t.number: t for t in trials}
    for c in children:
        t = by_number[int(c.data.tags["prunesearch.trial"])]
        assert c.info.status in ("FINISHED", "FAILED"), (t.number, c.info.status)
        # the outcome in the progress line's words (stopped, not Optuna's PRUNED)
        word = TrialStatus.FAILED if t.state == TrialState.FAIL else t.user_attrs.get("status")
        assert c.data.tags.get("state") == word, (t.number, c.data.tags.get("state"), word)
        if t.state == TrialState.COMPLETE:
            assert abs(c.data.metrics["accuracy"] - t.values[0]) < 1e-9, t.number
    if budget:
        assert finished_count(study) == config.search.trials, (
            finished_count(study),
            config.search.trials,
        )
    ledger.check(7 + len(children))
    return study
