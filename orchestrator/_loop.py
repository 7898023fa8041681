"""The dispatch loop: keep the cluster busy, tell results as they come, stop on a budget.

Asks for a new trial the moment one finishes (``ray.wait`` on whatever is in flight), never
waiting for a batch. While the cluster is full, the next trial is already asked and its spec
built, so a freed worker gets it before the finished trial is even told. Stops asking when a budget is met (trials, wall-clock deadline, no
hypervolume gain for N trials) or a signal arrives; then lets running trials finish, up to a
grace period, and fails the rest with the reason.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray
from optuna.trial import Trial

from search_space import PruningPlan, suggest_plan, suggest_recovery
from workers import COMPLETE, FAILED, INFEASIBLE, REJECTED, STATUSES, STOPPED, TrialResult

from ._pareto import front, front_table, hypervolume, points
from ._report import front_views
from ._study import NOT_STARTED, finished_count, save_latency, tell

Progress = Callable[[str], None]
FRONT_REFRESH_S = 30.0  # the front's table and plot on the parent run are at most this stale


class Loop:
    def __init__(self, ctx: Any, spec: Callable[[int, Any], dict], progress: Progress) -> None:
        self.ctx, self.spec, self.progress = ctx, spec, progress
        self.config = ctx.config
        self.in_flight: dict[ray.ObjectRef, tuple[Trial, float]] = {}
        self.counts = dict.fromkeys(STATUSES, 0)
        self.results: list[TrialResult] = []
        self.stop_requested: str | None = None
        self.started = time.monotonic()
        self.best_hv, self.since_gain, self.hv = 0.0, 0, 0.0
        self.asked, self.remaining, self.reason = 0, 0, None
        self.front_key: tuple[int, ...] = ()
        self.current: list = []  # the front as of the last tell
        self.progress_logged: dict[str, float] = {}
        self.ready: tuple[Trial, dict] | None = None  # asked ahead: the next trial and its spec
        self.total = 0  # trials this run will finish (for the progress line)
        self.before = 0  # trials the study had finished before this run
        self.front_logged = -FRONT_REFRESH_S
        self.starts_asked: ray.ObjectRef | None = None  # the board's start times, asked ahead

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> str:
        self.before = finished_count(self.ctx.study)  # a resumed search counts on from here
        self.remaining = self.total = self.config.search.trials - self.before
        with self._signals():
            while True:
                self._fill()
                if self.reason is not None:
                    self._unask(self.reason)
                if not self.in_flight:
                    return self.reason or "trials"
                if self.reason in ("signal", "deadline"):
                    return self._drain(self.reason)
                self._collect(timeout=1.0)
                self._ask_ahead()

    def _fill(self) -> None:
        """Dispatch trials until the cluster is full or a budget is met."""
        self.reason = self.reason or self._budget_reason()
        while self.reason is None and len(self.in_flight) < self._capacity():
            self._dispatch_counted()

    def _dispatch_counted(self) -> None:
        """Dispatch one trial, charge it to what this run asks, and see whether a budget is met."""
        self._dispatch()
        self.asked += 1
        self.reason = self._budget_reason()

    def _budget_reason(self) -> str | None:
        s = self.config.search
        if self.stop_requested:
            return "signal"
        if s.deadline_s is not None and time.monotonic() - self.started >= s.deadline_s:
            return "deadline"
        if s.stall_trials is not None and self.since_gain >= s.stall_trials:
            return "stall"
        if self.asked >= self.remaining:
            return "trials"
        return None

    def _capacity(self) -> int:
        want = self.config.search.concurrency
        if want != "auto":
            return int(want)
        # As many as the cluster's free trial resources allow right now, at least one.
        r = self.config.resources
        free = ray.available_resources()
        fits = (
            int(free.get("GPU", 0) // r.num_gpus)
            if r.num_gpus
            else int(free.get("CPU", 0) // r.num_cpus)
        )
        return max(1, len(self.in_flight) + fits)

    def _drain(self, reason: str) -> str:
        """Let running trials finish for up to the grace period, then fail the rest."""
        grace = self.config.search.grace_s
        self.progress(
            f"stopping ({reason}): waiting up to {grace:.0f} s for {len(self.in_flight)} running trial(s)"
        )
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline and self.stop_requested != "twice":
            self._collect(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        starts = ray.get(self.ctx.board.start_times.remote())
        for ref, (trial, _) in list(self.in_flight.items()):
            ray.cancel(ref, force=True)
            self.in_flight.pop(ref)
            # A trial still queued (waiting for a free worker) never ran: it is not charged to the
            # budget, and a resumed search asks for it again.
            why = "still running when" if trial.number in starts else f"{NOT_STARTED}: queued when"
            self._finish(trial, _failed(trial, f"{reason}: {why} the search stopped"))
        return reason

    # -- one trial --------------------------------------------------------------------------
    def _dispatch(self) -> None:
        trial, spec = self.ready or self._ask()
        self.ready = None
        ref = self.ctx.submit(spec)
        self.in_flight[ref] = (trial, time.monotonic())

    def _ask(self) -> tuple[Trial, dict]:
        trial = self.ctx.study.ask()
        plan = suggest_plan(trial, self.ctx.space, self.ctx.discovery, self.ctx.profile)
        if fixed := trial.user_attrs.get(
            "plan"
        ):  # a screened pick: finetune exactly the plan screened
            plan = PruningPlan.from_dict(fixed)
        recovery = suggest_recovery(
            trial, self.ctx.space.recovery
        )  # how it recovers (search_space/_recovery.py)
        trial.set_user_attr("plan", plan.to_dict())
        return trial, self.spec(trial.number, plan) | {"recovery": recovery.to_dict()}

    def _ask_ahead(self) -> None:
        """While every worker is busy, ask for the next trial now (the sampler counts it as
        running), so the next free worker waits only for a submit, not for ask and tell.

        Where the cluster cannot run more trials than ``concurrency`` anyway, the trial goes to
        Ray at once: it waits in Ray's queue and starts the instant a worker frees, without a
        round trip through this loop (the driver hands the freed worker's lease straight to it).
        Elsewhere it waits here, for the loop to see the next free worker."""
        if (
            self.ready is None
            and self.reason is None
            and self.asked < self.remaining
            and len(self.in_flight) >= self._capacity()
        ):
            self.ready = self._ask()
            if self._queue_in_ray():
                self._dispatch_counted()

    def _queue_in_ray(self) -> bool:
        """One trial may wait in Ray's queue when the cluster is full and could never run more
        trials at once than we allow: it then never runs beyond ``concurrency``."""
        want = self.config.search.concurrency
        slots = cluster_slots(trial_request(self.config.resources))
        limit = slots if want == "auto" else int(want)
        return slots <= limit and len(self.in_flight) == limit

    def _unask(self, reason: str) -> None:
        """A trial asked ahead that will not run: failed, not charged to the budget, not recorded."""
        if self.ready is not None:
            trial, _ = self.ready
            self.ready = None
            tell(
                self.ctx.study,
                trial,
                _failed(trial, f"{reason}: {NOT_STARTED}: asked ahead when the search stopped"),
                self.config,
            )

    def _collect(self, timeout: float) -> None:
        done, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        finished = [(self.in_flight.pop(ref), ref) for ref in done]
        if finished:  # for the progress line: which trials in flight have begun (see _running)
            self.starts_asked = self.ctx.board.start_times.remote()
        if self.ready is not None:
            self._fill()  # the trial asked ahead goes to the freed worker before anything else
        told = [self._tell(trial, self._result(ref, trial)) for (trial, _), ref in finished]
        if told:
            # The sampler knows the results: give the freed workers new trials first, then record
            # (MLflow writes take far longer than ask + dispatch, and workers would idle meanwhile).
            self._fill()
            self._ask_ahead()
        for result, frozen, current in told:
            self._record(result, frozen, current)
        self._cancel_overdue()

    def _result(self, ref: ray.ObjectRef, trial: Trial) -> TrialResult:
        try:
            return ray.get(ref)
        except Exception as exc:  # the worker died past its retries, or the task was cancelled
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return _failed(trial, f"{type(exc).__name__}: {first}")

    def _cancel_overdue(self) -> None:
        limit = self.config.search.trial_timeout_s
        if limit is None:
            return
        now = time.monotonic()
        waiting = [ref for ref, (_, queued) in self.in_flight.items() if now - queued > limit]
        if not waiting:
            return
        # Count from when the worker began (the board knows), not from dispatch: a trial
        # waiting for resources or for a fresh worker process is not hung.
        starts = ray.get(self.ctx.board.start_times.remote())
        for ref in waiting:
            trial, _ = self.in_flight[ref]
            began = starts.get(trial.number)
            if began is not None and time.time() - began > limit:
                ray.cancel(ref, force=True)
                self.in_flight.pop(ref)
                self._finish(
                    trial, _failed(trial, f"timeout: still running after {limit:.0f} s; cancelled")
                )

    def _finish(self, trial: Trial, result: TrialResult) -> None:
        self._record(*self._tell(trial, result))

    def _tell(self, trial: Trial, result: TrialResult) -> tuple[TrialResult, Any, list]:
        """The study's side: tell, cache the latency, update the front and the stall budget."""
        ctx = self.ctx
        frozen = tell(ctx.study, trial, result, self.config)
        save_latency(ctx.study, self.config, result)
        current = self.current = front(ctx.study)
        ctx.board.update.remote([(t.values[0], t.values[1]) for t in current])
        self.counts[result.status] = self.counts.get(result.status, 0) + 1
        self.hv = hypervolume(points(current), ctx.base["latency_ms"], ctx.floor)
        if self.hv > self.best_hv + 1e-12:
            self.best_hv, self.since_gain = self.hv, 0
        else:
            self.since_gain += 1
        return result, frozen, current

    def _record(self, result: TrialResult, frozen: Any, current: list) -> None:
        """MLflow's side: the child run, the pareto tags, the front's artifacts and progress."""
        ctx = self.ctx
        ctx.recorder.log_trial(result, ctx.base["latency_ms"], frozen.state.name)
        ctx.recorder.mark_front(t.number for t in self.current)  # the front now, not at tell time
        self._refresh_front_artifacts(current)
        progress = {"hypervolume": self.hv, "front_size": len(current)}
        if (
            progress != self.progress_logged
        ):  # a step series of changes: one write per change, not per trial
            ctx.recorder.log_progress(progress, step=sum(self.counts.values()))
            self.progress_logged = progress
        result.model_bytes = None  # recorded; keeps the driver's memory flat over long searches
        self.results.append(result)
        self.progress(self._line(result, current))

    def _refresh_front_artifacts(self, current: list) -> None:
        """Re-log the front table and plot when the front changed, at most every FRONT_REFRESH_S."""
        key = tuple(t.number for t in current)
        if key == self.front_key or time.monotonic() - self.front_logged < FRONT_REFRESH_S:
            return
        self.front_key, self.front_logged = key, time.monotonic()
        base = self.ctx.base
        self.ctx.recorder.log_front(
            front_table(self.ctx.study, base),
            front_views(self.ctx.study, base, self.config),
        )

    def _line(self, r: TrialResult, current: list) -> str:
        done = sum(self.counts.values())
        total = max(self.total, done)
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * max(0, total - done) if done else 0.0
        shown, of = self.before + done, self.before + total  # the study's totals, as on resume
        acc = f"{r.accuracy:.4f}" if r.accuracy is not None else "-"
        lat = f"{r.latency['median_ms']:.3f} ms" if r.latency else "-"
        best = ""
        if current:
            fastest_good = max(current, key=lambda t: (t.values[0], -t.values[1]))
            best = f", best {fastest_good.values[0]:.4f} @ {fastest_good.values[1]:.3f} ms"
        tail = f"  ({r.reason.splitlines()[0][:120]})" if r.reason else _drift_note(r.latency)
        c = self.counts
        return (
            f"[{shown}/{of}] trial {r.number} {r.status}: acc {acc}, {lat}{tail}\n"
            f"        complete {c[COMPLETE]} infeasible {c[INFEASIBLE]} rejected {c[REJECTED]} "
            f"stopped {c[STOPPED]} failed {c[FAILED]} | {self._running()} | front {len(current)}"
            f"{best} | {_clock(elapsed)} elapsed, ETA {_clock(eta)}"
        )

    def _running(self) -> str:
        """Trials in flight that a worker has begun (the board knows) and not yet ended, and those
        still waiting for one (in Ray's queue, or for resources). The board was asked when the
        finished trial came in (``_collect``), so its answer is here by now: no round trip."""
        if not self.in_flight:
            return "running 0"
        asked, self.starts_asked = self.starts_asked, None
        try:
            starts = ray.get(asked or self.ctx.board.start_times.remote(), timeout=5)
        except (
            ray.exceptions.RayError
        ):  # the board is gone with its node: this line is only a display
            return f"in flight {len(self.in_flight)}"
        refs = list(self.in_flight)
        ended, _ = ray.wait(
            refs, num_returns=len(refs), timeout=0, fetch_local=False
        )  # not yet collected
        begun = [ref for ref, (trial, _) in self.in_flight.items() if trial.number in starts]
        running = len(set(begun) - set(ended))
        queued = len(refs) - len(begun)
        return f"running {running}" + (f", queued {queued}" if queued else "")

    # -- signals ----------------------------------------------------------------------------
    @contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT: stop asking and drain; a second one stops waiting."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            self.stop_requested = "twice" if self.stop_requested else "signal"
            self.progress(
                f"received {signal.Signals(signum).name}: finishing running trials, then stopping"
            )

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


def _failed(trial: Trial, reason: str) -> TrialResult:
    return TrialResult(
        number=trial.number, status=FAILED, plan=trial.user_attrs["plan"], reason=reason
    )


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def _drift_note(latency: dict | None) -> str:
    """A target that ran the base model far from its calibration while timing this trial is busy
    or changed: say so (the paired figure cancels it; the raw one in MLflow does not)."""
    drift = (latency or {}).get("drift")
    if not drift or latency.get("cached") or 0.8 <= drift <= 1.25:
        return ""
    return f"  (target busy: the base model ran {drift:.2f}x its calibration; paired figure kept)"
