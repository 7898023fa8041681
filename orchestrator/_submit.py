"""Submit a search to a Ray cluster as a Ray job; follow, inspect and stop it.

The driver (``prunesearch run``) then runs on the cluster, next to the workers. What travels is an
explicit list (the config, your task module and its package, files named with ``--include``: see
_upload; ``submit --dry-run`` shows it) in the job's runtime environment;
credentials never do: the cluster reads them from its own environment (``PGPASSWORD``,
``MLFLOW_TRACKING_USERNAME``/``PASSWORD``), so they are not in job metadata or logs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._cluster import local_stores
from ._config import Config
from ._schema import ConfigError
from ._secrets import has_secret
from ._upload import inside_project, staged, upload_list

Out = Callable[[str], None]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def submission_id(config: Config, day: dt.date, nightly: bool = False) -> str:
    """One submission per search (and kind) and day: resubmitting the same day is idempotent."""
    return f"prunesearch-{'nightly-' if nightly else ''}{config.name}-{day:%Y%m%d}"


def check_for_cluster(config: Config, allow_local: bool) -> None:
    """A search whose driver runs on the cluster must keep its stores where they survive it."""
    for field, url in (
        ("storage", config.storage),
        ("search.warm_start.storage", config.search.warm_start.storage),
        ("tracking.uri", config.tracking.uri),
    ):
        if url and has_secret(url):
            raise ConfigError(
                f"{field}: holds a password, which would travel in the job; put it in the cluster's "
                "environment (PGPASSWORD or ~/.pgpass, MLFLOW_TRACKING_PASSWORD) and drop it from the URL"
            )
    if allow_local:
        return
    for field, uri in local_stores(config):
        raise ConfigError(
            f"{field}: {uri!r} is a file on whichever node runs the driver, lost with it and unseen by "
            "your MLflow UI; use a PostgreSQL URL / an MLflow server for cluster runs, or pass "
            "--allow-local-storage if that node's disk is what you want"
        )


def submit(
    config: Config,
    config_path: Path,
    overrides: Sequence[str],
    address: str,
    *,
    wait: bool,
    allow_local: bool,
    job_id: str | None = None,
    nightly: bool = False,
    includes: Sequence[str] = (),
    dry_run: bool = False,
    out: Out = print,
) -> int:
    """Submit (or join today's submission of) a search; with ``wait``, stream its logs to the end.

    ``nightly``: the job runs ``prunesearch nightly`` for today's date (fixed now, so a job that
    starts after midnight is still tonight's)."""
    check_for_cluster(config, allow_local)
    workdir = Path.cwd().resolve()
    files = upload_list(config, config_path, workdir, includes)
    rel = inside_project(workdir, config_path, "config")
    if dry_run:
        return _list_uploads(files, workdir, out)
    client = _client(address)
    day = dt.datetime.now(dt.UTC).date()
    sid = job_id or submission_id(config, day, nightly)
    status = _status(client, sid)
    if status is None:
        entry = _entrypoint(rel, day, nightly, allow_local, overrides)
        with staged(workdir, files) as package:  # Ray packs and uploads it in submit_job
            client.submit_job(
                entrypoint=entry,
                submission_id=sid,
                runtime_env={"working_dir": str(package)},
                metadata={"prunesearch.search": config.name, "prunesearch.config": str(rel)},
            )
        out(f"submitted {config.name} to {address} as job {sid}")
    elif (ended := _existing(sid, status, address, wait, out)) is not None:
        return ended
    if wait:
        return follow(client, sid, out)
    out(
        f"  follow: prunesearch logs {sid} --address {address} --follow\n"
        f"  status: prunesearch status {sid} --address {address}\n"
        f"  stop:   prunesearch stop {sid} --address {address}"
    )
    return 0


def _list_uploads(files: Sequence[Path], workdir: Path, out: Out) -> int:
    out(f"would upload {len(files)} file(s) from {workdir} (nothing else travels):")
    for path in files:
        out(f"  {path}")
    return 0


def _existing(sid: str, status: str, address: str, wait: bool, out: Out) -> int | None:
    """Today's submission exists: submit nothing. If it ended, its outcome is this command's;
    None while it runs (then it is followed, or pointed at, like a new one)."""
    if status in TERMINAL:
        out(
            f"job {sid} already ran today ({status}); nothing submitted. To run again today, pass --id NEW-ID "
            f"(the study resumes where it stopped)"
        )
        return 0 if status == "SUCCEEDED" else 1
    out(
        f"job {sid} is already {status} on {address}; not submitting it twice"
        + ("; following it" if wait else "")
    )
    return None


def _entrypoint(
    rel: Path, day: dt.date, nightly: bool, allow_local: bool, overrides: Sequence[str]
) -> str:
    """The job's command line: ``prunesearch run`` (or ``nightly`` for ``day``) on the config."""
    command = (
        ["nightly", shlex.quote(str(rel)), f"--date {day.isoformat()}"]
        if nightly
        else ["run", shlex.quote(str(rel))]
    )
    if allow_local:  # the driver on the cluster accepts what the submitter accepted
        command.append("--allow-local-storage")
    return " ".join(
        [
            "python",
            "-m",
            "orchestrator.cli",
            *command,
            *(f"--set {shlex.quote(o)}" for o in overrides),
        ]
    )


def follow(client: Any, sid: str, out: Out) -> int:
    """Stream a job's logs until it ends; 0 if it succeeded."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            out(chunk.rstrip("\n"))

    asyncio.run(tail())
    status = _status(client, sid)
    out(f"job {sid}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def status(address: str, sid: str, out: Out = print) -> int:
    client = _client(address)
    info = _info(client, sid)
    out(f"{sid}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    return 0


def logs(address: str, sid: str, *, follow_: bool, out: Out = print) -> int:
    client = _client(address)
    _info(client, sid)
    if follow_:
        return follow(client, sid, out)
    out(client.get_job_logs(sid).rstrip("\n"))
    return 0


def stop(address: str, sid: str, out: Out = print) -> int:
    """Ray sends the driver SIGTERM: the search drains (grace_s) and can be resumed later."""
    client = _client(address)
    _info(client, sid)
    stopped = client.stop_job(sid)
    out(f"{sid}: {'stop requested' if stopped else 'already ended'}")
    return 0


def _client(address: str) -> Any:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise ValueError(
            f"--address: the Ray cluster at {address} requires its auth token; export "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=... (or put it in ~/.ray/auth_token)"
        ) from None
    except (ConnectionError, RuntimeError) as exc:
        raise ValueError(
            f"--address: no Ray dashboard answers at {address} ({str(exc).splitlines()[0][:200]}); "
            "pass the head's http://HOST:8265 (or set RAY_ADDRESS)"
        ) from None


def _info(client: Any, sid: str) -> Any:
    try:
        return client.get_job_info(sid)
    except RuntimeError as exc:
        raise ValueError(
            f"job {sid}: not found on this cluster ({str(exc).splitlines()[0][:200]})"
        ) from None


def _status(client: Any, sid: str) -> str | None:
    """The job's state, or None when no job has this id."""
    try:
        return _info(client, sid).status.value
    except ValueError:
        return None
