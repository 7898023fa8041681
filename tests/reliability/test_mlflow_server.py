"""A search against a real ``mlflow server``: runs, front tags, artifacts, registry, and an outage.

The server runs on localhost with a SQLite backend and a local artifact root (proxied artifact
access, as on a team server). Midway through the search it is stopped, and started again a few
trials later on the same store: nothing recorded may be lost or doubled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient

from orchestrator import MOST_ACCURATE, fastest_alias, fetch, front, prepare, run_search
from orchestrator.cli import main
from workers import build_task

from ..e2e.helpers import quick_config, runs_of
from .helpers import account


class Server:
    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the server writes to it after we return
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root}/server.db",
                "--artifacts-destination",
                str(self.root / "artifacts"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            # MLflow 3's server also starts job workers (huey, ~10 processes) that these tests never
            # use; on 2 cores they would steal CPU from the trials.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(
            f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}"
        )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        # The server forks workers; wait until the port is really closed.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                time.sleep(0.5)
            except OSError:
                return


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path, _free_port())
    s.start()
    yield s
    s.stop()


def test_a_search_against_a_real_server_survives_an_outage_and_registers_its_front(
    tmp_path, server, ray_cluster, capsys, ledger
):
    config = quick_config(
        tmp_path,
        name="served",
        search__trials=6,
        search__concurrency=1,
        tracking__uri=server.uri,
        tracking__register=True,
        tracking__model_name="served-digits",
        tracking__alias_drop=0.05,
    )
    finished: list[str] = []
    down_at, up_at = 2, 4  # trials finished when the server goes away, and when it returns

    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        if line.startswith("["):  # "[3/6] trial 2 complete: ...", one per finished trial
            finished.append(line)
            if len(finished) == down_at:
                server.stop()
                ledger.fault("MLflow server stopped")
            elif len(finished) == up_at:
                server.start()

    outcome = run_search(prepare(config), progress=progress)
    assert len(finished) == 6 and outcome.unlogged == 0
    ledger.lost(outcome.unlogged)
    account(config, ledger)  # nothing lost once it returned: one run per trial, the study's values
    assert not [line for line in lines if "warning" in line], lines

    # Every trial exactly once, however the outage cut across it.
    parents, children = runs_of(config)
    assert len(parents) == 1
    numbers = sorted(int(c.data.tags["prunesearch.trial"]) for c in children)
    assert numbers == list(range(6)), numbers
    for c in children:
        assert c.info.status in ("FINISHED", "FAILED")
        assert c.data.params["criterion"] and "mean_ratio" in c.data.params
        assert c.data.params["blocks_dropped"].isdigit()  # residual blocks the plan dropped

    # The pareto tags equal the front recomputed from the study.
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    on_front = {t.number for t in front(study, outcome.base)}
    tagged = {
        int(c.data.tags["prunesearch.trial"]) for c in children if c.data.tags["pareto"] == "true"
    }
    assert tagged == on_front and on_front

    # The front's artifacts and plot on the parent run.
    client = MlflowClient(tracking_uri=server.uri)
    parent = parents[0].info.run_id
    names = {a.path for a in client.list_artifacts(parent)}
    assert {"front.json", "front.csv", "pareto.png", "config.yaml"} <= names
    table = json.loads(
        Path(client.download_artifacts(parent, "front.json", str(tmp_path))).read_text()
    )
    assert {r["trial"] for r in table} == on_front
    assert (
        Path(client.download_artifacts(parent, "pareto.png", str(tmp_path))).read_bytes()[:4]
        == b"\x89PNG"
    )
    assert client.get_run(parent).data.metrics["front_size"] == len(on_front)

    # Registry: one version per front model; aliases point where they should; models reproduce.
    versions = client.search_model_versions("name = 'served-digits'")
    assert sorted(int(v.tags["trial"]) for v in versions) == sorted(on_front)
    assert {v.tags["search_run"] for v in versions} == {parent} and {
        v.tags["target"] for v in versions
    } == {"cpu"}
    best = max(outcome.front, key=lambda r: (r["accuracy"], -r["latency_ms"]))
    assert client.get_model_version_by_alias("served-digits", MOST_ACCURATE).tags["trial"] == str(
        best["trial"]
    )
    within = [r for r in outcome.front if r["accuracy"] >= outcome.base["accuracy"] - 0.05]
    fastest = min(within, key=lambda r: r["latency_ms"])
    alias = fastest_alias(0.05)
    assert alias == "fastest-within-5pct"
    assert client.get_model_version_by_alias("served-digits", alias).tags["trial"] == str(
        fastest["trial"]
    )

    task = build_task("digits")
    loaded = fetch(f"models:/served-digits@{MOST_ACCURATE}", tracking_uri=server.uri)
    x, y = next(
        iter(
            torch.utils.data.DataLoader(
                task.val_loader.dataset, batch_size=len(task.val_loader.dataset)
            )
        )
    )
    with torch.no_grad():
        acc = (loaded.model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(best["accuracy"], abs=1e-3)

    # The CLI reads the same front back from MLflow, and loads a model by alias.
    path = tmp_path / "served.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config.to_dict()))
    capsys.readouterr()
    assert main(["pareto", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["trial"] for r in rows} == on_front
    assert main(["fetch", f"models:/served-digits@{alias}", "--tracking-uri", server.uri]) == 0
    out = capsys.readouterr().out
    assert f"trial: {fastest['trial']}" in out and "-> output (2, 10)" in out
    ledger.check(21)  # the assertions above, besides account's
