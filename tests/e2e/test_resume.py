"""Kill or stop the driver mid-search, run it again: it resumes, and nothing is duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from .helpers import quick_config, runs_of

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, name: str, trials: int) -> tuple[Path, object]:
    config = quick_config(tmp_path, name=name, search__trials=trials)
    raw = config.to_dict()
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, config


def start(path: Path, tmp_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(path)], cwd=ROOT, env=env,
                            stdout=open(tmp_path / "out.log", "ab"), stderr=subprocess.STDOUT)


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


def test_resume_after_sigkill_of_the_driver(tmp_path):
    path, config = write_config(tmp_path, "resume-kill", trials=5)
    proc = start(path, tmp_path)
    wait_for_complete(config, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    again = start(path, tmp_path)
    assert again.wait(timeout=400) == 0, (tmp_path / "out.log").read_text()[-3000:]
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    orphaned = [t for t in study.trials if str(t.user_attrs.get("reason", "")).startswith("orphaned")]
    counted = [t for t in study.trials if t not in orphaned]
    assert len(counted) == 5 and all(t.state != TrialState.RUNNING for t in study.trials)
    assert all(t.state == TrialState.FAIL for t in orphaned)
    parents, children = runs_of(config)
    numbers = [int(c.data.tags["prunesearch.trial"]) for c in children]
    assert sorted(numbers) == [t.number for t in study.trials]  # one child per trial, none twice
    assert len(parents) == 1 and parents[0].data.tags["prunesearch.state"] == "finished"
    tagged = {int(c.data.tags["prunesearch.trial"]) for c in children if c.data.tags["pareto"] == "true"}
    assert tagged == {t.number for t in study.best_trials}


def test_sigterm_stops_cleanly_and_the_next_run_resumes_the_same_parent(tmp_path):
    path, config = write_config(tmp_path, "resume-term", trials=5)
    proc = start(path, tmp_path)
    wait_for_complete(config, 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    assert not study.get_trials(states=(TrialState.RUNNING,))  # running trials finished or failed
    parents, _ = runs_of(config)
    assert [p.data.tags["prunesearch.state"] for p in parents] == ["interrupted"]

    again = start(path, tmp_path)
    assert again.wait(timeout=400) == 0, (tmp_path / "out.log").read_text()[-3000:]
    parents, children = runs_of(config)
    assert len(parents) == 1 and parents[0].data.tags["prunesearch.state"] == "finished"
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    assert sorted(int(c.data.tags["prunesearch.trial"]) for c in children) == [t.number for t in study.trials]
