"""Which trials the registry holds: model version and aliases per run, for tables and plots."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

RUN_TAG = "prunesearch.run_id"  # on each model version: the child run it was registered from
MOST_ACCURATE = "most-accurate"


def fastest_alias(drop: float) -> str:
    """The alias of the fastest front model within ``drop`` of the base accuracy."""
    return f"fastest-within-{drop * 100:g}pct"


@dataclass(frozen=True)
class Pick:
    version: str
    aliases: tuple[str, ...] = field(default_factory=tuple)


def registry_picks(client: MlflowClient, model_name: str) -> dict[str, Pick]:
    """run id -> its registered version and the aliases on it (empty when nothing is registered)."""
    try:
        model = client.get_registered_model(model_name)
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return {}
    by_version: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    out = {}
    for v in versions:
        run_id = v.tags.get(RUN_TAG) or v.run_id
        if run_id:
            out[run_id] = Pick(str(v.version), tuple(sorted(by_version.get(str(v.version), []))))
    return out
