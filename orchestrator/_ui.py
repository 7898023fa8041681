"""``prunesearch ui``: the MLflow UI at a search's runs view, filtered to the front.

A tracking server (http/https) is only pointed to; a local store (SQLite, a directory) is
served with ``mlflow ui`` on this machine until Ctrl-C.

The link opens a *saved view* of the experiment (MLflow 3.15+, "Views" on the runs page): the
front's filter and sort, and the metric columns, which MLflow's UI otherwise keeps per browser
in local storage and starts empty. MLflow's UI stores a saved view as the experiment tag
``mlflow.sharedViewState.<id>`` holding ``{"name", "createdAt", "updatedAt", "state"}``, where
``state`` is the JSON of the runs page's search facets and table state (``searchFilter``,
``orderByKey``, ``orderByAsc``, ``selectedColumns``, ...), and opens it from the URL parameter
``viewStateShareKey=<id>``; MLflow's own demo data seeds its traces views the same way
(``mlflow/demo/generators/saved_views.py``). The URL must carry no search facet of its own: the
UI ignores the view when it does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any
from urllib.parse import quote

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ._config import Config
from ._report import REPORT, ui_url

FRONT_FILTER = "tags.pareto = 'true'"
FRONT_ORDER = "metrics.`latency_ms`"
# The runs table's columns, in this order (MLflow's canonical keys: "metrics.`name`").
FRONT_COLUMNS = ("accuracy", "latency_ms", "speedup", "macs", "params")
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # MLflow's UI: saved views of the runs page
VIEW_ID, VIEW_NAME = "prunesearch-front", "Pareto front"


def front_view_state() -> dict[str, Any]:
    """The runs page's state the saved view restores: the front, fastest first, its metrics."""
    columns = [f"metrics.`{m}`" for m in FRONT_COLUMNS]
    return {
        "searchFilter": FRONT_FILTER,
        "orderByKey": FRONT_ORDER,
        "orderByAsc": True,
        "selectedColumns": columns,
        "columnOrder": columns,  # else MLflow sorts them by name
    }


def save_front_view(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str:
    """Create or update the experiment's "Pareto front" saved view; its tag's key."""
    key = VIEW_TAG_PREFIX + VIEW_ID
    state = json.dumps(front_view_state(), separators=(",", ":"))
    now = int(time.time() * 1000)
    try:
        old = json.loads(tags[key])
        if old.get("name") == VIEW_NAME and old.get("state") == state:
            return key  # already there: nothing to write
        created = int(old["createdAt"])
    except (KeyError, TypeError, ValueError):
        created = now
    envelope = {"name": VIEW_NAME, "createdAt": created, "updatedAt": now, "state": state}
    client.set_experiment_tag(experiment_id, key, json.dumps(envelope, separators=(",", ":")))
    return key


def runs_view(config: Config, base_url: str | None = None) -> str:
    """The experiment's runs view, showing the front's child runs fastest first with their
    metrics: its saved view, or (where it cannot be saved) the filter and sort alone."""
    uri = config.tracking.resolved_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(config.experiment)
    if exp is None:
        raise ValueError(
            f"no MLflow experiment {config.experiment!r} in {uri}: has search {config.name!r} run?"
        )
    page = f"{(base_url or ui_url(uri)).rstrip('/')}/#/experiments/{exp.experiment_id}/runs"
    try:
        save_front_view(client, exp.experiment_id, exp.tags)
    except MlflowException as e:  # e.g. a server that lets this user read only
        reason = next(iter(str(e.message).splitlines()), type(e).__name__)
        print(
            f"could not save the front's view on the experiment ({reason}): "
            "the link filters and sorts the front; pick its metric columns under Columns",
            file=sys.stderr,
        )
        query = (
            f"searchFilter={quote(FRONT_FILTER)}&orderByKey={quote(FRONT_ORDER)}&orderByAsc=true"
        )
        return f"{page}?{query}"
    return f"{page}?viewStateShareKey={VIEW_ID}"


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
