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
from ._pareto import Point, front, hypervolume
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
    "config_from_dict",
    "front",
    "front_table",
    "hypervolume",
    "load_config",
    "looks_secret",
    "mask_secrets",
    "next_pick",
    "prepare",
    "proxy_quality",
    "run_search",
]
