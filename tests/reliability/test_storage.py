"""The study's storage goes away for a while: the search waits or retries, and the study stays whole.

Two real faults: another process holds an exclusive lock on the SQLite study, and the
PostgreSQL server becomes unreachable (a TCP proxy in front of it drops every connection
and refuses new ones for a few seconds).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sqlite3
import threading
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from orchestrator import RetryingStorage, StorageUnavailable, prepare, run_search, transient
from tests.e2e.helpers import quick_config, runs_of
from workers import TrialStatus

LOCK_S = 4.0
OUTAGE_S = 4.0


def _settle(study_name: str, storage: str, config, trials: int, ledger) -> None:
    """Every trial finished once, none left running, and MLflow holds one run for each."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    got = study.get_trials(deepcopy=False)
    numbers = [t.number for t in got]
    assert len(got) == trials and sorted(numbers) == list(range(trials))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in got), [
        t.state for t in got
    ]
    _, children = runs_of(config)
    assert sorted(int(c.data.tags["prunesearch.trial"]) for c in children) == numbers
    ledger.lost(trials - len(children))
    ledger.check(4)


def test_a_locked_sqlite_study_makes_the_search_wait_not_fail(tmp_path, ray_cluster, ledger):
    config = quick_config(tmp_path, name="locked", search__trials=3, finetune__epochs=0)
    db = tmp_path / "optuna.db"
    optuna.create_study(
        study_name="other", storage=f"sqlite:///{db}"
    )  # the file and its tables exist
    locked, released = threading.Event(), []

    def hold_lock() -> (
        None
    ):  # another process's writer, as a second search on the same file would be
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(LOCK_S)
        conn.execute("COMMIT")
        released.append(time.time())
        conn.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    locked.wait(10)
    ledger.fault("storage locked")
    outcome = run_search(prepare(config), progress=lambda line: None)
    holder.join()
    study = optuna.load_study(study_name="locked", storage=config.storage)
    # The study could only be created after the lock went: the search waited for it.
    assert study.trials[0].datetime_start.timestamp() >= released[0] - 0.5
    assert sum(outcome.counts.values()) == 3 and outcome.counts[TrialStatus.FAILED] == 0
    _settle("locked", config.storage, config, 3, ledger)


class _Proxy:
    """A TCP proxy to PostgreSQL that can cut every connection and refuse new ones for a while."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.down_until = 0.0
        self.refused = threading.Event()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self._down():
                client.close()  # unreachable: the connection dies at once
                self.refused.set()
                continue
            upstream = socket.create_connection(self.upstream)
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def outage(self, seconds: float) -> None:
        """Cut every connection; refuse new ones for ``seconds`` and until one has been refused.

        The second condition makes the fault certain to be met: an outage that ended before the
        search's next storage call would be healed silently by the pool's pre-ping.
        """
        self.refused.clear()
        self.down_until = time.monotonic() + seconds
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _down(self) -> bool:
        now = time.monotonic()
        return now < self.down_until or (
            self.down_until > 0 and not self.refused.is_set() and now < self.down_until + 60
        )

    def close(self) -> None:
        self.server.close()
        self.down_until = 0.0
        self.outage(0)
        self.refused.set()


@pytest.mark.postgres
def test_postgres_unreachable_mid_search_is_retried(
    tmp_path, ray_cluster, postgres, caplog, ledger
):
    host_port = postgres.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    proxy = _Proxy((host, int(port)))
    via_proxy = postgres.replace(host_port, f"127.0.0.1:{proxy.port}")
    name = f"pg-outage-{uuid.uuid4().hex[:8]}"  # the database is shared across runs: never reuse a study
    config = quick_config(
        tmp_path, name=name, storage=via_proxy, search__trials=5, finetune__epochs=0
    )
    cut = threading.Event()

    def cut_after_two_trials(line: str) -> None:
        # Called by the search's own loop after a trial is recorded, so three tells are still to
        # come: the outage is certain to meet the search mid-way (a watcher thread polling the
        # study could see the last trial told before it cut).
        if line.startswith("[2/") and not cut.is_set():
            proxy.outage(OUTAGE_S)
            cut.set()

    try:
        with caplog.at_level(logging.WARNING, logger="prunesearch.storage"):
            outcome = run_search(prepare(config), progress=cut_after_two_trials)
    finally:
        proxy.close()
    assert cut.is_set(), "the outage never happened: the search ended first"
    ledger.fault("storage unreachable")
    assert any("retrying" in r.getMessage() for r in caplog.records), "the outage was not noticed"
    assert sum(outcome.counts.values()) == 5 and outcome.counts[TrialStatus.FAILED] == 0
    _settle(name, postgres, config, 5, ledger)
    optuna.delete_study(study_name=name, storage=postgres)


def test_the_wrapper_gives_up_with_the_storage_named_and_passes_real_errors_through(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    slept: list[float] = []
    storage = RetryingStorage(
        optuna.storages.get_storage(url), "sqlite:///s.db", retry_s=2.0, sleep=slept.append
    )
    study = optuna.create_study(study_name="s", storage=storage)
    assert study.ask().number == 0

    # A bad call is not an outage: it raises at once, untouched.
    with pytest.raises(KeyError):
        storage.get_study_id_from_name("no-such-study")
    assert slept == []

    # An outage that never ends: backoff, then one error naming the storage and the way out.
    def down(*_args, **_kwargs):
        import sqlalchemy.exc as sa

        raise optuna.exceptions.StorageInternalError("commit failed") from sa.OperationalError(
            "x", {}, Exception("database is locked")
        )

    storage._inner.get_all_trials = down
    with pytest.raises(
        StorageUnavailable, match=r"storage: sqlite:///s.db stayed locked or unreachable .* resume"
    ):
        study.get_trials()
    assert slept and slept[:3] == [0.25, 0.5, 1.0] and sum(slept) <= 2.0
    assert transient(optuna.exceptions.StorageInternalError("x")) is False
