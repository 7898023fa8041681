"""``prunesearch ui``: the MLflow UI at a search's runs view, filtered to the front.

A tracking server (http/https) is only pointed to; a local store (SQLite, a directory) is
served with ``mlflow ui`` on this machine until Ctrl-C.
"""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import quote

from mlflow import MlflowClient

from ._config import Config
from ._report import REPORT, ui_url

FRONT_FILTER = "tags.pareto = 'true'"


def runs_view(config: Config, base_url: str | None = None) -> str:
    """The experiment's runs view, showing the front's child runs fastest first."""
    uri = config.tracking.resolved_uri()
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(config.experiment)
    if exp is None:
        raise ValueError(
            f"no MLflow experiment {config.experiment!r} in {uri}: has search {config.name!r} run?"
        )
    query = (
        f"searchFilter={quote(FRONT_FILTER)}"
        f"&orderByKey={quote('metrics.`latency_ms`')}&orderByAsc=true"
    )
    return f"{(base_url or ui_url(uri)).rstrip('/')}/#/experiments/{exp.experiment_id}/runs?{query}"


def serve(config: Config, host: str, port: int, print_only: bool = False) -> int:
    """Print where to look; serve a local store with ``mlflow ui`` unless it is a server."""
    uri = config.tracking.resolved_uri()
    remote = uri.startswith(("http://", "https://"))
    url = runs_view(config, None if remote else f"http://{host}:{port}")
    print(f"the front of {config.name}: {url}")
    print(f"its interactive report: the parent run's artifact {REPORT}")
    if remote or print_only:
        return 0
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", host, "--port", str(port), "--workers", "1"]
    # One viewer: one worker, and none of the GenAI job consumers (a dozen processes) it would start.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | dict(os.environ)
    print(f"serving {uri} there (Ctrl-C stops it)", flush=True)
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0
