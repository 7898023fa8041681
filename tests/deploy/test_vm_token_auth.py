"""deploy/vm/ray-start.sh: the head it starts has Ray's token auth on. A job submitted without the
token is refused; one submitted with it (as `prunesearch submit` / `ray job submit` send it) runs,
and its driver joins the GCS with the token. A worker without the head's token does not start.

The head runs on loopback with its own ports, temp dir and HOME (so its token), stopped by ending
its `--block` process group: no other Ray on the machine is touched."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "vm" / "ray-start.sh"
BIN = Path(sys.executable).parent
PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--node-manager-port",
    "--object-manager-port",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict[str, str]:
    drop = {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["HOME"] = str(home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _wait_for_dashboard(address: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            # Any answer from the Jobs API (401 included) means the dashboard is up.
            if requests.get(f"{address}/api/jobs/", timeout=2).status_code in (200, 401):
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the head's dashboard did not answer: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def head() -> Iterator[tuple[str, Path]]:
    """(dashboard address, HOME holding the token) of a head started by the recipe."""
    temp = Path(tempfile.mkdtemp(prefix="rayvm", dir="/tmp"))  # short: socket paths <= 107 bytes
    home = temp / "home"
    home.mkdir()
    ports = {flag: _free_port() for flag in PORT_FLAGS}
    log = open(temp / "head.log", "ab")  # noqa: SIM115 - written until the fixture ends
    proc = subprocess.Popen(
        [
            "sh",
            str(SCRIPT),
            "head",
            "127.0.0.1",
            "--block",
            "--disable-usage-stats",
            "--include-dashboard=true",
            f"--temp-dir={temp / 'ray'}",
            *(f"{k}={v}" for k, v in ports.items()),  # after the script's --port: the last wins
        ],
        env=_env(home),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        _wait_for_dashboard(address, proc, temp / "head.log")
        yield address, home
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # this head's process group only
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # what did not stop in time
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_the_head_creates_a_private_token(head):
    _, home = head
    token = home / ".ray" / "auth_token"
    assert len(token.read_text().strip()) == 64
    assert token.stat().st_mode & 0o777 == 0o600


def test_a_job_without_the_token_is_refused(head):
    address, _ = head
    answer = requests.post(f"{address}/api/jobs/", json={"entrypoint": "echo hi"}, timeout=30)
    assert answer.status_code == 401, answer.text
    wrong = requests.post(
        f"{address}/api/jobs/",
        json={"entrypoint": "echo hi"},
        headers={"Authorization": "Bearer " + "0" * 64},
        timeout=30,
    )
    assert wrong.status_code in (401, 403), wrong.text


def test_a_job_with_the_token_runs_and_its_driver_joins_the_cluster(head):
    address, home = head
    env = _env(home)
    env["RAY_AUTH_MODE"] = (
        "token"  # the token itself from ~/.ray/auth_token, as on the operator's machine
    )
    entrypoint = ["python", "-c", "import ray; ray.init(); print('alive nodes', len(ray.nodes()))"]
    done = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--", *entrypoint],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "alive nodes 1" in out and "succeeded" in out, out[-3000:]


@pytest.mark.parametrize(
    "role", [["trainer", "127.0.0.1", "127.0.0.1"], ["target", "127.0.0.1", "127.0.0.1", "t4"]]
)
def test_a_worker_without_the_heads_token_does_not_start(tmp_path, role):
    done = subprocess.run(
        ["sh", str(SCRIPT), *role], env=_env(tmp_path), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1 and "no token at" in done.stderr, done.stderr


def test_the_script_runs_every_node_with_token_auth_and_the_dashboard_on_localhost():
    text = SCRIPT.read_text()
    assert "export RAY_AUTH_MODE=token" in text
    starts = [ln for ln in text.splitlines() if "exec ray start" in ln]
    assert len(starts) == 3 and all("--node-ip-address=" in ln for ln in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0] and "0.0.0.0" not in text
