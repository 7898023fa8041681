"""Is there anything left to run? Answered from the study and MLflow, before Ray or the task start."""

from __future__ import annotations

from pathlib import Path

import optuna
from mlflow import MlflowClient

from ._config import Config
from ._picks import RUN_TAG
from ._study import finished_count


def already_finished(config: Config) -> str | None:
    """The line to print when the study has used its whole trial budget and MLflow holds all of
    it (the parent run finished, every front model registered), else None.

    Raising ``search.trials`` is what continues such a search, in the same study and the same
    MLflow parent run. A study that is done while MLflow is not (the server was away at the end)
    runs again: that run writes what is missing and starts no trial."""
    if not _store_exists(config.storage):
        return None  # a new search: asking would create the store before the checks that refuse
    if config.name not in optuna.get_all_study_names(storage=config.storage):
        return None
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    done, budget = finished_count(study), config.search.trials
    if done < budget or not _mlflow_complete(config):
        return None
    return f"already finished: {done}/{budget} trials; raise search.trials to continue"


def _store_exists(storage: str) -> bool:
    """Whether a SQLite study file is there (opening one that is not creates it)."""
    if storage.startswith("sqlite:///"):
        return Path(storage.removeprefix("sqlite:///")).is_file()
    return True


def _mlflow_complete(config: Config) -> bool:
    uri = config.tracking.resolved_uri()
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = client.get_experiment_by_name(config.experiment)
        if exp is None:
            return False
        mine = f"tags.`prunesearch.study` = '{config.name}'"
        parents = client.search_runs(
            [exp.experiment_id], f"tags.`prunesearch.kind` = 'search' and {mine}"
        )
        if not parents or any(p.data.tags.get("prunesearch.state") != "finished" for p in parents):
            return False
        if not config.tracking.register:
            return True
        where = f"tags.`prunesearch.kind` = 'trial' and {mine} and tags.pareto = 'true'"
        front = client.search_runs([exp.experiment_id], where, max_results=1000)
        name = config.tracking.model_name or config.name
        versions = client.search_model_versions(f"name = '{name}'") if front else []
        registered = {v.tags.get(RUN_TAG) for v in versions}
        return all(r.info.run_id in registered or "recovered" in r.data.tags for r in front)
    except Exception:  # MLflow away or refusing: let the run find out and say so
        return False
