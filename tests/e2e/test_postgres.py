"""Cluster mode storage: the Optuna study and the MLflow backend store on PostgreSQL."""

from __future__ import annotations

import uuid

import optuna
import pytest

from orchestrator import prepare, run_search

from .helpers import quick_config, runs_of

pytestmark = pytest.mark.postgres


def test_search_on_postgres_storage_and_mlflow_backend(
    tmp_path, ray_cluster, postgres, postgres_mlflow
):
    name = f"pg-{uuid.uuid4().hex[:8]}"  # the database is shared across runs: never reuse a study
    config = quick_config(
        tmp_path,
        name=name,
        storage=postgres,
        search__trials=3,
        tracking__uri=postgres_mlflow,
        tracking__experiment=name,
    )
    outcome = run_search(prepare(config), progress=lambda line: None)
    study = optuna.load_study(study_name=name, storage=postgres)
    assert len(study.get_trials()) == 3 == sum(outcome.counts.values())
    _, children = runs_of(config)
    assert sorted(int(c.data.tags["prunesearch.trial"]) for c in children) == [0, 1, 2]


def test_concurrent_writers_on_one_postgres_study(postgres):
    """Several processes telling one study at once: what SQLite cannot do, PostgreSQL must."""
    import multiprocessing as mp

    name = f"pg-writers-{uuid.uuid4().hex[:8]}"
    optuna.create_study(study_name=name, storage=postgres, directions=["maximize", "minimize"])
    ctx = mp.get_context("spawn")
    with ctx.Pool(3) as pool:
        pool.starmap(_write_trials, [(postgres, name, i) for i in range(3)])
    study = optuna.load_study(study_name=name, storage=postgres)
    trials = study.get_trials()
    assert len(trials) == 30
    assert len({t.number for t in trials}) == 30
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def _write_trials(url: str, name: str, worker: int) -> None:
    study = optuna.load_study(study_name=name, storage=url)
    for i in range(10):
        t = study.ask()
        study.tell(t, [worker + i / 10, float(i)])
