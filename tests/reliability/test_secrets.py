"""Credentials stay where they belong: in the orchestrator's environment, nowhere it writes.

A real search (`prunesearch run`, as a user runs it: its own local Ray cluster) with MLflow and
PostgreSQL credentials planted in the environment; then everything the search wrote is searched
for them: MLflow params, tags, metric names and artifacts (downloaded), the Optuna study's and
trials' attributes, every file it wrote (stores, artifacts, Ray's session directory and logs),
its output, and the environment of the trial workers. `prunesearch submit` is checked the same
way: nothing secret in the job's entrypoint, runtime environment, metadata or uploaded files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from orchestrator import _submit

from ..e2e.helpers import quick_config, runs_of

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "s3cr3t-planted-mlflow-password",
    "MLFLOW_TRACKING_TOKEN": "s3cr3t-planted-mlflow-token",
    "PGPASSWORD": "s3cr3t-planted-postgres-password",
}
NEEDLE = "s3cr3t-planted"


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:  # sockets, files a process removed meanwhile
                continue
    return hits


def test_a_search_writes_no_credential_anywhere(tmp_path, monkeypatch, ledger):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    probe = tmp_path / "worker-env.txt"
    config = quick_config(
        tmp_path,
        name="secret",
        search__trials=2,
        search__concurrency=1,
        task="tests.reliability.faulty_task:build",
        task_options={"counter": str(tmp_path / "events.txt"), "env_probe": str(probe)},
    )
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config.to_dict()))
    ray_tmp = Path(
        tempfile.mkdtemp(prefix="ray", dir="/tmp")
    )  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        SECRETS,
        MLFLOW_TRACKING_USERNAME="search-bot",
        RAY_TMPDIR=str(ray_tmp),
        PYTHONPATH=str(ROOT),
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "run", "search.yaml"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        ledger.planted(len(SECRETS))

        # Its output, and every file it wrote: the Optuna and MLflow stores, the artifacts, Ray's
        # session directory (logs, runtime environments, the GCS's job table).
        assert NEEDLE not in proc.stdout + proc.stderr
        assert not _files_holding(tmp_path, NEEDLE.encode()), "a written file holds a credential"
        assert (tmp_path / "mlruns").is_dir() and list(ray_tmp.rglob("*.log")), "nothing to search"
        assert not _files_holding(ray_tmp, NEEDLE.encode()), "Ray's files hold a credential"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # The trial workers never had the credentials (only the orchestrator talks to MLflow and storage).
    seen = probe.read_text().splitlines()
    assert len(seen) >= 3 and all(line.split()[1] == "-" for line in seen), seen  # base + 2 trials

    # What MLflow holds, through its API: params, tags, metric names, and every artifact.
    client = MlflowClient(tracking_uri=config.tracking.resolved_uri())
    parents, children = runs_of(config)
    assert len(parents) == 1 and len(children) == 2
    for run in (*parents, *children):
        data = run.data
        text = json.dumps([data.params, data.tags, sorted(data.metrics), run.info.run_name])
        assert NEEDLE not in text, run.info.run_id
        download = tmp_path / "downloaded" / run.info.run_id
        client.download_artifacts(run.info.run_id, "", str(download))
        assert not _files_holding(download, NEEDLE.encode())

    # What Optuna holds: the study's and every trial's attributes and parameters.
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    system = study._storage.get_study_system_attrs(study._study_id)  # no public getter in Optuna 5
    text = json.dumps(
        [
            study.user_attrs,
            system,
            [(t.params, t.user_attrs, t.system_attrs) for t in study.trials],
        ],
        default=str,
    )
    assert NEEDLE not in text and len(study.trials) == 2
    ledger.check(10 + 3 * (len(parents) + len(children)))


def test_submit_sends_no_credential_to_the_cluster(tmp_path, monkeypatch, ledger):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    # A project directory as users have them: credentials in a .env file, a .pgpass, a key.
    (tmp_path / ".env").write_text(f"PGPASSWORD={SECRETS['PGPASSWORD']}\n")
    (tmp_path / ".pgpass").write_text(f"db:5432:optuna:bot:{SECRETS['PGPASSWORD']}\n")
    (tmp_path / "deploy.key").write_text(f"{NEEDLE}-private-key\n")
    (tmp_path / "my_task.py").write_text("def build(options):\n    raise NotImplementedError\n")
    config = quick_config(
        tmp_path,
        name="submitted",
        storage="postgresql://bot@db:5432/optuna",
        tracking__uri="http://mlflow.example.com:5000",
    )
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config.to_dict()))

    sent: dict = {}

    class Client:  # records what `submit` hands to the Jobs API
        def get_job_info(self, sid):
            raise RuntimeError(f"job {sid} does not exist")

        def submit_job(self, **kwargs):
            sent.update(kwargs)

    monkeypatch.setattr(_submit, "_client", lambda address: Client())
    _submit.submit(
        config,
        Path("search.yaml"),
        ["search.trials=3"],
        "http://head:8265",
        wait=False,
        allow_local=False,
        out=lambda line: None,
    )
    assert sent["entrypoint"].startswith("python -m orchestrator.cli run search.yaml")
    assert NEEDLE not in json.dumps(sent, default=str)
    assert "env_vars" not in sent["runtime_env"]  # the cluster has its own credentials

    # What travels: the working directory, packed by Ray with our excludes.
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path.parent / "package.zip"
    create_package(
        sent["runtime_env"]["working_dir"],
        package,
        include_gitignore=True,
        excludes=sent["runtime_env"]["excludes"],
    )
    with zipfile.ZipFile(package) as z:
        names = set(z.namelist())
        assert {"search.yaml", "my_task.py"} <= names, names
        assert not {".env", ".pgpass", "deploy.key"} & names, names
        assert not any(NEEDLE.encode() in z.read(n) for n in names)
    ledger.planted(len(SECRETS) + 3)
    ledger.check(7)


@pytest.mark.parametrize("url", ["postgresql://bot:s3cr3t-planted@db:5432/optuna"])
def test_a_storage_password_is_masked_wherever_the_url_is_shown(url, tmp_path, ledger):
    from orchestrator._cluster import check_storage
    from orchestrator._config import ConfigError

    with pytest.raises(ConfigError) as err:
        check_storage(url.replace("@db:", "@127.0.0.1:").replace(":5432", ":1"))
    assert NEEDLE not in str(err.value) and "bot:***@" in str(err.value)
    with pytest.raises(ConfigError, match="holds a password") as err:
        _submit.check_for_cluster(quick_config(tmp_path, storage=url), allow_local=True)
    assert NEEDLE not in str(err.value)
    ledger.check(4)
