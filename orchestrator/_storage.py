"""The study's storage, retried while the database is briefly locked or unreachable.

Every Optuna storage call is one transaction (rolled back on error), so a call that failed for
want of the database can simply be made again. The wrapper does that with backoff for up to
``RETRY_S``, then gives up with an error that names the storage: the search stops, trials it
left running are failed and asked again by the next run, and nothing told is lost.

Two calls are not idempotent when a connection drops *after* the commit: a repeated
``create_new_trial`` leaves one extra RUNNING trial (failed as an orphan on resume, never
charged to the budget), and a repeated ``set_trial_state_values`` finds its trial finished,
which is what the first attempt did, so that counts as success.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages import BaseStorage
from sqlalchemy import exc as sa

RETRY_S = 60.0  # how long a storage call keeps trying before the search gives up
_log = logging.getLogger("prunesearch.storage")
_TRANSIENT = (sa.OperationalError, sa.InterfaceError, sa.DisconnectionError, sa.TimeoutError)


class StorageUnavailable(ConnectionError):
    """The study's database stayed locked or unreachable for ``RETRY_S`` (the CLI prints it in one line)."""


def transient(exc: BaseException) -> bool:
    """True for a locked, dropped or unreachable database (not for bad data or a bug)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _TRANSIENT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _Retrying:
    def __init__(
        self,
        inner: BaseStorage,
        where: str,
        retry_s: float = RETRY_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._inner, self._where, self._retry_s, self._sleep = inner, where, retry_s, sleep

    def __getattr__(
        self, name: str
    ) -> Any:  # anything not in BaseStorage's API: the inner storage's
        return getattr(self._inner, name)

    def _call(self, name: str, args: tuple, kwargs: dict) -> Any:
        deadline, delay = None, 0.25
        while True:
            try:
                return getattr(self._inner, name)(*args, **kwargs)
            except UpdateFinishedTrialError:
                if deadline is not None and name == "set_trial_state_values":
                    return True  # the attempt that lost its connection did commit
                raise
            except (StorageInternalError, *_TRANSIENT) as exc:
                if not transient(exc):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self._retry_s
                    _log.warning(
                        "study storage %s: %s; retrying for up to %.0f s",
                        self._where,
                        _first_line(exc),
                        self._retry_s,
                    )
                if now + delay > deadline:
                    raise StorageUnavailable(
                        f"storage: {self._where} stayed locked or unreachable for {self._retry_s:.0f} s "
                        f"({_first_line(exc)}); the study is intact: run the search again to resume"
                    ) from exc
                self._sleep(delay)
                delay = min(delay * 2, 8.0)


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]


def _method(name: str) -> Callable[..., Any]:
    def call(self: _Retrying, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, args, kwargs)

    call.__name__ = name
    return call


# Every public method of BaseStorage (abstract or not) goes through _call. The class is built
# with them in its namespace so that the ABC sees its abstract methods implemented.
RetryingStorage = type(
    "RetryingStorage",
    (_Retrying, BaseStorage),
    {
        "__doc__": "An Optuna storage whose every call is retried while the database is away.",
        **{
            n: _method(n)
            for n in dir(BaseStorage)
            if not n.startswith("_") and callable(getattr(BaseStorage, n))
        },
    },
)


def study_storage(url: str, where: str) -> BaseStorage:
    """Optuna's own storage for ``url`` (cached RDB), wrapped to survive short outages."""
    return RetryingStorage(optuna.storages.get_storage(url), where)
