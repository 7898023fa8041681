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
from pathlib import Path

import optuna
import pytest
import ray.job_submission
import yaml
from mlflow import MlflowClient

from orchestrator import check_for_cluster, config_from_dict
from orchestrator.cli import main

from ..e2e.helpers import quick_config, runs_of

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "s3cr3t-planted-mlflow-password",
    "MLFLOW_TRACKING_TOKEN": "s3cr3t-planted-mlflow-token",
    "PGPASSWORD": "s3cr3t-planted-postgres-password",
    # Cloud and hub credentials: only the four above were kept from Ray workers (issue 18, point 6)
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-planted-aws-key",
    "AWS_SESSION_TOKEN": "s3cr3t-planted-aws-session",
    "DATABRICKS_TOKEN": "s3cr3t-planted-databricks",
    "AZURE_CLIENT_SECRET": "s3cr3t-planted-azure",
    "HF_TOKEN": "s3cr3t-planted-hf",
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


def _credential_project(root: Path, outside: Path) -> None:
    """A project directory as users have them: credentials beside the code (issue 18, point 4)."""
    files = {
        ".env": f"PGPASSWORD={SECRETS['PGPASSWORD']}\n",
        ".envrc": f"export PGPASSWORD={NEEDLE}\n",
        ".pgpass": f"db:5432:optuna:bot:{SECRETS['PGPASSWORD']}\n",
        "deploy.key": f"{NEEDLE}-private-key\n",
        ".ssh/id_rsa": f"-----BEGIN OPENSSH PRIVATE KEY----- {NEEDLE}\n",
        ".aws/credentials": f"[default]\naws_secret_access_key = {NEEDLE}\n",
        ".git-credentials": f"https://bot:{NEEDLE}@github.com\n",
        "gcp-service-account.json": json.dumps({"private_key": NEEDLE}),
        "pkg/__init__.py": "",
        "pkg/my_task.py": "def build(options):\n    raise NotImplementedError\n",
        "pkg/settings.yaml": "width: 8\n",
        "pkg/credentials.json": json.dumps({"token": NEEDLE}),
        "notes/unrelated.txt": f"{NEEDLE} in a file nobody named\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (outside / "elsewhere.txt").write_text(f"{NEEDLE} outside the project\n")
    (root / "pkg" / "linked.py").symlink_to(outside / "elsewhere.txt")


def test_submit_uploads_an_allow_list_and_no_credential(tmp_path, monkeypatch, ledger):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    project, outside = tmp_path / "project", tmp_path / "outside"
    project.mkdir()
    outside.mkdir()
    monkeypatch.chdir(project)
    _credential_project(project, outside)
    config = quick_config(
        project,
        name="submitted",
        task="pkg.my_task:build",
        storage="postgresql://bot@db:5432/optuna",
        tracking__uri="http://mlflow.example.com:5000",
    )
    (project / "search.yaml").write_text(yaml.safe_dump(config.to_dict()))

    sent: dict = {}

    class Client:  # records what `submit` hands to the Jobs API, and the package's files
        def get_job_info(self, sid):
            raise RuntimeError(f"job {sid} does not exist")

        def submit_job(self, **kwargs):
            sent.update(kwargs)
            root = Path(kwargs["runtime_env"]["working_dir"])
            sent["files"] = {
                str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()
            }

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", lambda address: Client())
    argv = ["submit", "search.yaml", "--set", "search.trials=3", "--address", "http://head:8265"]
    assert main([*argv, "--include", "notes"]) == 0
    assert sent["entrypoint"].startswith("python -m orchestrator.cli run search.yaml")
    assert "env_vars" not in sent["runtime_env"]  # the cluster has its own credentials
    assert set(sent["files"]) == {
        "search.yaml",
        "pkg/__init__.py",
        "pkg/my_task.py",
        "pkg/settings.yaml",
        "notes/unrelated.txt",
    }, sorted(sent["files"])
    leaked = [
        n for n, b in sent["files"].items() if NEEDLE.encode() in b and n != "notes/unrelated.txt"
    ]
    assert not leaked, leaked
    text = json.dumps({k: v for k, v in sent.items() if k != "files"}, default=str)
    assert NEEDLE not in text
    ledger.planted(len(SECRETS) + 10)
    ledger.check(5)


def test_submit_dry_run_lists_the_upload_and_contacts_no_cluster(
    tmp_path, monkeypatch, capsys, ledger
):
    project, outside = tmp_path / "project", tmp_path / "outside"
    project.mkdir()
    outside.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _credential_project(project, outside)
    config = quick_config(project, name="dry", task="pkg.my_task:build")
    (project / "search.yaml").write_text(yaml.safe_dump(config.to_dict()))

    def no_cluster(address):
        raise AssertionError("a dry run contacted the cluster")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", no_cluster)
    assert main(["submit", "search.yaml", "--dry-run", "--allow-local-storage"]) == 0
    out = capsys.readouterr().out
    listed = [ln.strip() for ln in out.splitlines()[1:]]
    assert listed == ["pkg/__init__.py", "pkg/my_task.py", "pkg/settings.yaml", "search.yaml"], out
    assert "would upload 4 file(s)" in out and NEEDLE not in out
    for name in (".ssh/id_rsa", ".env", "../outside/elsewhere.txt"):
        argv = ["submit", "search.yaml", "--dry-run", "--allow-local-storage", "--include", name]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("prunesearch: error: --include:") and NEEDLE not in err, err
    ledger.bad_input()
    ledger.check(8)


@pytest.mark.parametrize("url", ["postgresql://bot:s3cr3t-planted@db:5432/optuna"])
def test_a_storage_password_is_masked_wherever_the_url_is_shown(url, tmp_path, ledger):
    from orchestrator import ConfigError, check_storage

    with pytest.raises(ConfigError) as err:
        check_storage(url.replace("@db:", "@127.0.0.1:").replace(":5432", ":1"))
    assert NEEDLE not in str(err.value) and "bot:***@" in str(err.value)
    with pytest.raises(ConfigError, match="holds a password") as err:
        check_for_cluster(quick_config(tmp_path, storage=url), allow_local=True)
    assert NEEDLE not in str(err.value)
    ledger.check(4)


# Each form a secret takes in a config (issue 18, point 3), planted where a user would put it.
PLANTED_FORMS = {
    "task-option-token": {"task_options": {"hf_token": NEEDLE}},
    "task-option-api-key": {"task_options": {"apiKey": NEEDLE}},
    "task-option-nested-password": {"task_options": {"hub": {"db_password": NEEDLE}}},
    "task-option-url": {"task_options": {"data": f"s3://AKIA:{NEEDLE}@bucket/data"}},
    "warm-start-storage-password": {
        "search": {"warm_start": {"storage": f"postgresql://bot:{NEEDLE}@db:5432/optuna"}}
    },
    "storage-password-no-user": {"storage": f"postgresql://:{NEEDLE}@db:5432/optuna"},
    "storage-query-password": {"storage": f"postgresql://bot@db:5432/optuna?password={NEEDLE}"},
    "task-option-uppercase-url": {"task_options": {"endpoint": f"HTTPS://bot:{NEEDLE}@h/x"}},
}


@pytest.mark.parametrize("form", sorted(PLANTED_FORMS))
def test_every_secret_form_is_masked_in_mlflow_params_and_config_artifact(form, tmp_path, ledger):
    from orchestrator import SearchRecorder

    config = quick_config(tmp_path, name=f"masked-{form}")
    plain = config.to_dict()
    for section, value in PLANTED_FORMS[form].items():
        plain[section] = {**plain[section], **value} if isinstance(value, dict) else value
    config = config_from_dict(plain)
    recorder = SearchRecorder(config)
    run_id = recorder.start({"accuracy": 0.9})
    client = MlflowClient(tracking_uri=config.tracking.resolved_uri())
    run = client.get_run(run_id)
    assert NEEDLE not in json.dumps([run.data.params, run.data.tags])
    assert "***" in json.dumps(run.data.params)  # masked, not dropped
    download = tmp_path / "artifacts"
    client.download_artifacts(run_id, "config.yaml", str(download))
    assert NEEDLE not in (download / "config.yaml").read_text()
    ledger.planted(1)
    ledger.check(3)


@pytest.mark.parametrize(
    "uri",
    [
        f"HTTP://bot:{NEEDLE}@127.0.0.1:1",
        f"http://:{NEEDLE}@127.0.0.1:1",
        f"http://127.0.0.1:1/?token={NEEDLE}",
    ],
)
def test_a_tracking_uri_from_the_environment_is_masked_where_printed(
    uri, tmp_path, monkeypatch, capsys, ledger
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "search.yaml").write_text("name: masked\n")
    assert main(["pareto", "search.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunesearch: error: tracking.uri") and NEEDLE not in err, err
    assert "***" in err
    ledger.planted(1)
    ledger.check(3)
