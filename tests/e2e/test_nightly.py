"""`prunesearch nightly` on real Ray, SQLite Optuna storage and an MLflow registry: two nights."""

from __future__ import annotations

import datetime as dt

import optuna
from mlflow import MlflowClient

from orchestrator import NIGHTLY_ATTR, config_from_dict, run_nightly

from .helpers import quick_config, runs_of

NIGHT1, NIGHT2, NIGHT3 = dt.date(2026, 11, 20), dt.date(2026, 11, 21), dt.date(2026, 11, 22)


def test_two_nights_idempotent_warm_started_and_gated(tmp_path, ray_cluster):
    # gate 0.99: the second night's pick would have to be 99 % faster to move the alias; an
    # accuracy floor 50 points under the base, so a 2-trial night always has a pick.
    config = quick_config(
        tmp_path,
        name="nightly",
        search__trials=2,
        tracking__register=True,
        tracking__alias_drop=0.5,
        nightly={"alias": "production-candidate", "gate": 0.99},
    )
    lines: list[str] = []
    client = MlflowClient(tracking_uri=config.tracking.resolved_uri())

    assert run_nightly(config, NIGHT1, lines.append) == 0
    assert "starting nightly-20261120: no earlier finished night, a cold start" in lines
    first = optuna.load_study(study_name="nightly-20261120", storage=config.storage)
    assert first.user_attrs[NIGHTLY_ATTR]["state"] == "finished" and len(first.trials) == 2
    moved = client.get_model_version_by_alias(
        "nightly", "production-candidate"
    )  # no alias before: moved
    assert any(
        line.startswith(f"alias production-candidate moved to version {moved.version}")
        for line in lines
    )

    # The scheduler fires twice on one night: the second call does nothing.
    lines.clear()
    assert run_nightly(config, NIGHT1, lines.append) == 0
    assert lines == ["nightly-20261120 already finished; nothing to do"]
    assert len(optuna.load_study(study_name="nightly-20261120", storage=config.storage).trials) == 2

    # The next night: same base model and target, so it starts from the first night's front and
    # reuses its latency measurements; the gate keeps the alias where it is.
    lines.clear()
    assert run_nightly(config, NIGHT2, lines.append) == 0
    assert (
        "starting nightly-20261121: warm start from nightly-20261120 (same base model and target)"
        in lines
    )
    second = optuna.load_study(study_name="nightly-20261121", storage=config.storage)
    warmed = [
        t
        for t in second.trials
        if t.user_attrs.get("warm_start", "").startswith("nightly-20261120#")
    ]
    assert warmed and all(t.user_attrs["latency"]["cached"] is True for t in warmed)
    assert (
        client.get_model_version_by_alias("nightly", "production-candidate").version
        == moved.version
    )
    parents, _ = runs_of(config)  # both nights in one experiment, one parent run each
    assert sorted(p.data.tags["prunesearch.study"] for p in parents) == [
        "nightly-20261120",
        "nightly-20261121",
    ]
    tonight = next(p for p in parents if p.data.tags["prunesearch.study"] == "nightly-20261121")
    assert tonight.data.tags["nightly.previous"] == "nightly-20261120"
    assert tonight.data.tags["nightly.alias"].startswith(
        f"production-candidate kept on version {moved.version}"
    )
    assert (
        tonight.data.metrics["nightly_prev_hypervolume"]
        == first.user_attrs[NIGHTLY_ATTR]["hypervolume"]
    )
    assert "nightly_hypervolume_gain" in tonight.data.metrics
    # Each night's parent carries the trend of the front over the nights so far.
    for parent in parents:
        assert "nightly_trend.png" in [a.path for a in client.list_artifacts(parent.info.run_id)]

    # A new base checkpoint (the digits model trained for one epoch less): a fresh study, no warm
    # start from a front that was found for other weights, and it says so.
    raw = config.to_dict()
    raw["task_options"] = {"base_epochs": 11}
    lines.clear()
    assert run_nightly(config_from_dict(raw), NIGHT3, lines.append) == 0
    changed = [
        line
        for line in lines
        if line.startswith(
            "starting nightly-20261122: the base model changed since nightly-20261121 (hash "
        )
    ]
    assert changed and changed[0].endswith("): a fresh study, no warm start"), lines
    third = optuna.load_study(study_name="nightly-20261122", storage=config.storage)
    assert third.user_attrs[NIGHTLY_ATTR]["state"] == "finished" and len(third.trials) == 2
    assert (
        third.user_attrs[NIGHTLY_ATTR]["base_hash"] != second.user_attrs[NIGHTLY_ATTR]["base_hash"]
    )
    assert not any("warm_start" in t.user_attrs for t in third.trials)
