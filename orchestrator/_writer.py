"""MLflow calls replayed in order by one background thread, through outages of the server.

The dispatch loop never waits on MLflow (a child run is 4-5 calls, ~0.1 s on SQLite and more over
HTTP). The call that fails for want of the server stays at the head of the queue, with everything
after it, and is tried again every ``RETRY_EVERY_S``; a call that fails for any other reason is a
bug, raised in the caller at its next call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import requests
from mlflow.exceptions import MlflowException

RETRY_EVERY_S = 5.0  # while the server is unreachable, how often to try it again
_log = logging.getLogger("prunesearch.tracking")


class QueuedWriter:
    """Calls queued by ``put`` and made in order on one thread; ``where`` names the server in logs."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.pending: deque[tuple[Callable[..., Any], tuple]] = deque()  # not yet written, in order
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None  # a non-outage failure, raised at the next call

    def put(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; raises what an earlier call raised, if it was not an outage."""
        self._raise_error()
        with self._cv:
            self.pending.append((fn, args))
            self._cv.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
            self._thread.start()

    def flush(self, wait_s: float = 0.0) -> int:
        """Wait up to ``wait_s`` for every queued call to be written. Returns how many remain."""
        deadline = time.monotonic() + wait_s
        with self._cv:
            while self.pending and time.monotonic() < deadline:
                self._cv.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            left = len(self.pending)
        self._raise_error()
        return left

    def _run(self) -> None:
        outage = False
        while True:
            with self._cv:
                while not self.pending:
                    self._cv.wait()
                fn, args = self.pending[0]  # stays queued until written: flush() counts it
            try:
                fn(*args)
            except Exception as exc:
                if is_outage(exc):  # try the same call again later; everything after it waits
                    if not outage:
                        _log.warning(
                            "MLflow at %s is unreachable (%s); queueing records until it answers",
                            self.where,
                            str(exc).splitlines()[0][:200],
                        )
                    outage = True
                    time.sleep(RETRY_EVERY_S)
                    continue
                self._error = exc  # a bug, not an outage: the loop raises it at its next write
                _log.error("MLflow write failed: %s", exc)
            if outage:
                _log.warning(
                    "MLflow at %s answers again; writing %d queued record(s)",
                    self.where,
                    len(self.pending),
                )
                outage = False
            with self._cv:
                self.pending.popleft()
                self._cv.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def is_outage(exc: BaseException) -> bool:
    """Did this call fail because the tracking server could not be reached (not because it refused)?"""
    seen = exc
    while seen is not None:
        if isinstance(
            seen, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)
        ):
            return True
        if isinstance(seen, MlflowException):
            text = str(seen)
            if (
                "Max retries exceeded" in text
                or "Connection refused" in text
                or "timed out" in text
            ):
                return True
            if seen.get_http_status_code() in (502, 503, 504):
                return True
        seen = seen.__cause__ or seen.__context__
    return False
