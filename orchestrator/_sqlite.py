"""SQLite settings for the default (single-machine) stores: Optuna's study and MLflow's runs.

Every Optuna ``set_user_attr`` and every MLflow write is its own transaction. With SQLite's
defaults (rollback journal, ``synchronous=FULL``) each commit waits for fsync: ~6 ms here,
about 40 commits per trial, and the driver's bookkeeping, not the workers, became the limit
on short trials. Write-ahead logging with ``synchronous=NORMAL`` commits without that wait and
still survives a killed process (only an OS crash or power cut may lose the last commits);
it also lets ``prunesearch status`` and the MLflow UI read while a search writes. A busy
timeout makes a briefly locked database wait instead of failing at once.

WAL needs a local file system (not NFS); a cluster uses PostgreSQL anyway.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

BUSY_TIMEOUT_MS = 30_000  # how long a write waits for another connection's lock


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if cursor.execute("PRAGMA database_list").fetchone()[2]:  # a file, not :memory:
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def use_fast_sqlite() -> None:
    """Apply the settings above to every SQLite connection this process opens from now on."""
    if not event.contains(Engine, "connect", _on_connect):
        event.listen(Engine, "connect", _on_connect)
