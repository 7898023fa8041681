"""Everything about many trials: config, study, Ray dispatch, the front, MLflow, the CLI."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names load on first use. Ray workers import orchestrator._services (the latency bench, the
# trial and screen tasks), and Python runs this file first: importing every module here put
# MLflow, Optuna and plotting into each actor's start-up (`import orchestrator` took 11.7 s of
# a cold process here, `import workers` 4.7 s), once per bench and board of every search.
_EXPORTS: dict[str, tuple[str, str]] = {
    "LOCAL_SYSTEM_CONFIG": ("_cluster", "LOCAL_SYSTEM_CONFIG"),
    "MOST_ACCURATE": ("_picks", "MOST_ACCURATE"),
    "NIGHTLY_ATTR": ("_nightly", "ATTR"),
    "NOT_STARTED": ("_study", "NOT_STARTED"),
    "ONNX_ARTIFACT": ("_deploy", "ONNX_ARTIFACT"),
    "REPORT": ("_report", "REPORT"),
    "SAMPLERS": ("_study", "SAMPLERS"),
    "Candidate": ("_select", "Candidate"),
    "Config": ("_config", "Config"),
    "ConfigError": ("_schema", "ConfigError"),
    "Constraints": ("_config", "Constraints"),
    "EarlyStop": ("_config", "EarlyStop"),
    "FinetuneConfig": ("_config", "FinetuneConfig"),
    "FrontBoard": ("_services", "FrontBoard"),
    "FrontKeeper": ("_listeners", "FrontKeeper"),
    "Limits": ("_loop", "Limits"),
    "Listener": ("_loop", "Listener"),
    "Loop": ("_loop", "Loop"),
    "Night": ("_nightly", "Night"),
    "OneReadTPESampler": ("_sampler", "OneReadTPESampler"),
    "Outcome": ("_search", "Outcome"),
    "Point": ("_pareto", "Point"),
    "Prepared": ("_search", "Prepared"),
    "ProgressLine": ("_listeners", "ProgressLine"),
    "Resources": ("_config", "Resources"),
    "RetryingStorage": ("_storage", "RetryingStorage"),
    "Screen": ("_config", "Screen"),
    "ScreenedStudy": ("_select", "ScreenedStudy"),
    "SearchConfig": ("_config", "SearchConfig"),
    "SearchContext": ("_ask", "SearchContext"),
    "SearchRecorder": ("_tracking", "SearchRecorder"),
    "Sensitivity": ("_config", "Sensitivity"),
    "StorageUnavailable": ("_storage", "StorageUnavailable"),
    "StudyTeller": ("_listeners", "StudyTeller"),
    "Tally": ("_loop", "Tally"),
    "TrackingConfig": ("_config", "TrackingConfig"),
    "TrackingListener": ("_listeners", "TrackingListener"),
    "TrialSpec": ("_ask", "TrialSpec"),
    "WarmStart": ("_config", "WarmStart"),
    "already_finished": ("_resume", "already_finished"),
    "anchor_cap": ("_ask", "anchor_cap"),
    "anchor_trials": ("_ask", "anchor_trials"),
    "anchored_ask": ("_ask", "anchored_ask"),
    "apply_overrides": ("_config", "apply_overrides"),
    "ask_trial": ("_ask", "ask_trial"),
    "capped_space": ("_ask", "capped_space"),
    "check_for_cluster": ("_submit", "check_for_cluster"),
    "check_placeable": ("_cluster", "check_placeable"),
    "check_storage": ("_cluster", "check_storage"),
    "cluster_slots": ("_loop", "cluster_slots"),
    "config_from_dict": ("_config", "config_from_dict"),
    "denoised_latencies": ("_select", "denoised_latencies"),
    "export_model": ("_deploy", "export_model"),
    "export_onnx": ("_deploy", "export_onnx"),
    "fastest_alias": ("_picks", "fastest_alias"),
    "faster_than_base": ("_pareto", "faster_than_base"),
    "fetch": ("_registry", "fetch"),
    "finished_count": ("_study", "finished_count"),
    "front": ("_pareto", "front"),
    "front_from_mlflow": ("_tracking", "front_from_mlflow"),
    "front_plot": ("_plots", "front_plot"),
    "front_table": ("_search", "front_table"),
    "front_views": ("_report", "front_views"),
    "hypervolume": ("_pareto", "hypervolume"),
    "kept_channels": ("_plots", "kept_channels"),
    "label_matches": ("_cluster", "label_matches"),
    "load_config": ("_config", "load_config"),
    "load_module": ("_deploy", "load_module"),
    "looks_secret": ("_secrets", "looks_secret"),
    "mask_secrets": ("_secrets", "mask"),
    "narrowed": ("_sensitivity", "narrowed"),
    "next_pick": ("_select", "next_pick"),
    "open_study": ("_study", "open_study"),
    "plan_key": ("_select", "plan_key"),
    "plan_night": ("_nightly", "plan_night"),
    "prepare": ("_search", "prepare"),
    "proxy_quality": ("_select", "proxy_quality"),
    "queue_anchor": ("_ask", "queue_anchor"),
    "render_report": ("_report", "render_report"),
    "run_nightly": ("_nightly", "run_nightly"),
    "run_search": ("_search", "run_search"),
    "screen_job": ("_search", "screen_job"),
    "screen_target": ("_services", "screen_target"),
    "search_loop": ("_listeners", "search_loop"),
    "sensitivity": ("_sensitivity", "sensitivity"),
    "start_board": ("_services", "start_board"),
    "table_ratios": ("_table", "table_ratios"),
    "transient": ("_storage", "transient"),
    "trial_request": ("_loop", "trial_request"),
    "trial_spec": ("_ask", "trial_spec"),
    "untrained_warning": ("_base_model", "untrained_warning"),
    "warm_workers": ("_services", "warm_workers"),
}

__all__ = [
    "LOCAL_SYSTEM_CONFIG",
    "MOST_ACCURATE",
    "NIGHTLY_ATTR",
    "NOT_STARTED",
    "ONNX_ARTIFACT",
    "REPORT",
    "SAMPLERS",
    "Candidate",
    "Config",
    "ConfigError",
    "Constraints",
    "EarlyStop",
    "FinetuneConfig",
    "FrontBoard",
    "FrontKeeper",
    "Limits",
    "Listener",
    "Loop",
    "Night",
    "OneReadTPESampler",
    "Outcome",
    "Point",
    "Prepared",
    "ProgressLine",
    "Resources",
    "RetryingStorage",
    "Screen",
    "ScreenedStudy",
    "SearchConfig",
    "SearchContext",
    "SearchRecorder",
    "Sensitivity",
    "StorageUnavailable",
    "StudyTeller",
    "Tally",
    "TrackingConfig",
    "TrackingListener",
    "TrialSpec",
    "WarmStart",
    "already_finished",
    "anchor_cap",
    "anchor_trials",
    "anchored_ask",
    "apply_overrides",
    "ask_trial",
    "capped_space",
    "check_for_cluster",
    "check_placeable",
    "check_storage",
    "cluster_slots",
    "config_from_dict",
    "denoised_latencies",
    "export_model",
    "export_onnx",
    "fastest_alias",
    "faster_than_base",
    "fetch",
    "finished_count",
    "front",
    "front_from_mlflow",
    "front_plot",
    "front_table",
    "front_views",
    "hypervolume",
    "kept_channels",
    "label_matches",
    "load_config",
    "load_module",
    "looks_secret",
    "mask_secrets",
    "narrowed",
    "next_pick",
    "open_study",
    "plan_key",
    "plan_night",
    "prepare",
    "proxy_quality",
    "queue_anchor",
    "render_report",
    "run_nightly",
    "run_search",
    "screen_job",
    "screen_target",
    "search_loop",
    "sensitivity",
    "start_board",
    "table_ratios",
    "transient",
    "trial_request",
    "trial_spec",
    "untrained_warning",
    "warm_workers",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # once loaded, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # the same names, for type checkers and editors
    from ._ask import (
        SearchContext,
        TrialSpec,
        anchor_cap,
        anchor_trials,
        anchored_ask,
        ask_trial,
        capped_space,
        queue_anchor,
        trial_spec,
    )
    from ._base_model import untrained_warning
    from ._cluster import LOCAL_SYSTEM_CONFIG, check_placeable, check_storage, label_matches
    from ._config import (
        Config,
        Constraints,
        EarlyStop,
        FinetuneConfig,
        Resources,
        Screen,
        SearchConfig,
        Sensitivity,
        TrackingConfig,
        WarmStart,
        apply_overrides,
        config_from_dict,
        load_config,
    )
    from ._deploy import ONNX_ARTIFACT, export_model, export_onnx, load_module
    from ._listeners import FrontKeeper, ProgressLine, StudyTeller, TrackingListener, search_loop
    from ._loop import Limits, Listener, Loop, Tally, cluster_slots, trial_request
    from ._nightly import ATTR as NIGHTLY_ATTR
    from ._nightly import Night, plan_night, run_nightly
    from ._pareto import Point, front, hypervolume
    from ._picks import MOST_ACCURATE, fastest_alias
    from ._plots import front_plot, kept_channels
    from ._registry import fetch
    from ._report import REPORT, front_views, render_report
    from ._resume import already_finished
    from ._sampler import OneReadTPESampler
    from ._schema import ConfigError
    from ._search import Outcome, Prepared, front_table, prepare, run_search, screen_job
    from ._secrets import looks_secret
    from ._secrets import mask as mask_secrets
    from ._select import (
        Candidate,
        ScreenedStudy,
        denoised_latencies,
        next_pick,
        plan_key,
        proxy_quality,
    )
    from ._sensitivity import narrowed, sensitivity
    from ._services import FrontBoard, screen_target, start_board, warm_workers
    from ._storage import RetryingStorage, StorageUnavailable, transient
    from ._study import NOT_STARTED, SAMPLERS, finished_count, open_study
    from ._submit import check_for_cluster
    from ._tracking import SearchRecorder, front_from_mlflow
