"""Checks that hold for every field of a built config, by kind rather than by name.

Every number is finite, no number is negative, an integer fits in 32 bits (what seeds and
counts accept downstream), and a list that has a non-empty default is not emptied. Then what a
local cluster can check against this machine: CUDA devices, GPU and CPU counts, threads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._schema import ConfigError

MAX_TEXT = 1024  # characters in one string value: a path or URL, not a document
MAX_INT = 2**32 - 1  # numpy's seed bound; far above any count a config holds
BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
# task_options are the task's own: any sign, but finite and bounded like every other number.
_SIGNED = {"task_options"}


def check_values(config: Any) -> None:
    """Walk the built config; refuse the first number or list that no field accepts."""
    _walk(config, "", signed=False)


def _walk(value: Any, path: str, *, signed: bool) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            child = getattr(value, f.name)
            where = f"{path}.{f.name}" if path else f.name
            if child == () and _default(f) not in ((), None):
                raise ConfigError(
                    f"{where}: an empty list; give at least one value (default: {list(_default(f))})"
                )
            _walk(child, where, signed=signed or f.name in _SIGNED)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _walk(v, f"{path}[{k!r}]" if path else str(k), signed=signed)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk(v, f"{path}[{i}]", signed=signed)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(value, path, signed=signed)
    elif isinstance(value, str):
        _check_text(value, path)


def _check_text(value: str, path: str) -> None:
    if len(value) > MAX_TEXT:
        raise ConfigError(f"{path}: {len(value)} characters, more than {MAX_TEXT}; shorten it")
    bad = next((c for c in value if ord(c) < 32 and c not in "\t\n\r"), None)
    if bad is not None:
        raise ConfigError(
            f"{path}: holds the control character {bad!r}; remove it (paths and names are plain text)"
        )


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _check_number(value: float, path: str, *, signed: bool) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: {value} is not a finite number; give a plain number")
    if not signed and value < 0:
        raise ConfigError(f"{path}: {value} must be >= 0")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise ConfigError(f"{path}: {value} is too large; give an integer in [0, {MAX_INT}]")
    if isinstance(value, float) and abs(value) > 1e15:
        raise ConfigError(f"{path}: {value:g} is too large; give a plausible value")


def check_resources(config: Any) -> None:
    """Custom resources must not shadow Ray's own, which have their own fields."""
    for key, value in config.resources.custom.items():
        if key in BUILTIN_RESOURCES:
            field = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory_mb"}.get(key, key)
            raise ConfigError(
                f"resources.custom: {key!r} is Ray's own resource; set resources.{field} instead"
            )
        if value <= 0:
            raise ConfigError(f"resources.custom[{key!r}]: {value} must be > 0")
    if config.resources.num_cpus <= 0 and config.resources.num_gpus <= 0:
        raise ConfigError("resources.num_cpus: 0 with no GPU; a trial needs a CPU: give >= 0.5")
    if config.resources.memory_mb is not None and config.resources.memory_mb < 1:
        raise ConfigError(
            f"resources.memory_mb: {config.resources.memory_mb} must be >= 1 (or omit it)"
        )
    for target in config.targets:
        if not re.fullmatch(r"cpu|cuda(:\d{1,2})?", target.device):
            raise ConfigError(
                f"target.device: {target.device!r}; use 'cpu', 'cuda' or 'cuda:N' (N a device index)"
            )


def is_local(config: Any) -> bool:
    """The search will start its own one-machine Ray cluster (no address anywhere)."""
    return not (config.ray_address or os.environ.get("RAY_ADDRESS"))


def check_local_machine(config: Any) -> None:
    """On a local cluster, this machine is the cluster: ask nothing of it that it does not have."""
    if not is_local(config):
        return
    cpus = os.cpu_count() or 1
    gpus = _gpu_count()
    fix = "or set ray_address to a cluster that has them"
    for target in config.targets:
        if target.device.startswith("cuda"):
            index = int(target.device.partition(":")[2] or 0)
            if index >= gpus:
                raise ConfigError(
                    f"target.device: {target.device!r}, but this machine has {gpus} CUDA device(s); "
                    f"use 'cpu' {fix}"
                )
        if target.threads > cpus:
            raise ConfigError(
                f"target.threads: {target.threads}, but this machine has {cpus} CPU(s); lower it {fix}"
            )
    check_local_placement(config)
    res = config.resources
    if res.num_gpus > gpus:
        raise ConfigError(
            f"resources.num_gpus: {res.num_gpus:g}, but this machine has {gpus} GPU(s); set 0 {fix}"
        )
    if res.num_cpus > cpus:
        raise ConfigError(
            f"resources.num_cpus: {res.num_cpus:g}, but this machine has {cpus} CPU(s); lower it {fix}"
        )


def check_local_placement(config: Any) -> None:
    """A local cluster that is yet to start has one node with no custom resources or labels: a
    trial or target that asks for some could never run there, so say it before Ray starts."""
    import ray

    if not is_local(config) or ray.is_initialized():
        return  # an attached cluster is asked itself (check_placeable)
    asks = [("resources", config.resources.custom, config.resources.label_selector)]
    asks += [(f"target {t.name!r}", t.resources, t.label_selector) for t in config.targets]
    for section, resources, labels in asks:
        if resources or labels:
            what = (
                "resources.custom / resources.label_selector"
                if section == "resources"
                else ("target.resources / target.label_selector")
            )
            raise ConfigError(
                f"{section}: asks for {dict(resources) or ''}{dict(labels) or ''}, but a local "
                f"cluster has one node with none; set ray_address to a cluster whose nodes declare "
                f"them (ray start --resources / --labels), or drop {what}"
            )


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install: no usable GPU
        return 0


def sqlite_file(url: str) -> Path | None:
    """The file a sqlite URL names (resolved), else None."""
    if not url.lower().startswith("sqlite:"):
        return None
    path = url.split("://", 1)[-1].split("?", 1)[0]
    path = path[1:] if path.startswith("/") else path
    return Path(path).resolve() if path and path != ":memory:" else None


def check_separate_stores(config: Any) -> None:
    """Optuna and MLflow each keep an alembic_version table: they cannot share one database."""
    mlflow_db = sqlite_file(config.tracking.resolved_uri())
    for field, url in (
        ("storage", config.storage),
        ("search.warm_start.storage", config.search.warm_start.storage),
    ):
        if url and mlflow_db is not None and sqlite_file(url) == mlflow_db:
            raise ConfigError(
                f"tracking.uri: the same SQLite file as {field} ({mlflow_db.name}); MLflow and Optuna "
                "both keep an alembic_version table there: give each its own file (mlflow.db, optuna.db)"
            )


TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def check_tracking_uri(uri: str, field: str = "tracking.uri") -> None:
    """MLflow 3 refuses its file store (``./mlruns``, ``file://``) unless told to allow it."""
    scheme = uri.split(":", 1)[0].lower() if "://" in uri else ""
    base = scheme.split("+", 1)[0]
    if base in TRACKING_SCHEMES:
        return
    if base in ("", "file"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true"):
            return
        raise ConfigError(
            f"{field}: {uri[:120]!r} is MLflow's file store, which MLflow 3 refuses; use "
            "sqlite:///mlflow.db or an MLflow server (mlflow migrate-filestore moves old runs)"
        )
    raise ConfigError(
        f"{field}: {uri[:120]!r} has an unknown scheme {scheme!r}; use sqlite:///mlflow.db, "
        "postgresql://..., or http(s)://HOST:5000 for an MLflow server"
    )
