"""The sensitivity phase: scan every group on Ray, cache the table per base model, narrow the space.

The table is stored in the study (so a resumed search reuses it) and in the local cache
directory keyed by the base model's fingerprint (so other searches of the same model do too).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray

from search_space import SearchSpace, narrow_space, seed_params, units_for
from workers import base_fingerprint, cache_dir, evaluate, scan_groups, upper_bounds

from ._cluster import ensure_ray

STUDY_ATTR = "sensitivity"


@dataclass(frozen=True)
class SensitivityTable:
    key: str
    base_accuracy: float
    accuracy: dict[str, dict[str, float]]  # group -> ratio -> accuracy without finetuning
    cached: bool = False


def table_key(prepared) -> str:
    s = prepared.config.search.sensitivity
    what = {
        "base": base_fingerprint(prepared.task.model),
        "task": prepared.config.task,
        "options": prepared.config.task_options,
        "ratios": list(s.ratios),
        "criterion": s.criterion,
        "groups": list(prepared.discovery.names),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sensitivity(prepared, study: optuna.Study | None = None, progress=print) -> SensitivityTable:
    key = table_key(prepared)
    found = _cached(key, study)
    if found is not None:
        progress(f"sensitivity: reusing the scan {key}")
        return found
    config = prepared.config
    s = config.search.sensitivity
    ensure_ray(config.ray_address)
    progress(
        f"sensitivity: scanning {len(prepared.discovery.names)} groups at ratios {list(s.ratios)}"
    )
    base_ref = ray.put({k: v.detach().cpu() for k, v in prepared.task.model.state_dict().items()})
    remote = ray.remote(scan_groups).options(
        num_cpus=config.resources.num_cpus, num_gpus=config.resources.num_gpus
    )
    refs = [
        remote.remote(
            config.task, dict(config.task_options), base_ref, [g], list(s.ratios), s.criterion
        )
        for g in prepared.discovery.names
    ]
    accuracy: dict[str, dict[str, float]] = {}
    for part in ray.get(refs):
        accuracy.update(part)
    table = SensitivityTable(key, evaluate(prepared.task.model, prepared.task), accuracy)
    _store(table, study)
    return table


def narrowed(prepared, table: SensitivityTable) -> tuple[SearchSpace, list[dict[str, Any]]]:
    """The space with per-unit upper bounds from the scan, and the seed trials' parameters."""
    s = prepared.config.search.sensitivity
    space = prepared.config.search.space
    bounds = upper_bounds(
        table.accuracy, table.base_accuracy, units_for(space, prepared.discovery), s.max_drop
    )
    return narrow_space(space, bounds), seed_params(
        space, prepared.discovery, bounds, s.seed_trials
    )


def _cached(key: str, study: optuna.Study | None) -> SensitivityTable | None:
    data = study.user_attrs.get(STUDY_ATTR) if study is not None else None
    path = _path(key)
    if (data is None or data.get("key") != key) and path.exists():
        data = json.loads(path.read_text())
    if data is None or data.get("key") != key:
        return None
    table = SensitivityTable(key, data["base_accuracy"], data["accuracy"], cached=True)
    if study is not None and study.user_attrs.get(STUDY_ATTR, {}).get("key") != key:
        study.set_user_attr(STUDY_ATTR, data)
    return table


def _store(table: SensitivityTable, study: optuna.Study | None) -> None:
    data = {"key": table.key, "base_accuracy": table.base_accuracy, "accuracy": table.accuracy}
    if study is not None:
        study.set_user_attr(STUDY_ATTR, data)
    path = _path(table.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _path(key: str) -> Path:
    return cache_dir() / f"sensitivity-{key}.json"
