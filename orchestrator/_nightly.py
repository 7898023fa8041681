"""``prunesearch nightly``: the command a scheduler calls every night, idempotent for a date.

Each night is its own study, ``NAME-YYYYMMDD``, in the config's storage; all nights log to one
MLflow experiment and register into one model. A night is planned from the nights before it:

- tonight already finished: nothing to do; started but not finished: resume it;
- the last finished night has the same base model (content hash) and target: warm-start from
  its front, and reuse its latency cache and sensitivity scan;
- the base model or target changed: a fresh study, and it says so.

After the search, tonight's front is compared with the last night's (hypervolume, best latency
within ``tracking.alias_drop`` of the base accuracy), written to the parent run, and the
``nightly.alias`` moves to tonight's pick only if it beats the current one by ``nightly.gate``,
and never after a partial or failed run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from workers import state_digest

from ._config import Config, WarmStart
from ._plots import trend_figure
from ._search import Outcome, prepare, run_search
from ._sensitivity import STUDY_ATTR as SENSITIVITY_ATTR
from ._study import _target_key, open_study
from ._tracking import log_bytes

ATTR = "nightly"  # study user attr: {date, base_hash, target_key, state, hypervolume, best_ms}
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Night:
    study: str
    date: str  # ISO date
    state: str  # running | finished | partial
    base_hash: str
    target_key: str
    hypervolume: float | None = None
    best_ms: float | None = None


@dataclass(frozen=True)
class NightPlan:
    study: str
    action: str  # done | run | resume
    previous: Night | None  # the night to warm-start from and compare with (same base and target)
    message: str


def plan_night(
    name: str, day: dt.date, base_hash: str, target_key: str, nights: Sequence[Night]
) -> NightPlan:
    study = f"{name}-{day:%Y%m%d}"
    tonight = next((n for n in nights if n.study == study), None)
    if tonight is not None and tonight.state == "finished":
        return NightPlan(study, "done", None, f"{study} already finished; nothing to do")
    earlier = [n for n in nights if n.date < day.isoformat() and n.state == "finished"]
    last = max(earlier, key=lambda n: n.date, default=None)
    action = "resume" if tonight is not None else "run"
    verb = f"resuming {study}" if tonight is not None else f"starting {study}"
    if last is None:
        return NightPlan(study, action, None, f"{verb}: no earlier finished night, a cold start")
    if last.base_hash != base_hash:
        return NightPlan(
            study,
            action,
            None,
            f"{verb}: the base model changed since {last.study} "
            f"(hash {last.base_hash} -> {base_hash}): a fresh study, no warm start",
        )
    if last.target_key != target_key:
        return NightPlan(
            study,
            action,
            None,
            f"{verb}: the target changed since {last.study}: a fresh study, no warm start",
        )
    return NightPlan(
        study, action, last, f"{verb}: warm start from {last.study} (same base model and target)"
    )


def run_nightly(config: Config, day: dt.date, progress: Progress = print) -> int:
    """0: tonight is done (now or before); 1: the run ended partial (signal or unlogged results)."""
    prepared = prepare(config)  # every check before anything is written
    base_hash = state_digest(prepared.task.model)[:16]  # a new checkpoint starts fresh
    plan = plan_night(config.name, day, base_hash, _target_key(config.target), nights(config))
    progress(plan.message)
    if plan.action == "done":
        return 0
    night_config = _night_config(config, plan)
    study = open_study(night_config)
    if plan.previous is not None and not study.trials:
        _reuse_caches(config.storage, plan.previous.study, study)
    night = Night(plan.study, day.isoformat(), "running", base_hash, _target_key(config.target))
    study.set_user_attr(ATTR, night.__dict__)
    outcome = run_search(replace(prepared, config=night_config), progress)
    if outcome.stopped_by == "signal" or outcome.unlogged:
        study.set_user_attr(ATTR, {**night.__dict__, "state": "partial"})
        progress(
            f"{plan.study} ended partial ({outcome.stopped_by}, {outcome.unlogged} unlogged); "
            "the alias stays; run nightly again to finish it"
        )
        return 1
    best = best_within(outcome, config.tracking.alias_drop)
    client = MlflowClient(tracking_uri=config.tracking.resolved_uri())
    _compare(client, outcome, plan.previous, best, progress)
    _log_trend(client, outcome, config, night, best)
    _gate_alias(client, night_config, outcome, best, progress)
    study.set_user_attr(
        ATTR,
        {
            **night.__dict__,
            "state": "finished",
            "hypervolume": outcome.hypervolume,
            "best_ms": best["latency_ms"] if best else None,
        },
    )
    if outcome.unregistered:  # each warned of as it failed; the scheduler must see it too
        progress(
            f"error: {len(outcome.unregistered)} front model(s) of {plan.study} not registered"
        )
        return 1
    return 0


def nights(config: Config) -> list[Night]:
    prefix = f"{config.name}-"
    out = []
    for s in optuna.get_all_study_summaries(storage=config.storage, include_best_trial=False):
        data = s.user_attrs.get(ATTR)
        if s.study_name.startswith(prefix) and isinstance(data, dict):
            out.append(Night(**{k: data.get(k) for k in Night.__dataclass_fields__}))
    return out


def best_within(outcome: Outcome, drop: float) -> dict[str, Any] | None:
    """Tonight's pick: the fastest front model within ``drop`` of the base accuracy."""
    good = [r for r in outcome.front if r["accuracy"] >= outcome.base["accuracy"] - drop]
    return min(good, key=lambda r: (r["latency_ms"], -r["accuracy"]), default=None)


def _night_config(config: Config, plan: NightPlan) -> Config:
    """One study per night; one experiment and one registered model across nights."""
    tracking = replace(
        config.tracking,
        experiment=config.experiment,
        model_name=config.tracking.model_name or config.name,
    )
    search = config.search
    if plan.previous is not None:
        search = replace(
            search,
            warm_start=WarmStart(
                study=plan.previous.study, max_trials=search.warm_start.max_trials
            ),
        )
    return replace(config, name=plan.study, tracking=tracking, search=search)


def _reuse_caches(storage: str, previous: str, study: optuna.Study) -> None:
    """Latency depends only on architecture and target, the sensitivity scan only on the base
    model: with both unchanged, last night's numbers hold tonight."""
    attrs = optuna.load_study(study_name=previous, storage=storage).user_attrs
    for key, value in attrs.items():
        if key.startswith("latency:") or key == SENSITIVITY_ATTR:
            study.set_user_attr(key, value)


def _compare(
    client: MlflowClient,
    outcome: Outcome,
    previous: Night | None,
    best: dict | None,
    progress: Progress,
) -> None:
    metrics = {"nightly_hypervolume": outcome.hypervolume}
    if best:
        metrics["nightly_best_ms"] = best["latency_ms"]
    if previous is not None:
        client.set_tag(outcome.parent_run_id, "nightly.previous", previous.study)
        if previous.hypervolume is not None:
            metrics["nightly_prev_hypervolume"] = previous.hypervolume
            metrics["nightly_hypervolume_gain"] = outcome.hypervolume - previous.hypervolume
        if previous.best_ms is not None:
            metrics["nightly_prev_best_ms"] = previous.best_ms
    for key, value in metrics.items():
        client.log_metric(outcome.parent_run_id, key, float(value))
    if previous is not None:
        progress(
            f"vs {previous.study}: hypervolume {previous.hypervolume} -> {outcome.hypervolume:.4f}, "
            f"best within the accuracy floor {previous.best_ms} -> {best['latency_ms'] if best else None} ms"
        )


def _log_trend(
    client: MlflowClient, outcome: Outcome, config: Config, tonight: Night, best: dict | None
) -> None:
    """``nightly_trend.png`` on tonight's parent run: the front over every finished night of the
    same base model and target, and tonight."""
    same = [
        n.__dict__
        for n in nights(config)
        if n.state == "finished"
        and n.study != tonight.study
        and (n.base_hash, n.target_key) == (tonight.base_hash, tonight.target_key)
    ]
    now = {
        "date": tonight.date,
        "hypervolume": outcome.hypervolume,
        "best_ms": best["latency_ms"] if best else None,
    }
    log_bytes(client, outcome.parent_run_id, "nightly_trend.png", trend_figure([*same, now]))


def _gate_alias(
    client: MlflowClient, config: Config, outcome: Outcome, best: dict | None, progress: Progress
) -> None:
    """Move ``nightly.alias`` to tonight's pick only if it is ``gate`` faster than the current one."""
    alias, gate, name = config.nightly.alias, config.nightly.gate, config.tracking.model_name
    pick = next((r for r in outcome.registered if best and r.trial == best["trial"]), None)
    if best is not None and best["trial"] in outcome.unregistered:
        verdict = f"kept: tonight's pick, trial {best['trial']}, was not registered"
    elif pick is None:
        verdict = "kept: tonight has no registered model within the accuracy floor"
    else:
        try:
            current = client.get_model_version_by_alias(name, alias)
            current_ms = float(current.tags.get("latency_ms", "inf"))
        except MlflowException:  # no alias yet
            current, current_ms = None, float("inf")
        if pick.latency_ms <= current_ms * (1 - gate):
            client.set_registered_model_alias(name, alias, pick.version)
            verdict = f"moved to version {pick.version} ({pick.latency_ms:.4f} ms)"
        else:
            verdict = (
                f"kept on version {current.version}: tonight's {pick.latency_ms:.4f} ms is not {gate:.0%} "
                f"faster than its {current_ms:.4f} ms"
            )
    client.set_tag(outcome.parent_run_id, "nightly.alias", f"{alias} {verdict}")
    progress(f"alias {alias} {verdict}")
