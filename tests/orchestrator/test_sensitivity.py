"""The sensitivity phase on Ray: computed once per base model, reused, and used to seed and narrow."""

from __future__ import annotations

import optuna
from mlflow import MlflowClient

from orchestrator import narrowed, prepare, run_search, sensitivity

from ..e2e.helpers import quick_config, runs_of


def test_scan_is_cached_and_seeds_and_narrows_the_search(tmp_path, ray_cluster):
    config = quick_config(
        tmp_path,
        name="sens",
        search__trials=3,
        search__sensitivity={"enabled": True, "ratios": [0.3, 0.6], "max_drop": 0.05},
    )
    prepared = prepare(config)
    first = sensitivity(prepared, None, progress=lambda line: None)
    assert set(first.accuracy) == set(prepared.discovery.names)
    again = sensitivity(prepared, None, progress=lambda line: None)
    assert again.cached and again.accuracy == first.accuracy

    space, seeds = narrowed(prepared, first)
    run_search(prepared, progress=lambda line: None)
    study = optuna.load_study(study_name="sens", storage=config.storage)
    assert study.user_attrs["sensitivity"]["key"] == first.key  # stored with the study
    # The first trials are the seeds, and every sampled ratio respects the narrowed bounds.
    for trial, seed in zip(study.trials, seeds, strict=False):
        assert {k: trial.params[k] for k in seed} == seed
    for trial in study.trials:
        for name, value in trial.params.items():
            if name.startswith("ratio/"):
                low, high = space.overrides.get(name[len("ratio/") :], space.ratio)
                assert low - 1e-9 <= value <= high + 1e-9
    # The scan, as a picture a user reads: a heat map on the search's parent run.
    parents, _ = runs_of(config)
    client = MlflowClient(tracking_uri=config.tracking.resolved_uri())
    path = client.download_artifacts(parents[0].info.run_id, "sensitivity.png", str(tmp_path))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
