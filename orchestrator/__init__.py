"""Everything about many trials: config, study, Ray dispatch, the front, MLflow, the CLI."""

from __future__ import annotations

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
from ._schema import ConfigError
from ._search import Outcome, Prepared, front_table, prepare, run_search
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
from ._services import FrontBoard, start_board
from ._storage import RetryingStorage, StorageUnavailable, transient
from ._study import NOT_STARTED, SAMPLERS, finished_count, open_study
from ._submit import check_for_cluster
from ._tracking import SearchRecorder, front_from_mlflow

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
    "search_loop",
    "sensitivity",
    "start_board",
    "transient",
    "trial_request",
    "trial_spec",
]
