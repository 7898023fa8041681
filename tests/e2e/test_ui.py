"""`prunesearch ui`: the link it prints opens MLflow's runs page on the experiment's "Pareto front"
saved view, the front's child runs fastest first with their metric columns, as a person sees it
(a real `mlflow ui` server, headless Chromium). The store is written here with MlflowClient, in
the tags and metrics a search logs, so no search or Ray cluster is needed; the view on a real
search's runs is checked in test_search.py."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from orchestrator.cli import main

from .helpers import chromium_dom, quick_config, runs_table, stop_group, wait_for

FRONT = {  # trial: (accuracy, latency_ms, on the front)
    0: (0.9722, 1.20, True),
    1: (0.9556, 0.80, True),
    2: (0.9111, 0.50, True),
    3: (0.8833, 0.90, False),  # dominated by trial 1
}
BASE_MS = 1.5


def _store(tmp_path: Path):
    """A search's experiment as MLflow holds it: a parent run, children tagged like a search's."""
    config = quick_config(tmp_path, name="ui-front")
    client = MlflowClient(tracking_uri=config.tracking.resolved_uri())
    kind = {"mlflow.experimentKind": "custom_model_development"}  # as a search marks it
    exp = client.create_experiment(config.experiment, tags=kind)
    parent = client.create_run(exp, run_name="search", tags={"prunesearch.kind": "search"})
    runs = {}
    for trial, (acc, ms, front) in FRONT.items():
        run = client.create_run(
            exp,
            run_name=f"t{trial:03d} r=0.{trial}0 l1",
            tags={
                "mlflow.parentRunId": parent.info.run_id,
                "prunesearch.kind": "trial",
                "prunesearch.study": config.name,
                "prunesearch.trial": str(trial),
                "pareto": "true" if front else "false",
            },
        )
        metrics = {"accuracy": acc, "latency_ms": ms, "speedup": BASE_MS / ms}
        metrics |= {"macs": 10_000.0 * (trial + 1), "params": 1_000.0 * (trial + 1)}
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
        runs[run.info.run_id] = (trial, metrics, front)
    client.set_terminated(parent.info.run_id)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path, client, exp, runs


def _printed_link(path: Path, capsys) -> str:
    assert main(["ui", str(path), "--print", "--port", "5000"]) == 0
    return capsys.readouterr().out.splitlines()[0].split(": ", 1)[1]


def test_the_front_view_is_saved_once_as_mlflow_reads_it(tmp_path, capsys):
    path, client, exp, _ = _store(tmp_path)
    url = _printed_link(path, capsys)
    assert (
        url == f"http://127.0.0.1:5000/#/experiments/{exp}/runs?viewStateShareKey=prunesearch-front"
    )
    # No search facet in the link: MLflow's UI ignores a saved view when the URL has one.
    assert "searchFilter" not in url and "orderByKey" not in url
    tag = client.get_experiment(exp).tags["mlflow.sharedViewState.prunesearch-front"]
    envelope = json.loads(tag)
    assert envelope["name"] == "Pareto front"
    columns = [f"metrics.`{m}`" for m in ("accuracy", "latency_ms", "speedup", "macs", "params")]
    assert json.loads(envelope["state"]) == {
        "searchFilter": "tags.pareto = 'true'",
        "orderByKey": "metrics.`latency_ms`",
        "orderByAsc": True,
        "selectedColumns": columns,
        "columnOrder": columns,
    }
    time.sleep(0.01)
    assert _printed_link(path, capsys) == url  # again: the same link, the tag left as it was
    assert client.get_experiment(exp).tags["mlflow.sharedViewState.prunesearch-front"] == tag


def test_where_the_view_cannot_be_saved_the_link_still_filters_the_front(
    tmp_path, monkeypatch, capsys
):
    path, _, exp, _ = _store(tmp_path)

    def refuse(self, *args, **kwargs):
        raise MlflowException("Permission denied: user may only read experiment")

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", refuse)
    assert main(["ui", str(path), "--print", "--port", "5000"]) == 0
    out, err = capsys.readouterr()
    url = out.splitlines()[0].split(": ", 1)[1]
    assert url.startswith(f"http://127.0.0.1:5000/#/experiments/{exp}/runs?searchFilter=")
    assert "orderByKey=metrics.%60latency_ms%60&orderByAsc=true" in url
    assert "could not save the front's view" in err and "Permission denied" in err


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)"
)
def test_the_printed_link_shows_the_fronts_metric_columns_in_a_browser(tmp_path):
    path, _, _, runs = _store(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(Path(sys.executable).parent / "prunesearch"), "ui", str(path)]
    server = subprocess.Popen(
        [*command, "--port", str(port)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        url = server.stdout.readline().split(": ", 1)[1].strip()
        assert url.endswith("?viewStateShareKey=prunesearch-front")
        wait_for(f"http://127.0.0.1:{port}/health")
        headers, cells = runs_table(chromium_dom(url))
        for metric in ("accuracy", "latency_ms", "speedup"):
            assert headers.get(f"metrics.`{metric}`") == metric, headers
        # In the view's order (MLflow would otherwise sort them by name: speedup after params).
        drawn = [c for c in headers if c.startswith("metrics.`")]
        assert drawn[:3] == ["metrics.`accuracy`", "metrics.`latency_ms`", "metrics.`speedup`"]
        shown = {run_id: row for run_id, row in cells.items() if run_id in runs}
        assert {runs[r][0] for r in shown} == {t for t, (*_, front) in FRONT.items() if front}
        for run_id, row in shown.items():
            _, metrics, _ = runs[run_id]
            for metric in ("accuracy", "latency_ms", "speedup"):
                assert float(row[f"metrics.`{metric}`"]) == pytest.approx(metrics[metric], rel=1e-3)
        # Fastest first: the view's sort.
        order = sorted(shown, key=lambda r: float(shown[r]["metrics.`latency_ms`"]))
        assert list(shown) == order
    finally:
        stop_group(server)  # the group this test started: prunesearch, mlflow ui
