"""MLflow recording: one parent run per search, one child run per trial, and the front's tags.

The orchestrator is the only writer, through ``MlflowClient`` (no fluent global run state).
A trial's child run is looked up by its key before it is created, so a resumed search never
logs a trial twice.

Writes go through a queue that one background thread replays in order (``_writer``), so the
dispatch loop never waits on MLflow and an unreachable tracking server does not stop the search or
lose results; at the end the search waits up to ``FLUSH_WAIT_S``. The study is the record; MLflow
is its view, so what cannot be replayed is reported, never silent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from search_space import PruningPlan
from workers import TrialLatency, TrialResult, TrialStatus

from ._config import Config
from ._picks import registry_picks
from ._report import REPORT, FrontViews, render_report, run_link
from ._schema import flatten
from ._secrets import mask, mask_text
from ._sqlite import use_fast_sqlite
from ._study import ranking_label
from ._writer import QueuedWriter

KIND, STUDY, TRIAL, PARETO, STATE = (
    "prunesearch.kind",
    "prunesearch.study",
    "prunesearch.trial",
    "pareto",
    "prunesearch.state",
)
# MLflow's UI reads this experiment tag to pick the experiment's landing page.
EXPERIMENT_KIND, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"
FLUSH_WAIT_S = 120.0  # at the end, how long to wait for an unreachable server before giving up
_log = logging.getLogger("prunesearch.tracking")


class SearchRecorder:
    """A search's MLflow records: its parent run (config, base figures, front, progress, end
    state) and, through ``TrialRuns``, one child run per trial."""

    def __init__(self, config: Config) -> None:
        # MLflow's own HTTP retries back off for minutes per call; we queue instead, so keep them short.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.config = config
        self.uri = config.tracking.resolved_uri()
        use_fast_sqlite()  # before MLflow opens its engine (sqlite:// URIs only)
        self.writer = QueuedWriter(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.experiment_id = _experiment(self.client, config.experiment)
        self.parent_id: str | None = None
        self.runs = TrialRuns(self.client, self.experiment_id, config)

    @property
    def children(self) -> dict[int, str]:
        """Trial number -> its child run's id, for every trial logged in full."""
        return self.runs.children

    # -- the parent run -------------------------------------------------------------------
    def start(self, base: Mapping[str, float]) -> str:
        """One parent run per study: a resumed or extended search continues it, whatever state
        the last run left it in (finished, interrupted, cut mid-write); only a new study starts
        one. Children that an older version filed under another parent of the study move here,
        so the parent's front and table cover every trial."""
        parents = sorted(
            self._runs(f"tags.`{KIND}` = 'search'"),
            key=lambda r: (r.info.start_time or 0, r.info.run_id),
        )
        if parents:
            self.parent_id = parents[0].info.run_id
            self.client.set_tag(self.parent_id, STATE, "running")
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{self.config.name} {time.strftime('%Y-%m-%d %H:%M')}",
                tags={KIND: "search", STUDY: self.config.name, STATE: "running"},
            )
            self.parent_id = run.info.run_id
            self._log_parent_config(base)
        self.runs.load(self.parent_id, self._runs(f"tags.`{KIND}` = 'trial'"))
        return self.parent_id

    def _runs(self, where: str) -> list:
        """Every run of this study's search that matches ``where``."""
        flt = f"{where} and tags.`{STUDY}` = '{self.config.name}'"
        return _all_runs(self.client, self.experiment_id, flt)

    def _log_parent_config(self, base: Mapping[str, float]) -> None:
        plain = mask(self.config.to_dict())  # every URL password and secret-named key
        params = [Param(k, _short(v)) for k, v in flatten(plain).items()]
        tags = [
            RunTag("optuna.study", self.config.name),
            RunTag("optuna.storage", mask_text(self.config.storage)),
        ]
        self.client.log_batch(
            self.parent_id,
            metrics=_metrics({f"base_{k}": v for k, v in base.items()}),
            params=params,
            tags=tags,
        )
        self.client.log_text(self.parent_id, yaml.safe_dump(plain, sort_keys=False), "config.yaml")

    # -- calls written in the background, through outages (_writer) ------------------------
    def _do(self, fn: Any, *args: Any) -> None:
        self.writer.put(fn, *args)

    def flush(self, wait_s: float = 0.0) -> int:
        """Wait up to ``wait_s`` for every queued call to be written. Returns how many remain."""
        return self.writer.flush(wait_s)

    # -- one child run per trial ----------------------------------------------------------
    def log_trial(
        self, result: TrialResult, base_latency_ms: float, state: str, recovered: bool = False
    ) -> None:
        """``recovered``: rebuilt from the study after the driver died between tell and record
        (the weights died with it)."""
        # A copy: the loop drops the model bytes from its own result once this returns.
        self._do(self.runs.log, dataclasses.replace(result), base_latency_ms, state, recovered)

    def log_progress(self, metrics: Mapping[str, float], step: int) -> None:
        """The front's hypervolume and size over time, as stepped metrics of the parent run."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._do(lambda: self.client.log_batch(self.parent_id, metrics=batch))

    def mark_front(self, front_numbers: Iterable[int]) -> None:
        self._do(self.runs.mark_front, set(front_numbers))

    def log_front(self, table: list[dict[str, Any]], figure: FrontViews | bytes | None) -> None:
        """The front as CSV and JSON, its plot and its interactive report, on the parent run
        (overwritten each time)."""
        self._do(self._log_front, list(table), figure)

    def _log_front(self, table: list[dict[str, Any]], figure: FrontViews | bytes | None) -> None:
        self.client.log_dict(self.parent_id, table, "front.json")
        self.client.log_text(self.parent_id, _csv(table), "front.csv")
        figure_png = figure.png if isinstance(figure, FrontViews) else figure
        if isinstance(figure, FrontViews):  # here, where every logged trial's run is known
            links = {n: run_link(self.uri, self.experiment_id, r) for n, r in self.children.items()}
            self.client.log_text(self.parent_id, render_report(figure, links), REPORT)
        if figure_png:
            log_bytes(self.client, self.parent_id, "pareto.png", figure_png)

    def log_png(self, name: str, data: bytes) -> None:
        """A picture on the parent run (a sensitivity heat map, ...), written in the background."""
        self._do(log_bytes, self.client, self.parent_id, name, data)

    # -- the end ---------------------------------------------------------------------------
    def finish(
        self,
        table: list[dict[str, Any]],
        figure_png: FrontViews | bytes | None,
        metrics: Mapping[str, float],
        stopped_by: str,
    ) -> int:
        """Final front, metrics and state. Returns how many records could not be written."""
        self.log_front(table, figure_png)
        self._do(self._finish, dict(metrics), stopped_by)
        left = self.flush(wait_s=FLUSH_WAIT_S)
        if left:
            _log.warning(
                "MLflow at %s stayed unreachable: %d record(s) of search %r were not written; the "
                "Optuna study holds every trial, and rerunning the search backfills MLflow",
                self.uri,
                left,
                self.config.name,
            )
        return left

    def _finish(self, metrics: dict[str, float], stopped_by: str) -> None:
        self.client.log_batch(
            self.parent_id, metrics=_metrics(metrics), tags=[RunTag("stopped_by", stopped_by)]
        )
        if stopped_by == "signal":  # not done: the next run of this search resumes this parent
            self.client.set_tag(self.parent_id, STATE, "interrupted")
            self.client.set_terminated(self.parent_id, "KILLED")
            return
        self.client.set_tag(self.parent_id, STATE, "finished")
        self.client.set_terminated(self.parent_id, "FINISHED")


class TrialRuns:
    """One child run per trial under the parent run, found again by its tags when a search
    resumes (never logged twice), and each one's ``pareto`` tag kept equal to the study's front."""

    def __init__(self, client: MlflowClient, experiment_id: str, config: Config) -> None:
        self.client, self.experiment_id, self.config = client, experiment_id, config
        self.parent_id: str | None = None
        self.children: dict[int, str] = {}  # trial number -> run id
        self.pareto: dict[int, bool] = {}  # what each child's tag says now
        self.partial: dict[int, str] = {}  # trial number -> child run created but not yet complete

    def load(self, parent_id: str, runs: Iterable[Any]) -> None:
        """The child runs a search already has (``runs``), moved under ``parent_id`` if an older
        version filed them elsewhere; one cut mid-write is finished by the next log of its trial."""
        self.parent_id = parent_id
        for run in runs:
            number = int(run.data.tags[TRIAL])
            if run.data.tags.get("mlflow.parentRunId") != self.parent_id:
                self.client.set_tag(run.info.run_id, "mlflow.parentRunId", self.parent_id)
            if run.info.status == "RUNNING":  # cut mid-write (driver killed, disk full): finish it
                self.partial.setdefault(number, run.info.run_id)
                continue
            self.children.setdefault(number, run.info.run_id)
            self.pareto[number] = run.data.tags.get(PARETO) == "true"

    def log(
        self, result: TrialResult, base_latency_ms: float, state: str, recovered: bool = False
    ) -> str:
        if result.number in self.children:  # resumed: already logged
            return self.children[result.number]
        plan = result.plan
        run_id = (
            self.partial.get(result.number)
            or self.client.create_run(
                self.experiment_id,
                run_name=f"t{result.number:03d} r={plan.mean_ratio():.2f} "
                + f"{ranking_label(plan, result.ranked_by)}"
                + (f" -{len(plan.drop)} blocks" if plan.drop else ""),
                tags={
                    "mlflow.parentRunId": self.parent_id,
                    KIND: "trial",
                    STUDY: self.config.name,
                    TRIAL: str(result.number),
                    PARETO: "false",
                },
            ).info.run_id
        )
        self.partial[result.number] = run_id  # a replay after an outage mid-way reuses this run
        self.client.log_batch(
            run_id,
            metrics=_trial_metrics(result, base_latency_ms),
            params=_trial_params(plan, result.ranked_by)
            + [Param(f"recovery.{k}", str(v)) for k, v in result.recovery.items()],
            tags=_trial_tags(result, state, self.config.target.name, recovered),
        )
        if result.latency and (drift := result.latency.drift) and not result.latency.cached:
            # the reference's drift over the search, one point per measured trial
            self.client.log_metric(
                self.parent_id, "reference_drift", float(drift), step=max(0, result.number)
            )
        self.client.log_dict(run_id, plan.to_dict(), "plan.json")
        if result.model_bytes:
            log_bytes(self.client, run_id, "model.safetensors", result.model_bytes)
        self.client.set_terminated(
            run_id, "FAILED" if result.status == TrialStatus.FAILED else "FINISHED"
        )
        # Known only once complete: a half-logged trial (server lost mid-way) is found and
        # finished by its tag when the call is replayed.
        self.children[result.number] = run_id
        self.pareto[result.number] = False
        return run_id

    def mark_front(self, on: set[int]) -> None:
        """Make every child's ``pareto`` tag match the study's current front."""
        for number, run_id in self.children.items():
            want = number in on
            if self.pareto.get(number) != want:
                self.client.set_tag(run_id, PARETO, "true" if want else "false")
                self.pareto[number] = want


def front_from_mlflow(config: Config) -> list[dict[str, Any]]:
    """The front as MLflow records it: child runs tagged ``pareto = 'true'``, fastest first."""
    uri = config.tracking.resolved_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(config.experiment)
    if exp is None:
        raise ValueError(
            f"tracking.experiment: no MLflow experiment {config.experiment!r} in {uri}; run search "
            f"{config.name!r} first, or fix name / tracking.experiment / tracking.uri"
        )
    where = (
        f"tags.`{KIND}` = 'trial' and tags.`{STUDY}` = '{config.name}' and tags.`{PARETO}` = 'true'"
    )
    runs = client.search_runs(
        [exp.experiment_id], where, max_results=1000, order_by=["metrics.latency_ms ASC"]
    )
    picks = registry_picks(
        MlflowClient(tracking_uri=uri, registry_uri=uri), config.tracking.model_name or config.name
    )
    rows = []
    for run in runs:
        m, p = run.data.metrics, run.data.params
        pick = picks.get(run.info.run_id)
        rows.append(
            {
                "trial": int(run.data.tags[TRIAL]),
                "accuracy": round(m["accuracy"], 4),
                "latency_ms": round(m["latency_ms"], 4),
                "speedup": round(m.get("speedup", 0.0), 3),
                "macs": int(m["macs"]),
                "params": int(m["params"]),
                "criterion": p.get("ranked_by", p.get("criterion")),
                "version": pick.version if pick else None,
                "aliases": ",".join(pick.aliases) if pick else "",
                "run_id": run.info.run_id,
            }
        )
    return rows


def _experiment(client: MlflowClient, name: str) -> str:
    """The experiment, marked for model development: MLflow's UI then opens it on its runs,
    not on the GenAI overview (traces, token usage)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND: MODEL_DEVELOPMENT})
    if exp.tags.get(EXPERIMENT_KIND) != MODEL_DEVELOPMENT:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_DEVELOPMENT)
    return exp.experiment_id


def _all_runs(client: MlflowClient, experiment_id: str, where: str) -> list:
    """Every run matching ``where``, page after page."""
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], where, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _trial_metrics(result: TrialResult, base_latency_ms: float) -> list[Metric]:
    lat = result.latency
    values = {
        "accuracy": result.accuracy,
        **(_latency_metrics(lat, base_latency_ms) if lat else {}),
        "macs": result.macs,
        "params": result.params,
        "size_mb": result.size_mb,
        "finetune_epochs": len(result.epoch_accuracy),
        "train_epochs": result.train_epochs,  # all forward/backward work, comparable across recovery methods
        **{f"seconds_{k}": v for k, v in result.seconds.items()},
        **{f"latency_ms_{name}": t.median_ms for name, t in (lat.targets if lat else {}).items()},
        **{f"throughput_{name}": t.throughput for name, t in (lat.targets if lat else {}).items()},
    }
    out = _metrics(values)
    now = int(time.time() * 1000)
    out += [Metric("epoch_accuracy", float(a), now, i) for i, a in enumerate(result.epoch_accuracy)]
    return out


def _latency_metrics(lat: TrialLatency, base_latency_ms: float) -> dict[str, float | None]:
    return {
        "latency_ms": lat.median_ms,
        "latency_p90_ms": lat.p90_ms,
        "latency_cv": lat.cv,
        "throughput": lat.throughput,
        "speedup": base_latency_ms / lat.median_ms if lat.median_ms else None,
        # paired timing: the absolute figure as timed, the pairs' spread, and how far the base
        # model ran from its calibration meanwhile (a noisy target shows here, not in the front)
        "latency_raw_ms": lat.raw_median_ms,
        "latency_ratio_spread": lat.ratio_spread,
        "latency_reference_drift": lat.drift,
    }


def _trial_params(plan: PruningPlan, ranked_by: Mapping[str, int]) -> list[Param]:
    keys = ("criterion", "round_to", "global_pruning", "isomorphic", "iterative_steps")
    return [Param(k, str(getattr(plan, k))) for k in keys] + [
        # what ranked the groups as pruned: l1 where the plan's criterion could not (bn_scale
        # without BatchNorm); `criterion` above stays the plan's, as sampled
        Param("ranked_by", str(ranking_label(plan, ranked_by))),
        Param("mean_ratio", f"{plan.mean_ratio():.4f}"),
        Param(
            "max_ratio", f"{plan.max_group_ratio():.4f}"
        ),  # the largest group's ratio, not the cap
        Param("units", str(len(plan.ratios))),
        # Residual blocks replaced by the identity (their names are in the plan artifact).
        Param("blocks_dropped", str(len(plan.drop))),
    ]


def _trial_tags(
    result: TrialResult, state: str, target: str, recovered: bool = False
) -> list[RunTag]:
    node, cached = (result.latency.node, result.latency.cached) if result.latency else (None, None)
    tags = {
        # The outcome in the words of the progress line and `prunesearch pareto` (complete,
        # infeasible, rejected, stopped, failed), not Optuna's state names (PRUNED).
        "state": TrialStatus.FAILED if state == "FAIL" else result.status,
        "status": result.status,
        "signature": result.signature or "",
        "target": target,
        "trial_node": result.node,
        "latency_node": "" if node is None else node,
        "latency_cached": "" if cached is None else cached,
    }
    if recovered:
        tags["recovered"] = "from the study after the driver stopped; the weights were not kept"
    if result.reason:
        tags["reason"] = result.reason[:5000]
    return [RunTag(k, str(v)) for k, v in tags.items()]


def _metrics(values: Mapping[str, Any]) -> list[Metric]:
    now = int(time.time() * 1000)
    return [
        Metric(k, float(v), now, 0)
        for k, v in values.items()
        if isinstance(v, (int, float)) and v is not None
    ]


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 500 else text[:497] + "..."


def _csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    return "\n".join([",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]) + "\n"


def log_bytes(client: Any, run_id: str, name: str, data: bytes) -> None:
    """``data`` as the run's artifact ``name`` (MLflow logs files, not bytes: a temporary one)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        client.log_artifact(run_id, str(path))
