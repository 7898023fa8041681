"""The dispatch loop: keep the cluster busy, hand each trial's events to listeners, stop on a budget.

Asks for a new trial the moment one finishes (``ray.wait`` on whatever is in flight), never
waiting for a batch. While the cluster is full, the next trial is already asked and its spec
built, so a freed worker gets it before the finished trial is even told. Stops asking when a
budget is met (trials, wall-clock deadline, a listener's stop such as no hypervolume gain for N
trials) or a signal arrives; then lets running trials finish, up to a grace period, and fails the
rest with the reason.

The loop only dispatches and collects, as Ray Tune's controller does: the study's tell, the
front, MLflow and the progress line are ``Listener``s (``orchestrator._listeners``).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from optuna.trial import Trial

from workers import TrialResult, TrialStatus

from ._ask import TrialSpec
from ._config import Config
from ._study import NOT_STARTED

Ask = Callable[[], tuple[Trial, TrialSpec]]  # a new trial and its spec (what the worker gets)
Submit = Callable[[TrialSpec], ray.ObjectRef]  # a spec -> the Ray task running it
Ended = tuple[ray.ObjectRef, Trial, TrialSpec]  # a trial's task ended, not yet read


@dataclass(frozen=True)
class Tally:
    """Where the search stands when a trial completes: what the progress line shows."""

    counts: Mapping[str, int]  # trials finished this run, by status
    in_flight: int  # dispatched, not yet collected
    running: int | None  # of those, begun on a worker and not ended; None: the board did not answer
    queued: int  # of those, waiting for a worker (in Ray's queue, or for resources)

    @property
    def done(self) -> int:
        return sum(self.counts.values())


class Listener:
    """Hooks on a search's events; each does nothing unless overridden.

    ``on_trial_result`` runs before the freed workers get new trials (keep it quick: the sampler
    needs it), ``on_trial_complete`` after (slow work: MLflow writes, the console)."""

    def on_search_start(self) -> None:
        """The loop is about to dispatch its first trial."""

    def on_trial_start(self, trial: Trial, in_flight: int) -> None:
        """``trial`` went to Ray; ``in_flight`` counts it with every trial not yet collected."""

    def on_trial_result(self, trial: Trial, result: TrialResult) -> None:
        """``trial`` ended with ``result`` (finished, failed, timed out or cancelled)."""

    def on_trial_complete(self, result: TrialResult, tally: Tally) -> None:
        """``result`` is told; the freed workers already have new trials."""

    def on_trial_dropped(self, trial: Trial, result: TrialResult) -> None:
        """``trial`` was asked ahead and will never run: not counted, not recorded."""

    def on_stopping(self, reason: str, grace_s: float, in_flight: int) -> None:
        """No more trials: the ``in_flight`` ones get up to ``grace_s`` to finish."""

    def on_signal(self, name: str) -> None:
        """SIGTERM or SIGINT arrived (a second one stops waiting for running trials)."""

    def should_stop(self) -> str | None:
        """A reason to stop asking for trials (e.g. "stall"), checked before each dispatch."""
        return None

    def on_search_end(self, reason: str) -> None:
        """The loop returns ``reason``; nothing is in flight any more."""


@dataclass(frozen=True)
class Limits:
    """The budgets and the cluster share one search's loop works within."""

    trials: int  # trials this run asks for (the study's budget less what it already finished)
    concurrency: int | str  # trials in flight at once, or "auto": what the free resources allow
    resources: Any  # the config's Resources: what one trial holds
    deadline_s: float | None = None
    trial_timeout_s: float | None = None
    grace_s: float = 0.0

    @classmethod
    def of(cls, config: Config, trials: int) -> Limits:
        s = config.search
        return cls(
            trials, s.concurrency, config.resources, s.deadline_s, s.trial_timeout_s, s.grace_s
        )

    def capacity(self, in_flight: int) -> int:
        if self.concurrency != "auto":
            return int(self.concurrency)
        # As many as the cluster's free trial resources allow right now, at least one.
        r, free = self.resources, ray.available_resources()
        fits = (
            int(free.get("GPU", 0) // r.num_gpus)
            if r.num_gpus
            else int(free.get("CPU", 0) // r.num_cpus)
        )
        return max(1, in_flight + fits)

    def queue_in_ray(self, in_flight: int) -> bool:
        """One trial may wait in Ray's queue when the cluster is full and could never run more
        trials at once than we allow: it then never runs beyond ``concurrency``."""
        slots = cluster_slots(trial_request(self.resources))
        limit = slots if self.concurrency == "auto" else int(self.concurrency)
        return slots <= limit and in_flight == limit


class Loop:
    """Dispatches trials from ``ask`` through ``submit`` and hands their events to ``listeners``."""

    def __init__(
        self, ask: Ask, submit: Submit, listeners: Sequence[Listener], limits: Limits, board: Any
    ) -> None:
        self.ask, self.submit, self.listeners, self.limits = ask, submit, list(listeners), limits
        self.flight = InFlight(board)
        self.counts = dict.fromkeys(TrialStatus, 0)
        self.results: list[TrialResult] = []
        self.stop_requested: str | None = None
        self.started = time.monotonic()
        self.asked, self.reason = 0, None
        # asked ahead: the next trial and its spec
        self.ready: tuple[Trial, TrialSpec] | None = None

    def run(self) -> str:
        """Run until a budget is met and nothing is in flight; returns what stopped it."""
        self.started = time.monotonic()
        self._emit("on_search_start")
        with _signals(self._on_signal):
            reason = self._loop()
        self._emit("on_search_end", reason)
        return reason

    def _loop(self) -> str:
        while True:
            self._fill()
            if self.reason is not None:
                self._unask(self.reason)
            if not self.flight:
                return self.reason or "trials"
            if self.reason in ("signal", "deadline"):
                return self._drain(self.reason)
            self._collect(timeout=1.0)
            self._ask_ahead()

    def _fill(self) -> None:
        """Dispatch trials until the cluster is full or a budget is met."""
        # A signal or the deadline overrides a met trial budget: once every trial is asked, the
        # trials in flight still get only the grace period (and a second signal stops waiting).
        if self.reason not in ("signal", "deadline"):
            self.reason = self._urgent_reason() or self.reason or self._budget_reason()
        while self.reason is None and len(self.flight) < self.limits.capacity(len(self.flight)):
            self._dispatch()

    def _dispatch(self) -> None:
        """Dispatch one trial, charge it to what this run asks, and see whether a budget is met."""
        trial, spec = self.ready or self.ask()
        self.ready = None
        self.flight.add(self.submit(spec), trial, spec)
        self._emit("on_trial_start", trial, len(self.flight))
        self.asked += 1
        self.reason = self._budget_reason()

    def _urgent_reason(self) -> str | None:
        """A signal or a passed deadline: the search stops whatever else is left to do."""
        if self.stop_requested:
            return "signal"
        deadline = self.limits.deadline_s
        if deadline is not None and time.monotonic() - self.started >= deadline:
            return "deadline"
        return None

    def _budget_reason(self) -> str | None:
        if reason := self._urgent_reason():
            return reason
        for listener in self.listeners:
            if reason := listener.should_stop():
                return reason
        return "trials" if self.asked >= self.limits.trials else None

    def _ask_ahead(self) -> None:
        """While every worker is busy, ask for the next trial now (the sampler counts it as
        running), so the next free worker waits only for a submit, not for ask and tell.

        Where the cluster cannot run more trials than ``concurrency`` anyway, the trial goes to
        Ray at once: it waits in Ray's queue and starts the instant a worker frees, without a
        round trip through this loop (the driver hands the freed worker's lease straight to it).
        Elsewhere it waits here, for the loop to see the next free worker."""
        n = len(self.flight)
        if (
            self.ready is None
            and self.reason is None
            and self.asked < self.limits.trials
            and n >= self.limits.capacity(n)
        ):
            self.ready = self.ask()
            if self.limits.queue_in_ray(n):
                self._dispatch()

    def _unask(self, reason: str) -> None:
        """A trial asked ahead that will not run: failed, not charged to the budget, not recorded."""
        if self.ready is not None:
            (trial, spec), self.ready = self.ready, None
            why = f"{reason}: {NOT_STARTED}: asked ahead when the search stopped"
            self._emit("on_trial_dropped", trial, failed(trial.number, spec, why))

    def _collect(self, timeout: float) -> None:
        ended = self.flight.wait(timeout)
        if self.ready is not None:
            self._fill()  # the trial asked ahead goes to the freed worker before anything else
        finished = [(trial, self.flight.result(ref, trial, spec)) for ref, trial, spec in ended]
        for trial, result in finished:
            self._told(trial, result)
        if finished:
            # The sampler knows the results: give the freed workers new trials first, then record
            # (MLflow writes take far longer than ask + dispatch, and workers would idle meanwhile).
            self._fill()
            self._ask_ahead()
        for _, result in finished:
            self._complete(result)
        limit = self.limits.trial_timeout_s
        for trial, result in self.flight.cancel_overdue(limit) if limit is not None else []:
            self._told(trial, result)
            self._complete(result)

    def _drain(self, reason: str) -> str:
        """Let running trials finish for up to the grace period, then fail the rest."""
        grace = self.limits.grace_s
        self._emit("on_stopping", reason, grace, len(self.flight))
        deadline = time.monotonic() + grace
        while self.flight and time.monotonic() < deadline and self.stop_requested != "twice":
            self._collect(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        for trial, result in self.flight.cancel_all(reason):
            self._told(trial, result)
            self._complete(result)
        return reason

    def _told(self, trial: Trial, result: TrialResult) -> None:
        self.counts[result.status] = self.counts.get(result.status, 0) + 1
        self._emit("on_trial_result", trial, result)

    def _complete(self, result: TrialResult) -> None:
        self._emit("on_trial_complete", result, self.flight.tally(self.counts))
        result.model_bytes = None  # recorded; keeps the driver's memory flat over long searches
        self.results.append(result)

    def _on_signal(self, name: str) -> None:
        self.stop_requested = "twice" if self.stop_requested else "signal"
        self._emit("on_signal", name)

    def _emit(self, hook: str, *args: Any) -> None:
        for listener in self.listeners:
            getattr(listener, hook)(*args)


class InFlight:
    """The trials dispatched and not yet collected, and what the front board knows of them (which
    a worker has begun: a trial waiting for one is neither hung nor charged to the budget)."""

    def __init__(self, board: Any) -> None:
        self.board = board
        self.refs: dict[ray.ObjectRef, tuple[Trial, TrialSpec, float]] = {}
        self.starts_asked: ray.ObjectRef | None = None  # the board's start times, asked ahead

    def __len__(self) -> int:
        return len(self.refs)

    def add(self, ref: ray.ObjectRef, trial: Trial, spec: TrialSpec) -> None:
        self.refs[ref] = (trial, spec, time.monotonic())

    def wait(self, timeout: float) -> list[Ended]:
        """The trials that ended within ``timeout`` (at most one), no longer in flight."""
        done, _ = ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if done:  # for the progress line: which trials in flight have begun (see tally)
            self.starts_asked = self.board.start_times.remote()
        return [(ref, *self.refs.pop(ref)[:2]) for ref in done]

    @staticmethod
    def result(ref: ray.ObjectRef, trial: Trial, spec: TrialSpec) -> TrialResult:
        """What an ended trial's task returned, or a failure saying why it returned nothing."""
        try:
            return ray.get(ref)
        except Exception as exc:  # the worker died past its retries, or the task was cancelled
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return failed(trial.number, spec, f"{type(exc).__name__}: {first}")

    def cancel_overdue(self, limit: float) -> Iterator[tuple[Trial, TrialResult]]:
        """Cancels, one by one as the caller takes them, the trials a worker began more than
        ``limit`` seconds ago."""
        now = time.monotonic()
        waiting = [ref for ref, (_, _, queued) in self.refs.items() if now - queued > limit]
        if not waiting:
            return
        # Count from when the worker began (the board knows), not from dispatch: a trial
        # waiting for resources or for a fresh worker process is not hung.
        starts = ray.get(self.board.start_times.remote())
        for ref in waiting:
            began = starts.get(self.refs[ref][0].number)
            if began is not None and time.time() - began > limit:
                yield self._cancel(ref, f"timeout: still running after {limit:.0f} s; cancelled")

    def cancel_all(self, reason: str) -> Iterator[tuple[Trial, TrialResult]]:
        """Cancels, one by one as the caller takes them, every trial in flight."""
        starts = ray.get(self.board.start_times.remote())
        for ref, (trial, _, _) in list(self.refs.items()):
            # A trial still queued (waiting for a free worker) never ran: it is not charged to the
            # budget, and a resumed search asks for it again.
            why = "still running when" if trial.number in starts else f"{NOT_STARTED}: queued when"
            yield self._cancel(ref, f"{reason}: {why} the search stopped")

    def _cancel(self, ref: ray.ObjectRef, reason: str) -> tuple[Trial, TrialResult]:
        ray.cancel(ref, force=True)
        trial, spec, _ = self.refs.pop(ref)
        return trial, failed(trial.number, spec, reason)

    def tally(self, counts: Mapping[str, int]) -> Tally:
        """Trials in flight that a worker has begun (the board knows) and not yet ended, and those
        still waiting for one. The board was asked when the finished trial came in (``wait``), so
        its answer is here by now: no round trip."""
        n, snapshot = len(self.refs), dict(counts)
        if not n:
            return Tally(snapshot, 0, 0, 0)
        asked, self.starts_asked = self.starts_asked, None
        try:
            starts = ray.get(asked or self.board.start_times.remote(), timeout=5)
        except ray.exceptions.RayError:  # the board is gone with its node: this is only a display
            return Tally(snapshot, n, None, 0)
        refs = list(self.refs)
        # ended but not yet collected
        ended, _ = ray.wait(refs, num_returns=n, timeout=0, fetch_local=False)
        begun = [ref for ref, (trial, _, _) in self.refs.items() if trial.number in starts]
        return Tally(snapshot, n, len(set(begun) - set(ended)), n - len(begun))


@contextmanager
def _signals(on_signal: Callable[[str], None]) -> Iterator[None]:
    """SIGTERM/SIGINT: stop asking and drain; a second one stops waiting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        on_signal(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def trial_request(r: Any) -> dict[str, float]:
    """The countable resources one trial holds; none when a label selector decides where it runs
    (the totals cannot say how many trials its nodes hold)."""
    if r.label_selector:
        return {}
    wants = {"CPU": r.num_cpus, "GPU": r.num_gpus, **r.custom}
    return {name: float(amount) for name, amount in wants.items() if amount}


def cluster_slots(request: dict[str, float]) -> float:
    """How many trials the whole cluster could run at once (its total resources, not what is free
    now); unbounded when a trial asks for nothing countable (a label selector, no resources)."""
    if not request:
        return float("inf")
    total = ray.cluster_resources()
    return min(total.get(name, 0.0) // amount for name, amount in request.items())


def failed(number: int, spec: TrialSpec, reason: str) -> TrialResult:
    """A failed result for a trial that produced none (cancelled, timed out, its worker died)."""
    return TrialResult(number=number, status=TrialStatus.FAILED, plan=spec.plan, reason=reason)
