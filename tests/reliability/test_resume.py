"""Kill or stop the driver mid-search, run it again: it resumes, and nothing is duplicated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from orchestrator import faster_than_base, front, front_from_mlflow

from ..e2e.helpers import quick_config, runs_of
from .helpers import account

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, name: str, trials: int) -> tuple[Path, object]:
    config = quick_config(tmp_path, name=name, search__trials=trials)
    raw = config.to_dict()
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, config


def start(path: Path, tmp_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", str(path)],
        cwd=ROOT,
        env=env,
        stdout=open(tmp_path / "out.log", "ab"),
        stderr=subprocess.STDOUT,
    )


def wait_for_complete(config, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the driver ended before it could be interrupted"
        try:
            study = optuna.load_study(study_name=config.name, storage=config.storage)
            if len(study.get_trials(states=(TrialState.COMPLETE,))) >= n:
                return
        except KeyError:
            pass  # the study is not created yet
        time.sleep(0.5)
    raise TimeoutError(f"fewer than {n} trials completed in {timeout} s")


def base_of(parent) -> dict[str, float]:
    """The base model's figures, as the parent run recorded them when the search began."""
    keys = ("accuracy", "latency_ms", "calibration_noise")
    return {k: parent.data.metrics[f"base_{k}"] for k in keys if f"base_{k}" in parent.data.metrics}


def nondominated(trials, base: dict[str, float]) -> set[int]:
    """The feasible front computed from scratch over the study's trials: what an uninterrupted
    search over the same trials records (no constraints here, so every COMPLETE trial is feasible),
    without the trials the base model dominates."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return {
        t.number
        for t in done
        if not any(
            o.values[0] >= t.values[0]
            and o.values[1] <= t.values[1]
            and tuple(o.values) != tuple(t.values)
            for o in done
        )
        # Faster than the base beyond its noise floor, as the product's front counts it.
        and (t.values[1] < faster_than_base(base) or t.values[0] > base["accuracy"])
    }


def test_resume_after_sigkill_of_the_driver(tmp_path, ledger):
    path, config = write_config(tmp_path, "resume-kill", trials=4)
    proc = start(path, tmp_path)
    wait_for_complete(config, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ledger.fault("driver SIGKILL")

    again = start(path, tmp_path)
    assert again.wait(timeout=400) == 0, (tmp_path / "out.log").read_text()[-3000:]
    study = account(config, ledger)  # every trial ended, one MLflow run each, budget met
    orphaned = [
        t for t in study.trials if str(t.user_attrs.get("reason", "")).startswith("orphaned")
    ]
    counted = [t for t in study.trials if t not in orphaned]
    assert len(counted) == 4 and all(t.state != TrialState.RUNNING for t in study.trials)
    assert all(t.state == TrialState.FAIL for t in orphaned)
    parents, children = runs_of(config)
    numbers = [int(c.data.tags["prunesearch.trial"]) for c in children]
    assert sorted(numbers) == [t.number for t in study.trials]  # one child per trial, none twice
    assert len(parents) == 1 and parents[0].data.tags["prunesearch.state"] == "finished"

    # The front after the resume is the one an uninterrupted run records for the same trials:
    # recomputed from scratch, as the study reports it, as the pareto tags and the parent's
    # front.json say, and as `prunesearch pareto` reads it back.
    base = base_of(parents[0])
    expected = nondominated(study.trials, base)
    assert expected and {t.number for t in front(study, base)} == expected
    tagged = {
        int(c.data.tags["prunesearch.trial"]) for c in children if c.data.tags["pareto"] == "true"
    }
    assert tagged == expected
    client = MlflowClient(tracking_uri=config.tracking.resolved_uri())
    table = json.loads(
        Path(
            client.download_artifacts(parents[0].info.run_id, "front.json", str(tmp_path))
        ).read_text()
    )
    assert {row["trial"] for row in table} == expected
    assert {row["trial"] for row in front_from_mlflow(config)} == expected
    ledger.check(9)


def test_sigterm_stops_cleanly_and_the_next_run_resumes_the_same_parent(tmp_path, ledger):
    path, config = write_config(tmp_path, "resume-term", trials=4)
    proc = start(path, tmp_path)
    wait_for_complete(config, 1, proc)
    proc.send_signal(signal.SIGTERM)
    ledger.fault("driver SIGTERM")
    assert proc.wait(timeout=120) == 130
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    assert not study.get_trials(states=(TrialState.RUNNING,))  # running trials finished or failed
    parents, _ = runs_of(config)
    assert [p.data.tags["prunesearch.state"] for p in parents] == ["interrupted"]

    again = start(path, tmp_path)
    assert again.wait(timeout=400) == 0, (tmp_path / "out.log").read_text()[-3000:]
    parents, children = runs_of(config)
    assert len(parents) == 1 and parents[0].data.tags["prunesearch.state"] == "finished"
    study = account(config, ledger)
    assert sorted(int(c.data.tags["prunesearch.trial"]) for c in children) == [
        t.number for t in study.trials
    ]
    assert {
        int(c.data.tags["prunesearch.trial"]) for c in children if c.data.tags["pareto"] == "true"
    } == nondominated(study.trials, base_of(parents[0]))
    ledger.check(4)
