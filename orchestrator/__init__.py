"""Everything about many trials: config, study, Ray dispatch, the front, MLflow, the CLI."""

from __future__ import annotations

from ._config import (
    Config,
    Constraints,
    EarlyStop,
    FinetuneConfig,
    Resources,
    SearchConfig,
    Sensitivity,
    TrackingConfig,
    WarmStart,
    config_from_dict,
    load_config,
)
from ._pareto import Point, front, hypervolume
from ._schema import ConfigError
from ._search import Outcome, Prepared, front_table, prepare, run_search

__all__ = [
    "Config",
    "ConfigError",
    "Constraints",
    "EarlyStop",
    "FinetuneConfig",
    "Outcome",
    "Point",
    "Prepared",
    "Resources",
    "SearchConfig",
    "Sensitivity",
    "TrackingConfig",
    "WarmStart",
    "config_from_dict",
    "front",
    "front_table",
    "hypervolume",
    "load_config",
    "prepare",
    "run_search",
]
