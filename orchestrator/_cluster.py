"""Where a search runs and writes: attach to (or start) the Ray cluster, and check, before any
trial, that the cluster can run it and that the stores it writes to can be opened and written."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray

from workers import CACHE_VAR, TASK_PATH_VAR, cache_dir, task_roots

from ._config import Config
from ._schema import ConfigError
from ._secrets import looks_secret_var
from ._study import redact

# Only the orchestrator talks to MLflow and to the Optuna storage: the Ray processes of a local
# cluster (and so every trial worker) are started without credentials in their environment:
# these names, and every variable whose name looks like one (see is_credential_var).
CREDENTIAL_VARS = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "PGPASSWORD",
)
# Ray's own: a worker needs them to join an authenticated cluster.
_RAY_OWN = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def is_credential_var(name: str) -> bool:
    """Whether an environment variable's name says it holds a credential."""
    return name in CREDENTIAL_VARS or (name not in _RAY_OWN and looks_secret_var(name))


def ensure_ray(address: str | None = None) -> None:
    """Reuse a connected Ray; else attach to ``address`` / RAY_ADDRESS; else start a local one."""
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        probe_address(target)
        _init(address=target, log_to_driver=True)
        return
    # A local cluster: workers import a user's task module from where the CLI runs and from the
    # config's directory (task roots), as the driver does.
    roots = [str(r) for r in task_roots()]
    path = os.pathsep.join([*roots, *os.environ.get("PYTHONPATH", "").split(os.pathsep)])
    env = {"PYTHONPATH": path.strip(os.pathsep), TASK_PATH_VAR: os.pathsep.join(roots)}
    # address="local": always a fresh local instance, never a stale or unrelated one that
    # /tmp/ray/ray_current_cluster points at (set ray_address: auto to join a `ray start` one).
    with _without_credentials():
        _init(
            address="local",
            include_dashboard=False,
            runtime_env={"env_vars": env},
            log_to_driver=True,
            _system_config=LOCAL_SYSTEM_CONFIG,
        )


def probe_address(target: str) -> None:
    """ray.init retries an address that does not answer for minutes: knock once, briefly."""
    import socket

    if target in ("auto", "local"):
        return
    hostport = target.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"ray_address: {target!r} is not HOST:PORT (e.g. 10.0.0.5:6379, or ray://HOST:10001); "
            "fix ray_address / RAY_ADDRESS, or drop it to start a local cluster"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(
            f"ray_address: nothing answers at {target!r} within {PROBE_TIMEOUT_S:g} s "
            f"({exc.strerror or exc}); start the cluster (ray start --head), fix ray_address / "
            "RAY_ADDRESS, or drop it to start a local cluster"
        ) from None


PROBE_TIMEOUT_S = 5.0


def _init(**kwargs: Any) -> None:
    """ray.init, its failure told in one line with what to do."""
    try:
        ray.init(**kwargs)
    except Exception as exc:  # Ray raises a bare Exception when a local node times out
        with suppress(Exception):
            ray.shutdown()
        what = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        where = kwargs.get("address")
        if where == "local":
            raise ConfigError(
                f"ray_address: the local Ray cluster did not start ({what}); retry, run fewer "
                "processes at once, or set ray_address to a running cluster"
            ) from exc
        raise ConfigError(
            f"ray_address: cannot connect to the Ray cluster at {where!r} ({what}); start it, "
            "fix ray_address / RAY_ADDRESS, or drop it to start a local cluster"
        ) from exc


@contextmanager
def _without_credentials() -> Iterator[None]:
    """Processes started meanwhile (Ray's raylet, which spawns the workers) inherit no credentials."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if is_credential_var(k)}
    try:
        yield
    finally:
        os.environ.update(saved)


# Ray keeps about one idle worker process per CPU and kills the rest after a second idle; the
# latency bench and the front board take two of those slots, so a finished trial's warm worker
# (torch imported, task built: ~5 s) was killed and the next trial paid for a new one. Measured on
# the digits search (2 CPUs, 5 trials): 56 s -> 35 s cold, 23 s warm.
LOCAL_SYSTEM_CONFIG = {"num_workers_soft_limit": (os.cpu_count() or 1) + 4}


def check_placeable(
    section: str,
    resources: Mapping[str, float],
    labels: Mapping[str, str],
    *,
    resource_key: str = "resources",
    who: str = "",
) -> None:
    """Refuse, before any work, a target or trial that no node of the cluster could ever run.

    ``section`` is the config section (``target`` or ``resources``), so the error names what to fix.
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if any(_fits(n, resources, labels) for n in nodes):
        return
    if any(_fits({"Resources": group}, resources, {}) for group in _autoscaled_groups()):
        return  # an autoscaler (KubeRay) can start such a node: the work waits for it (scale from zero)
    flags = []
    if resources:
        flags.append(f"--resources='{json.dumps(dict(resources))}'")
    if labels:
        flags.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
    raise ValueError(
        f"{section}{who}: no node of the Ray cluster has resources {dict(resources)} and labels {dict(labels)} "
        f"({len(nodes)} node(s) alive); start one with `ray start --address=HEAD:6379 {' '.join(flags)}`, "
        f"or fix {section}.{resource_key} / {section}.label_selector"
    )


def _autoscaled_groups() -> list[dict[str, float]]:
    """Resources of each node group an autoscaler may start (max_count > 0), as it reported them to
    the GCS; none without an autoscaler. Node labels are not reported, so only resources are checked."""
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older GCS or no autoscaler state: only alive nodes count
        return []
    if config is None:
        return []
    return [dict(g.resources) for g in config.node_group_configs if g.max_count != 0]


def _fits(
    node: Mapping[str, Any], resources: Mapping[str, float], labels: Mapping[str, str]
) -> bool:
    have = node.get("Resources") or {}
    node_labels = node.get("Labels") or {}
    return all(have.get(k, 0) >= v for k, v in resources.items()) and all(
        label_matches(node_labels.get(k), v) for k, v in labels.items()
    )


def label_matches(value: str | None, selector: str) -> bool:
    """Ray's label-selector values: ``v``, ``!v``, ``in(a,b)``, ``!in(a,b)``."""
    negate = selector.startswith("!")
    body = selector[1:] if negate else selector
    if body.startswith("in(") and body.endswith(")"):
        hit = value in {s.strip() for s in body[3:-1].split(",")}
    else:
        hit = value == body
    return hit != negate


def check_room_for_trials(num_cpus: float, bench_cpus: float) -> None:
    """On a one-node cluster, the latency benches' reserved CPUs must leave room for a trial,
    or the search would wait forever for a worker."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = sum((n.get("Resources") or {}).get("CPU", 0.0) for n in nodes)
    if len(nodes) == 1 and total - bench_cpus < num_cpus:
        raise ValueError(
            f"resources.num_cpus: a trial asks for {num_cpus:g} CPU(s), but this one-node cluster has {total:g} "
            f"and timing reserves {bench_cpus:g} (target.threads); lower target.threads or resources.num_cpus, "
            "or add a node"
        )


# -- the stores a search writes to -----------------------------------------------------------
def local_stores(config: Config) -> list[tuple[str, str]]:
    """(field, URI) of the stores that are files on the driver's machine (SQLite, a file store)."""
    out = []
    for field, uri in (
        ("storage", config.storage),
        ("tracking.uri", config.tracking.resolved_uri()),
    ):
        if uri.startswith("sqlite:") or urlparse(uri).scheme in ("", "file"):
            out.append((field, uri))
    return out


def check_cluster_stores(config: Config, allow_local: bool) -> None:
    """On a multi-node cluster, refuse stores that are files on the driver's node: a resumed or
    submitted driver elsewhere would not find them, and nobody else sees the results."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if allow_local or len(nodes) < 2:
        return
    for field, uri in local_stores(config):
        raise ConfigError(
            f"{field}: {redact(uri)!r} is a local file, but this Ray cluster has {len(nodes)} nodes; use a "
            "PostgreSQL URL for storage and an MLflow server for tracking.uri, or pass --allow-local-storage "
            "to keep them on the driver's node"
        )


def check_storage(url: str, field: str = "storage") -> None:
    """Open the Optuna storage (or MLflow's database) once, before any work, or say why it cannot be."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    shown = redact(url)
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
        raise ConfigError(
            f"{field}: {shown!r} is not a database URL ({exc}); use sqlite:///optuna.db or "
            "postgresql://USER@HOST:5432/DB"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite(parsed.database, shown, field)
        return
    connect_args = {"connect_timeout": 5} if parsed.get_backend_name() == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(
            url, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool
        )
    except (ImportError, sqlalchemy.exc.NoSuchModuleError, sqlalchemy.exc.ArgumentError) as exc:
        raise ConfigError(
            f"{field}: cannot open {shown!r}: no database driver for it ({_first(exc)}); for "
            "PostgreSQL install the postgres extra: pip install 'prunesearch[postgres]'"
        ) from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        cause = _first(exc.orig if getattr(exc, "orig", None) is not None else exc)
        if parsed.password:
            cause = cause.replace(parsed.password, "***")
        raise ConfigError(
            f"{field}: cannot connect to {shown!r} ({cause}); start the database or fix the host, "
            "port and database name (the password comes from PGPASSWORD or ~/.pgpass)"
        ) from None
    finally:
        engine.dispose()


def _check_sqlite(database: str | None, shown: str, field: str) -> None:
    if database in (None, "", ":memory:"):
        raise ConfigError(
            f"{field}: {shown!r} is an in-memory database, lost when the search ends; "
            "use a file, e.g. sqlite:///optuna.db"
        )
    if len(database) > 4096 or any(len(part.encode()) > 255 for part in Path(database).parts):
        raise ConfigError(
            f"{field}: the path in {shown[:80]!r}... is too long (a name over 255 bytes or a path "
            "over 4096); choose a shorter path"
        )
    path = Path(database)
    if path.is_dir():
        raise ConfigError(
            f"{field}: {shown!r} names a directory; name a file in it, e.g. "
            f"sqlite:///{path / 'optuna.db'}"
        )
    if path.exists() and not path.is_file():
        raise ConfigError(
            f"{field}: {shown!r} is not a regular file (a device, pipe or socket); name a "
            "database file, e.g. sqlite:///optuna.db"
        )
    if path.exists():
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError as exc:
            raise ConfigError(
                f"{field}: cannot read {str(path)!r} ({exc.strerror or exc}); name a database "
                "file, e.g. sqlite:///optuna.db"
            ) from None
        if head and head != b"SQLite format 3\x00":
            raise ConfigError(
                f"{field}: {str(path)!r} exists and is not a SQLite database; "
                "point the URL at a new file or at the search's database"
            )
        return
    if not path.parent.is_dir():
        raise ConfigError(
            f"{field}: cannot open {shown!r}: directory {str(path.parent)!r} does not exist; "
            "create it or fix the path"
        )
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(
            f"{field}: cannot create {str(path)!r}: directory {str(path.parent)!r} is not "
            "writable; fix its permissions or choose another path"
        )


def check_tracking(config: Config) -> None:
    """MLflow's database opens (a server is not checked: an outage mid-search is queued and
    replayed, see _tracking)."""
    uri = config.tracking.resolved_uri()
    if urlparse(uri).scheme not in ("", "file", "http", "https", "databricks"):
        check_storage(uri, "tracking.uri")


def check_artifacts(config: Config) -> None:
    """Write (and remove) a small file where this search's artifacts go, when that is a local path:
    a search never learns mid-way that its results have nowhere to go."""
    from mlflow import MlflowClient
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH

    uri = config.tracking.resolved_uri()
    if urlparse(uri).scheme in ("http", "https", "databricks"):
        return  # the server stores them (or the client writes to its object store)
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(config.experiment)
    if experiment is not None:
        location, what = (
            experiment.artifact_location,
            f"experiment {config.experiment!r} stores artifacts in",
        )
    else:
        location, what = (
            os.path.abspath(DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH),
            "new experiments store artifacts in",
        )
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file"):
        return  # an object store or the server's proxy: its own credentials and quotas
    path = Path(parsed.path if parsed.scheme == "file" else location)
    probe = path / f".prunesearch-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ConfigError(
            f"tracking: {what} {str(path)!r}, which cannot be written ({exc.strerror}); free space or fix its "
            "permissions, or set tracking.experiment to a new experiment name (created in a writable location)"
        ) from None
    finally:
        with suppress(OSError):  # NotADirectoryError when its directory could not be made
            probe.unlink(missing_ok=True)


def check_cache() -> None:
    """The base model and sensitivity scans are cached in PRUNESEARCH_CACHE: it must be a writable directory."""
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{CACHE_VAR}: cannot create {str(path)!r} ({exc.strerror}); set "
            f"{CACHE_VAR} to a writable directory"
        ) from None
    if not os.access(path, os.W_OK):
        raise ConfigError(
            f"{CACHE_VAR}: {str(path)!r} is not writable; set {CACHE_VAR} to a writable directory"
        )


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
