"""Everything about many trials: config, study, Ray dispatch, the front, MLflow, the CLI."""

from __future__ import annotations

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
    config_from_dict,
    load_config,
)
from ._deploy import ONNX_ARTIFACT, export_model, export_onnx, load_module
from ._pareto import Point, front, hypervolume
from ._plots import front_plot, kept_channels
from ._report import REPORT, front_views, render_report
from ._resume import already_finished
from ._schema import ConfigError
from ._screen import Candidate, ScreenedStudy, next_pick, proxy_quality
from ._search import Outcome, Prepared, front_table, prepare, run_search
from ._secrets import looks_secret
from ._secrets import mask as mask_secrets
from ._tracking import SearchRecorder

__all__ = [
    "Candidate",
    "Config",
    "ConfigError",
    "ONNX_ARTIFACT",
    "REPORT",
    "Constraints",
    "EarlyStop",
    "FinetuneConfig",
    "Outcome",
    "Point",
    "Prepared",
    "Resources",
    "Screen",
    "SearchRecorder",
    "ScreenedStudy",
    "SearchConfig",
    "Sensitivity",
    "TrackingConfig",
    "WarmStart",
    "already_finished",
    "config_from_dict",
    "export_model",
    "export_onnx",
    "front",
    "front_plot",
    "front_views",
    "front_table",
    "hypervolume",
    "kept_channels",
    "load_config",
    "load_module",
    "looks_secret",
    "mask_secrets",
    "next_pick",
    "prepare",
    "proxy_quality",
    "render_report",
    "run_search",
]
