"""Checks that run before the task is built or Ray starts, shared by the CLI's commands: the
local machine, the stores a search reads and writes, the warm start, and the task itself."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ._config import Config
from ._limits import check_local_machine, check_separate_stores, check_tracking_uri
from ._schema import ConfigError

if TYPE_CHECKING:
    from ._search import Prepared


def preflight(config: Config) -> None:
    """The stores a search reads and writes, checked before the task is built or Ray starts
    (the artifact location is probed after the task builds: see check_artifacts)."""
    from ._cluster import check_cache, check_storage, check_tracking, probe_address

    check_local_machine(config)
    if config.ray_address or os.environ.get("RAY_ADDRESS"):
        probe_address(config.ray_address or os.environ["RAY_ADDRESS"])
    check_tracking_uri(config.tracking.resolved_uri())
    check_separate_stores(config)
    check_storage(config.storage)
    if config.search.warm_start.storage:
        check_storage(config.search.warm_start.storage, "search.warm_start.storage")
    check_warm_start(config)
    check_tracking(config)
    check_cache()


def check_warm_start(config: Config) -> None:
    """A warm start names a study that must exist (it is only used when this study is new)."""
    import optuna

    from ._study import redact

    ws = config.search.warm_start
    if ws.study is None:
        return
    names = optuna.get_all_study_names(storage=config.storage)
    if (
        config.name in names
        and optuna.load_study(study_name=config.name, storage=config.storage).trials
    ):
        return  # resumed: the warm start happened on the first run
    source = ws.storage or config.storage
    known = names if source == config.storage else optuna.get_all_study_names(storage=source)
    if ws.study not in known:
        raise ConfigError(
            f"search.warm_start.study: no study {ws.study!r} in {redact(source)} (it has "
            f"{sorted(known)[:10]}); run that search first, fix the name or drop warm_start"
        )


def resolve_config_task(config: Config) -> None:
    from workers import resolve_task

    try:
        resolve_task(config.task)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def prepare_checked(config: Config) -> Prepared:
    """Build the task and trace the model; a model that cannot be traced is the task's fault."""
    from search_space import DiscoveryError

    from ._search import prepare

    try:
        prepared = prepare(config)
    except DiscoveryError as exc:
        text = str(exc)
        if "could not be traced" in text:
            text = (
                text.rstrip(".")
                + "; model(example_inputs) must return tensors computed from its inputs"
            )
        elif "(example_inputs) failed" in text:
            text = text.rstrip(".") + "; make task.example_inputs one batch the model accepts"
        raise ConfigError(f"task: {config.task}: {text}") from exc
    except ValueError as exc:
        if str(exc).startswith("exclude: "):  # search_space names the key; the config nests it
            raise ConfigError(f"search.space.{exc}") from exc
        raise
    except Exception as exc:
        if isinstance(exc, OSError) and exc.filename and not isinstance(exc, FileNotFoundError):
            raise  # a write that failed (disk full, read-only): reported with its path and fix
        raise ConfigError(
            f"task: {config.task}: building it failed: {type(exc).__name__}: {exc}; fix the task's "
            "build function or its task_options (--debug shows the traceback)"
        ) from exc
    check_example_inputs(config, prepared.task.example_inputs)
    return prepared


def check_example_inputs(config: Config, example_inputs: object) -> None:
    """Keyword inputs cannot be registered: a registered model takes positional ones (the task
    itself checked that every input has a batch dimension: workers.build_task)."""
    from collections.abc import Mapping

    from ._registry import KEYWORD_INPUTS

    if config.tracking.register and isinstance(example_inputs, Mapping):
        raise ConfigError(KEYWORD_INPUTS)
