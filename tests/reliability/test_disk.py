"""A disk that is full, or an artifact directory that cannot be written.

Before any trial: `prunesearch run` writes a probe file where the search's MLflow artifacts go
and refuses, in one line naming the path and the fix, a location it cannot write. Mid-search:
the disk fills (every artifact write fails with ENOSPC, injected where MLflow writes a file);
the search stops with one clear line, the study stays consistent (no trial left RUNNING, the
counts add up), and once space is back the same command resumes and loses nothing.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from optuna.trial import TrialState

from orchestrator import finished_count
from orchestrator.cli import main

from ..e2e.helpers import quick_config, runs_of
from .helpers import account

AFTER_FULL: dict = {}  # what the mid-search test left, for the test that follows it


def _write(config, tmp_path: Path) -> str:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return str(path)


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text(
        "a regular file: nothing can be created under it, not even by root"
    )
    return tmp_path / "file" / "artifacts"


def _read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip(
            "running as root: permission bits do not stop root's writes (the under-a-file case covers it)"
        )
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o500)
    return path / "artifacts"


@pytest.mark.parametrize(
    "where", [_under_a_file, _read_only_dir], ids=["under-a-file", "read-only-dir"]
)
def test_an_unwritable_artifact_location_is_refused_before_any_trial(
    tmp_path, capsys, where, ledger
):
    config = quick_config(tmp_path, name="no-room")
    location = where(tmp_path)
    MlflowClient(config.tracking.resolved_uri()).create_experiment(
        config.experiment, artifact_location=str(location)
    )
    capsys.readouterr()
    assert main(["run", _write(config, tmp_path)]) == 2
    out, err = capsys.readouterr()
    ledger.bad_input()
    # Progress (the cached base model, ...) and warnings may precede it on stderr: the refusal
    # is the one and last error line.
    said = [ln for ln in err.splitlines() if ln.strip()]
    lines = [ln for ln in said if ln.startswith("prunesearch: error:")]
    assert len(lines) == 1 and said[-1] == lines[0] and "Traceback" not in out + err, err
    assert lines[0].startswith(
        f"prunesearch: error: tracking: experiment 'no-room' stores artifacts in '{location}'"
    )
    assert "free space or fix its permissions" in lines[0]
    assert not Path(config.storage.removeprefix("sqlite:///")).exists()  # nothing started: no study
    ledger.check(5)


def test_a_disk_that_fills_mid_search_stops_it_cleanly_and_a_rerun_loses_nothing(
    tmp_path, ray_cluster, monkeypatch, capsys, ledger
):
    config = quick_config(tmp_path, name="disk-full", search__trials=5, search__concurrency=2)
    path = _write(config, tmp_path)
    real = LocalArtifactRepository.log_artifact
    written, full = [], {"on": False, "refused": 0}

    def log_artifact(self, local_file, artifact_path=None):
        # The disk fills as the second trial's run is written (its plan.json, after the first
        # trial's weights): from then on every write fails, as on a real full disk (errno ENOSPC,
        # naming the file it could not write).
        name = os.path.basename(local_file)
        if name == "plan.json" and "model.safetensors" in written:
            full["on"] = True
        if full["on"]:
            full["refused"] += 1
            dest = os.path.join(self.artifact_dir, artifact_path or "", name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dest)
        real(self, local_file, artifact_path)
        written.append(name)

    monkeypatch.setattr(LocalArtifactRepository, "log_artifact", log_artifact)
    capsys.readouterr()
    code = main(["run", path])
    out, err = capsys.readouterr()
    assert code == 2, (code, out[-3000:], err[-3000:])
    ledger.fault("disk full")
    # Progress (the cached base model, ...) and the failed write as it happened may precede it
    # on stderr: the refusal is the last line, and there is no traceback.
    said = [ln for ln in err.splitlines() if ln.strip()]
    lines = said[-1:]
    assert "Traceback" not in out + err, err
    assert lines[0].startswith("prunesearch: error: tracking: cannot write '"), lines[0]
    assert (
        "No space left on device" in lines[0] and "run the same command again to resume" in lines[0]
    )
    assert full["refused"] >= 1

    # The study is consistent: nothing RUNNING, every told trial has its values, and the counts
    # add up (finished and counted + failed by the stop, not counted = all trials).
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    stopped = [
        t for t in study.trials if str(t.user_attrs.get("reason", "")).startswith("orphaned")
    ]
    assert finished_count(study) + len(stopped) == len(study.trials)
    assert all(t.values for t in study.trials if t.state == TrialState.COMPLETE)
    # It really stopped mid-way (MLflow is written by a background thread: the failure surfaces
    # at the loop's next write, a trial or so later).
    assert finished_count(study) < config.search.trials, [
        (t.number, t.state.name) for t in study.trials
    ]
    ledger.check(8)

    # Space is back: the same command resumes, and nothing is lost or logged twice.
    monkeypatch.setattr(LocalArtifactRepository, "log_artifact", real)
    assert main(["run", path]) == 0, capsys.readouterr().err
    capsys.readouterr()
    _, children = runs_of(config)
    numbers = sorted(int(c.data.tags["prunesearch.trial"]) for c in children)
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    assert numbers == [t.number for t in study.trials]  # one run per trial, none twice, none lost
    assert finished_count(study) == config.search.trials
    ledger.lost(len({t.number for t in study.trials} - set(numbers)))
    ledger.check(2)
    AFTER_FULL["config"] = config


def test_after_a_full_disk_the_cut_trial_run_is_completed_on_resume(ledger):
    if "config" not in AFTER_FULL:
        pytest.skip("needs the mid-search disk-full test above")
    config = AFTER_FULL["config"]
    client = MlflowClient(config.tracking.resolved_uri())
    _, children = runs_of(config)
    cut = [
        int(c.data.tags["prunesearch.trial"])
        for c in children
        if c.info.status == "RUNNING"
        or "plan.json" not in {a.path for a in client.list_artifacts(c.info.run_id)}
    ]
    assert not cut, f"trials whose MLflow run was left unfinished by the failed write: {cut}"
    account(config, ledger)
