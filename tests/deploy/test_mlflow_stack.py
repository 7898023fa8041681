"""deploy/mlflow: the compose file's PostgreSQL init script and MLflow command, run here as
processes against the local PostgreSQL (no Docker): the init script makes non-superuser roles
and their databases; MLflow starts with basic auth on (its secret key, auth database in
PostgreSQL, password from PGPASSWORD), refuses anonymous requests, lets the admin create a user,
and a search logs to it with that user's credentials from the environment.

Names are made unique per run (roles, databases, port) and dropped afterwards; everything else
is taken from the files as written. Skipped, saying why, where no PostgreSQL answers."""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
MLFLOW_DIR = ROOT / "deploy" / "mlflow"
BIN = Path(sys.executable).parent


def compose() -> dict[str, Any]:
    return yaml.safe_load((MLFLOW_DIR / "docker-compose.yaml").read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?message} and ${VAR:-default} ($$ is a literal $)."""

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    out = re.sub(r"\$\{(\w+)(?:(:\?|:-)([^}]*))?\}", one, value.replace("$$", "\0"))
    return out.replace("\0", "$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _psql(url: str, sql: str) -> str:
    return subprocess.run(
        ["psql", url, "-v", "ON_ERROR_STOP=1", "-tAc", sql],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()


def test_compose_needs_every_secret_and_keeps_them_off_command_lines():
    services = compose()["services"]
    mlflow, postgres = services["mlflow"], services["postgres"]
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        assert ":?" in mlflow["environment"][name], name
    for name in ("POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "OPTUNA_DB_PASSWORD"):
        assert ":?" in postgres["environment"][name], name
    command = " ".join(mlflow["command"])
    assert "PASSWORD" not in command and "pip install" not in command
    uri = mlflow["command"][mlflow["command"].index("--backend-store-uri") + 1]
    assert re.fullmatch(r"postgresql\+psycopg://mlflow@postgres:5432/mlflow", uri)
    assert "--allowed-hosts" in mlflow["command"] and "--app-name" in mlflow["command"]
    for service in services.values():
        assert all(p.startswith("127.0.0.1:") for p in service["ports"])
        assert "healthcheck" in service
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    volumes = {v.split(":")[1] for v in postgres["volumes"] if v.startswith("pgdata:")}
    assert volumes == {"/var/lib/postgresql/data"}
    auth = (MLFLOW_DIR / "basic_auth.ini").read_text()
    assert "database_uri = postgresql+psycopg://mlflow@postgres:5432/mlflow_auth" in auth


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict[str, Any]]:
    from tests.conftest import postgres_url

    admin_url = postgres_url()
    if admin_url is None:
        pytest.skip("no PostgreSQL answers on 127.0.0.1:5432: the MLflow stack is not run")
    tmp = tmp_path_factory.mktemp("mlflow-stack")
    sfx = secrets.token_hex(4)
    names = {
        "MLFLOW_DB_USER": f"psdep_mlflow_{sfx}",
        "MLFLOW_DB_NAME": f"psdep_mlflow_{sfx}",
        "MLFLOW_AUTH_DB_NAME": f"psdep_mlflow_auth_{sfx}",
        "OPTUNA_DB_USER": f"psdep_optuna_{sfx}",
        "OPTUNA_DB_NAME": f"psdep_optuna_{sfx}",
    }
    secrets_env = {
        "POSTGRES_PASSWORD": "unused-here",
        # Characters that break a password written into a URI.
        "MLFLOW_DB_PASSWORD": "p/w+@:" + secrets.token_hex(8),
        "OPTUNA_DB_PASSWORD": secrets.token_hex(8),
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-" + secrets.token_hex(8),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    }
    user = admin_url.split("//", 1)[1].split("@", 1)[0]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
    init_env = {
        **base_env,
        **names,
        **secrets_env,
        "PGHOST": "127.0.0.1",
        "PGPORT": "5432",
        "POSTGRES_USER": user,
        "POSTGRES_DB": admin_url.rsplit("/", 1)[1],
    }
    subprocess.run(
        ["sh", str(MLFLOW_DIR / "init-db.sh")],
        env=init_env,
        check=True,
        timeout=60,
        capture_output=True,
    )
    port = _free_port()
    proc = None
    try:
        proc = _start_mlflow(tmp, port, names, secrets_env, base_env)
        yield {
            "url": f"http://127.0.0.1:{port}",
            "names": names,
            "secrets": secrets_env,
            "admin_url": admin_url,
            "tmp": tmp,
        }
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        _drop(admin_url, names)


def _local(text: str, names: dict[str, str], port: int, tmp: Path) -> str:
    """The compose service names, ports and paths as they are on this machine."""
    text = text.replace(
        "mlflow@postgres:5432/mlflow_auth",
        f"{names['MLFLOW_DB_USER']}@127.0.0.1:5432/{names['MLFLOW_AUTH_DB_NAME']}",
    )
    text = text.replace(
        "mlflow@postgres:5432/mlflow",
        f"{names['MLFLOW_DB_USER']}@127.0.0.1:5432/{names['MLFLOW_DB_NAME']}",
    )
    text = text.replace("/artifacts", str(tmp / "artifacts")).replace("5000", str(port))
    return text.replace("/etc/mlflow/basic_auth.ini", str(tmp / "basic_auth.ini"))


def _start_mlflow(
    tmp: Path, port: int, names: dict, secrets_env: dict, base_env: dict
) -> subprocess.Popen:
    service = compose()["services"]["mlflow"]
    (tmp / "basic_auth.ini").write_text(
        _local((MLFLOW_DIR / "basic_auth.ini").read_text(), names, port, tmp)
    )
    env = {**base_env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key, value in service["environment"].items():
        env[key] = _local(interpolate(str(value), secrets_env), names, port, tmp)
    command = [_local(interpolate(str(a), {}), names, port, tmp) for a in service["command"]]
    command[command.index("--host") + 1] = "127.0.0.1"  # loopback only here
    command += ["--workers", "1"]  # one uvicorn worker: four take minutes to start on 2 cores
    log = open(tmp / "mlflow.log", "ab")  # noqa: SIM115 - written until the server stops
    proc = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp / "mlflow.log").read_text()[-4000:]
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return proc
        except requests.RequestException:  # not up yet
            pass
        time.sleep(1)
    proc.kill()
    raise TimeoutError((tmp / "mlflow.log").read_text()[-4000:])


def _drop(admin_url: str, names: dict[str, str]) -> None:
    for db in (names["MLFLOW_DB_NAME"], names["MLFLOW_AUTH_DB_NAME"], names["OPTUNA_DB_NAME"]):
        _psql(admin_url, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    for role in (names["MLFLOW_DB_USER"], names["OPTUNA_DB_USER"]):
        _psql(admin_url, f'DROP ROLE IF EXISTS "{role}"')


@pytest.mark.postgres
def test_init_makes_roles_without_superuser_and_private_databases(stack):
    names, admin_url = stack["names"], stack["admin_url"]
    roles = _psql(
        admin_url,
        "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname IN "
        f"('{names['MLFLOW_DB_USER']}', '{names['OPTUNA_DB_USER']}') ORDER BY rolname",
    ).splitlines()
    assert roles == [f"{names['MLFLOW_DB_USER']}|f|f|f", f"{names['OPTUNA_DB_USER']}|f|f|f"]
    owners = _psql(
        admin_url,
        "SELECT datname || '=' || pg_get_userbyid(datdba) FROM pg_database WHERE datname LIKE "
        f"'%{names['MLFLOW_DB_NAME'][-8:]}' ORDER BY datname",
    ).splitlines()
    assert sorted(owners) == sorted(
        [
            f"{names['MLFLOW_DB_NAME']}={names['MLFLOW_DB_USER']}",
            f"{names['MLFLOW_AUTH_DB_NAME']}={names['MLFLOW_DB_USER']}",
            f"{names['OPTUNA_DB_NAME']}={names['OPTUNA_DB_USER']}",
        ]
    )
    public = _psql(
        admin_url,
        f"SELECT has_database_privilege('public', '{names['OPTUNA_DB_NAME']}', 'CONNECT')",
    )
    assert public == "f"


@pytest.mark.postgres
def test_mlflow_runs_as_its_own_role_with_users_in_postgres(stack):
    names, admin_url = stack["names"], stack["admin_url"]
    connected = _psql(
        admin_url,
        "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname IN "
        f"('{names['MLFLOW_DB_NAME']}', '{names['MLFLOW_AUTH_DB_NAME']}')",
    ).splitlines()
    assert connected == [names["MLFLOW_DB_USER"]]
    tables = _psql(
        admin_url.rsplit("/", 1)[0] + "/" + names["MLFLOW_AUTH_DB_NAME"],
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'users'",
    )
    assert tables == "1", "the auth database (users) is in PostgreSQL"
    assert not (stack["tmp"] / "basic_auth.db").exists()


@pytest.mark.postgres
def test_anonymous_requests_are_refused(stack):
    answer = requests.get(
        f"{stack['url']}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30
    )
    assert answer.status_code == 401


@pytest.mark.postgres
def test_a_created_user_logs_a_search_with_credentials_from_the_environment(
    stack, tmp_path, monkeypatch, ray_cluster
):
    from mlflow.server.auth.client import AuthServiceClient

    from orchestrator import prepare, run_search
    from tests.e2e.helpers import quick_config, runs_of

    password = "bot-" + secrets.token_hex(8)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack["secrets"]["MLFLOW_AUTH_ADMIN_PASSWORD"])
    AuthServiceClient(stack["url"]).create_user("search-bot", password)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "search-bot")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    config = quick_config(
        tmp_path,
        name="deploy-stack",
        search__trials=1,
        search__concurrency=1,
        tracking__uri=stack["url"],
    )
    outcome = run_search(prepare(config))
    assert outcome is not None
    parents, children = runs_of(config)
    assert len(parents) == 1 and len(children) == 1

    refused = requests.get(
        f"{stack['url']}/api/2.0/mlflow/experiments/search?max_results=1",
        auth=("search-bot", "wrong"),
        timeout=30,
    )
    assert refused.status_code == 401
