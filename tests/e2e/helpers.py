"""Small helpers shared by end-to-end tests: a quick config and MLflow read-backs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from orchestrator._config import config_from_dict


def quick_config(tmp_path: Path, **patch: Any):
    raw = {
        "name": "e2e",
        "task": "digits",
        "search": {"trials": 5, "concurrency": 2, "sampler": "tpe", "seed": 1,
                   "space": {"criteria": ["l1", "taylor"], "ratio": [0.1, 0.7]}},
        "finetune": {"epochs": 1, "lr": 0.01},
        "target": {"batch_size": 1, "rounds": 3, "runs": 10},
        # Registering front models costs seconds per model; the tests that check it turn it on.
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "register": False},
        "storage": f"sqlite:///{tmp_path}/optuna.db",
    }
    for key, value in patch.items():
        node = raw
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(raw)


def runs_of(config) -> tuple[list, list]:
    client = MlflowClient(tracking_uri=config.tracking.resolved_uri())
    exp = client.get_experiment_by_name(config.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("prunesearch.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("prunesearch.kind") == "trial"]
    return parents, children
