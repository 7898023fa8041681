"""Small helpers shared by end-to-end tests: a quick config and MLflow read-backs."""

from __future__ import annotations

import os
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from orchestrator import config_from_dict


def _fresh_mlflow_db(tmp_path: Path) -> str:
    """A migrated, empty MLflow SQLite store: copied from one made per session (a new store
    spends ~3 s in MLflow's schema migrations, and the suite creates dozens)."""
    import mlflow

    template = Path(os.environ["PRUNESEARCH_CACHE"]) / f"mlflow-empty-{mlflow.__version__}.db"
    if not template.exists():
        template.parent.mkdir(parents=True, exist_ok=True)
        scratch, partial = template.with_suffix(".scratch"), template.with_suffix(".partial")
        for path in (scratch, partial):
            path.unlink(missing_ok=True)
        MlflowClient(tracking_uri=f"sqlite:///{scratch}").search_experiments()
        # The store runs in WAL mode (orchestrator/_sqlite.py): its last migrations may still sit in
        # the -wal file, so copy it with SQLite's backup API, which reads through the log.
        with closing(sqlite3.connect(scratch)) as src, closing(sqlite3.connect(partial)) as dst:
            src.backup(dst)
        partial.rename(template)
    target = tmp_path / "mlflow.db"
    if not target.exists():
        shutil.copyfile(template, target)
    return f"sqlite:///{target}"


def quick_config(tmp_path: Path, **patch: Any):
    raw = {
        "name": "e2e",
        "task": "digits",
        # Per-layer sampling, no screen: most end-to-end tests are about the loop around a trial,
        # and a screen costs seconds; tests/orchestrator/test_screen.py runs the default search.
        "search": {
            "trials": 5,
            "concurrency": 2,
            "sampler": "tpe",
            "seed": 1,
            "screen": {"candidates": 0},
            "space": {"granularity": "layer", "criteria": ["l1", "taylor"], "ratio": [0.1, 0.7]},
        },
        "finetune": {"epochs": 1, "lr": 0.01},
        "target": {"batch_size": 1, "rounds": 3, "runs": 10},
        # Registering front models costs seconds per model; the tests that check it turn it on.
        "tracking": {"uri": _fresh_mlflow_db(tmp_path), "register": False},
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
