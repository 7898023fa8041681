"""Shared fixtures: one local Ray cluster per test session, one trained digits model."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The digits base model trains once (~8 s) and is reused by every test and every Ray worker.
os.environ.setdefault("PRUNESEARCH_CACHE", str(ROOT / ".prunesearch" / "cache"))
os.environ.pop("RAY_ADDRESS", None)  # tests never attach to someone else's cluster


@pytest.fixture(autouse=True)
def _our_logger_propagates():
    """The CLI's console setup is process-wide: it stops our logger propagating to the root,
    where pytest's caplog listens. Every test ends with the default again."""
    yield
    logging.getLogger("prunesearch").propagate = True


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from orchestrator import LOCAL_SYSTEM_CONFIG

    if not ray.is_initialized():
        ray.init(
            address="local",  # never whatever /tmp/ray/ray_current_cluster last pointed at
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _system_config=LOCAL_SYSTEM_CONFIG,  # keeps warm trial workers alive, as a local search does
            runtime_env={
                "env_vars": {
                    "PRUNESEARCH_CACHE": os.environ["PRUNESEARCH_CACHE"],
                    "PYTHONPATH": str(ROOT),
                }
            },
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_task():
    from workers import build_task

    return build_task("digits")


@pytest.fixture(scope="session")
def digits_discovery(digits_task):
    from search_space import discover

    return discover(digits_task.model, digits_task.example_inputs)


def postgres_url() -> str | None:
    """The local PostgreSQL test database, or None when nothing answers on 127.0.0.1:5432."""
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            pass
    except OSError:
        return None
    return os.environ.get("PRUNESEARCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def postgres():
    url = postgres_url()
    if url is None:
        pytest.skip("no PostgreSQL answers on 127.0.0.1:5432 (cluster-mode storage test)")
    return url


@pytest.fixture
def postgres_mlflow(postgres):
    """A second database for MLflow: it and Optuna must not share one (both use alembic_version)."""
    import psycopg

    name = "prunesearch_mlflow_test"
    with psycopg.connect(postgres, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    return postgres.rsplit("/", 1)[0] + "/" + name
