"""`prunesearch submit` against a real `ray start --head` cluster on localhost (Ray Jobs API)."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

from orchestrator import check_for_cluster
from orchestrator.cli import main

from .helpers import quick_config, runs_of

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A separate head node (its own ports and temp dir), stopped by ending `ray start --block`,
    so the session's shared cluster is left alone."""
    ports = {
        flag: _free_port()
        for flag in (
            "--port",
            "--dashboard-port",
            "--ray-client-server-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
        )
    }
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = (
        f"{bindir}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this environment's
    )
    env["PYTHONPATH"] = str(ROOT)  # and it runs the code under test
    # `ray start` turns on token auth; clients then need RAY_AUTH_MODE=token in their environment,
    # which this test process (attached to the session's cluster) must not change.
    env["RAY_AUTH_MODE"] = "disabled"
    temp = Path(
        tempfile.mkdtemp(prefix="ray", dir="/tmp")
    )  # short: Ray's socket paths must fit 107 bytes
    log = open(temp / "head.log", "ab")  # noqa: SIM115 - ray writes to it until the fixture ends
    proc = subprocess.Popen(
        [
            str(bindir / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            *(f"{k}={v}" for k, v in ports.items()),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        _wait_for_jobs_api(address, proc, temp / "head.log")
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_jobs_api(address: str, proc: subprocess.Popen, log: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except (ConnectionError, RuntimeError):  # not up yet
            time.sleep(1)
    raise TimeoutError(f"the head's Jobs API did not answer: {log.read_text()[-3000:]}")


def test_cluster_runs_refuse_stores_local_to_the_driver(tmp_path):
    config = quick_config(tmp_path)
    with pytest.raises(
        ValueError, match="storage: 'sqlite:///.*is a file on whichever node runs the driver"
    ):
        check_for_cluster(config, allow_local=False)
    check_for_cluster(config, allow_local=True)
    secret = quick_config(tmp_path, storage="postgresql://bot:s3cret@db:5432/optuna")
    with pytest.raises(ValueError, match="storage: holds a password"):
        check_for_cluster(secret, allow_local=True)


def test_submit_waits_for_a_search_on_the_cluster_and_a_resubmission_joins_it(
    head, tmp_path, monkeypatch, capsys
):
    config = quick_config(tmp_path, name="submitted", search__trials=2)
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config.to_dict()))
    monkeypatch.chdir(tmp_path)  # the working directory is what travels to the cluster

    # Submitted without waiting: back at once, the job still pending or running on the cluster.
    assert main(["submit", "search.yaml", "--address", head, "--allow-local-storage"]) == 0
    sid = f"prunesearch-submitted-{dt.datetime.now(dt.UTC).date():%Y%m%d}"
    assert f"as job {sid}" in capsys.readouterr().out
    # Submitted again while it runs: nothing new is submitted; --wait follows the running job to its end.
    assert (
        main(["submit", "search.yaml", "--address", head, "--wait", "--allow-local-storage"]) == 0
    )
    out = capsys.readouterr().out
    assert re.search(
        rf"job {sid} is already (PENDING|RUNNING) on .*; not submitting it twice; following it", out
    ), out
    assert "Pareto front of submitted" in out and f"job {sid}: SUCCEEDED" in out
    study = optuna.load_study(study_name="submitted", storage=config.storage)
    assert len(study.trials) == 2
    parents, children = runs_of(config)
    assert (
        len(parents) == 1
        and parents[0].data.tags["prunesearch.state"] == "finished"
        and len(children) == 2
    )

    # The same search on the same day: nothing new is submitted, and it says why.
    assert main(["submit", "search.yaml", "--address", head, "--allow-local-storage"]) == 0
    assert "already ran today (SUCCEEDED); nothing submitted" in capsys.readouterr().out
    from ray.job_submission import JobSubmissionClient

    assert [j.submission_id for j in JobSubmissionClient(head).list_jobs()].count(sid) == 1
    assert len(optuna.load_study(study_name="submitted", storage=config.storage).trials) == 2

    assert main(["status", sid, "--address", head]) == 0
    assert f"{sid}: SUCCEEDED" in capsys.readouterr().out
    assert main(["logs", sid, "--address", head]) == 0
    assert "Pareto front of submitted" in capsys.readouterr().out
    assert main(["status", "no-such-job", "--address", head]) == 2
    assert "job no-such-job: not found" in capsys.readouterr().err
    assert main(["status", sid, "--address", f"http://127.0.0.1:{_free_port()}"]) == 2
    assert "no Ray dashboard answers at" in capsys.readouterr().err
