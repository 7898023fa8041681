"""What happens around the dispatch loop, one listener each: the study's tell, the front and its
hypervolume, MLflow, and the console's progress line (see ``Listener`` in ``_loop``).

They run in the order given to the loop, so the study is told before the front is read, and the
front is current before MLflow and the progress line show it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial

from workers import TrialLatency, TrialResult, TrialStatus

from ._config import Config
from ._loop import Ask, Limits, Listener, Loop, Submit, Tally
from ._pareto import front, front_table, hypervolume, points
from ._report import front_views
from ._study import finished_count, save_latency, tell
from ._tracking import SearchRecorder

FRONT_REFRESH_S = 30.0  # the front's table and plot on the parent run are at most this stale


class StudyTeller(Listener):
    """Tells the study each result (the sampler learns from it) and keeps its latencies."""

    def __init__(self, study: optuna.Study, config: Config) -> None:
        self.study, self.config = study, config
        self.states: dict[int, str] = {}  # trial number -> Optuna's state at tell, until recorded

    def on_trial_result(self, trial: Trial, result: TrialResult) -> None:
        frozen = tell(self.study, trial, result, self.config)
        save_latency(self.study, self.config, result)
        self.states[result.number] = frozen.state.name

    def on_trial_dropped(self, trial: Trial, result: TrialResult) -> None:
        tell(self.study, trial, result, self.config)


class FrontKeeper(Listener):
    """The study's Pareto front after each tell, its hypervolume, and the stall budget; tells
    the board (workers reject dominated plans against it)."""

    def __init__(
        self,
        study: optuna.Study,
        board: Any,
        base: Mapping[str, float],
        floor: float,
        stall_trials: int | None = None,
    ) -> None:
        self.study, self.board, self.base, self.floor = study, board, base, floor
        self.stall_trials = stall_trials
        self.current: list[FrozenTrial] = []  # the front as of the last tell
        self.hv = self.best_hv = 0.0
        self.since_gain = 0  # results told since the hypervolume last grew

    def on_trial_result(self, trial: Trial, result: TrialResult) -> None:
        self.current = front(self.study, self.base)
        self.board.update.remote([(t.values[0], t.values[1]) for t in self.current])
        self.hv = hypervolume(points(self.current), self.base["latency_ms"], self.floor)
        if self.hv > self.best_hv + 1e-12:
            self.best_hv, self.since_gain = self.hv, 0
        else:
            self.since_gain += 1

    def should_stop(self) -> str | None:
        stalled = self.stall_trials is not None and self.since_gain >= self.stall_trials
        return "stall" if stalled else None


class TrackingListener(Listener):
    """MLflow's side of each result: the child run, the pareto tags, the front's artifacts and the
    hypervolume series on the parent run."""

    def __init__(
        self,
        recorder: SearchRecorder,
        teller: StudyTeller,
        keeper: FrontKeeper,
        base: dict[str, float],
        config: Config,
    ) -> None:
        self.recorder, self.teller, self.keeper, self.base, self.config = (
            recorder,
            teller,
            keeper,
            base,
            config,
        )
        self.progress_logged: dict[str, float] = {}
        self.front_key: tuple[int, ...] = ()
        self.front_logged = -FRONT_REFRESH_S

    def on_trial_complete(self, result: TrialResult, tally: Tally) -> None:
        state = self.teller.states.pop(result.number, "")
        self.recorder.log_trial(result, self.base["latency_ms"], state)
        current = self.keeper.current
        self.recorder.mark_front(t.number for t in current)
        self._refresh_front_artifacts(current)
        progress = {"hypervolume": self.keeper.hv, "front_size": len(current)}
        if progress != self.progress_logged:  # a step series of changes: one write per change
            self.recorder.log_progress(progress, step=tally.done)
            self.progress_logged = progress

    def _refresh_front_artifacts(self, current: list[FrozenTrial]) -> None:
        """Re-log the front table and plot when the front changed, at most every FRONT_REFRESH_S."""
        key = tuple(t.number for t in current)
        if key == self.front_key or time.monotonic() - self.front_logged < FRONT_REFRESH_S:
            return
        self.front_key, self.front_logged = key, time.monotonic()
        study = self.teller.study
        self.recorder.log_front(
            front_table(study, self.base), front_views(study, self.base, self.config)
        )


class ProgressLine(Listener):
    """The console's two lines per finished trial, and what stopping is waiting for."""

    def __init__(
        self, out: Callable[[str], None], keeper: FrontKeeper, before: int, total: int
    ) -> None:
        self.out, self.keeper = out, keeper
        self.before = before  # trials the study had finished before this run
        self.total = total  # trials this run will finish
        self.started = time.monotonic()

    def on_search_start(self) -> None:
        self.started = time.monotonic()

    def on_trial_complete(self, result: TrialResult, tally: Tally) -> None:
        self.out(self.line(result, tally))

    def on_stopping(self, reason: str, grace_s: float, in_flight: int) -> None:
        self.out(
            f"stopping ({reason}): waiting up to {grace_s:.0f} s for {in_flight} running trial(s)"
        )

    def on_signal(self, name: str) -> None:
        self.out(f"received {name}: finishing running trials, then stopping")

    def line(self, r: TrialResult, tally: Tally) -> str:
        done, current = tally.done, self.keeper.current
        total = max(self.total, done)
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * max(0, total - done) if done else 0.0
        shown, of = self.before + done, self.before + total  # the study's totals, as on resume
        acc = f"{r.accuracy:.4f}" if r.accuracy is not None else "-"
        lat = f"{r.latency.median_ms:.3f} ms" if r.latency else "-"
        best = ""
        if current:
            fastest_good = max(current, key=lambda t: (t.values[0], -t.values[1]))
            best = f", best {fastest_good.values[0]:.4f} @ {fastest_good.values[1]:.3f} ms"
        tail = f"  ({r.reason.splitlines()[0][:120]})" if r.reason else _drift_note(r.latency)
        counts = " ".join(f"{status} {tally.counts[status]}" for status in TrialStatus)
        return (
            f"[{shown}/{of}] trial {r.number} {r.status}: acc {acc}, {lat}{tail}\n"
            f"        {counts} | {_flight(tally)} | front {len(current)}"
            f"{best} | {_clock(elapsed)} elapsed, ETA {_clock(eta)}"
        )


def search_loop(
    ask: Ask,
    submit: Submit,
    study: optuna.Study,
    recorder: SearchRecorder,
    board: Any,
    base: dict[str, float],
    floor: float,
    progress: Callable[[str], None],
) -> Loop:
    """A search's dispatch loop over what ``study`` has left of its budget (a resumed search
    counts on), with its listeners in order: tell the study, the front, MLflow, the console."""
    config = recorder.config
    before = finished_count(study)
    limits = Limits.of(config, config.search.trials - before)
    teller = StudyTeller(study, config)
    keeper = FrontKeeper(study, board, base, floor, config.search.stall_trials)
    listeners = [
        teller,
        keeper,
        TrackingListener(recorder, teller, keeper, base, config),
        ProgressLine(progress, keeper, before, limits.trials),
    ]
    return Loop(ask, submit, listeners, limits, board)


def _flight(tally: Tally) -> str:
    if tally.running is None:  # the board did not answer: say only what the loop itself knows
        return f"in flight {tally.in_flight}"
    return f"running {tally.running}" + (f", queued {tally.queued}" if tally.queued else "")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def _drift_note(latency: TrialLatency | None) -> str:
    """A target that ran the base model far from its calibration while timing this trial is busy
    or changed: say so (the paired figure cancels it; the raw one in MLflow does not)."""
    drift = latency.drift if latency else None
    if not drift or latency.cached or 0.8 <= drift <= 1.25:
        return ""
    return f"  (target busy: the base model ran {drift:.2f}x its calibration; paired figure kept)"
