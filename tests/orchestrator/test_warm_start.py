"""Warm start: a new search begins with another study's Pareto front."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from orchestrator import prepare, run_search

from ..e2e.helpers import quick_config


def _source_study(config, names: list[str]) -> dict[int, dict]:
    """Last night's study, told by hand: trials 0 and 2 form its front, 1 is dominated."""
    study = optuna.create_study(
        study_name="last-night", storage=config.storage, directions=["maximize", "minimize"]
    )
    dists = {f"ratio/{n}": FloatDistribution(0.1, 0.7, step=0.05) for n in names}
    dists["criterion"] = CategoricalDistribution(["l1", "taylor"])
    told = {}
    for number, (ratio, values) in enumerate(
        [(0.2, [0.97, 1.0]), (0.4, [0.90, 1.2]), (0.6, [0.93, 0.6])]
    ):
        params = {**{k: ratio for k in dists if k.startswith("ratio/")}, "criterion": "l1"}
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=dists, values=values)
        )
        told[number] = params
    return told


def test_a_new_search_starts_from_the_other_studys_front(tmp_path, ray_cluster):
    config = quick_config(
        tmp_path,
        name="tonight",
        search__trials=3,
        search__concurrency=1,
        search__warm_start={"study": "last-night"},
    )
    prepared = prepare(config)
    told = _source_study(config, list(prepared.discovery.names))
    lines: list[str] = []
    run_search(prepared, progress=lines.append)
    assert any("warm start" in line and "[0, 2]" in line for line in lines), lines
    trials = optuna.load_study(study_name="tonight", storage=config.storage).trials
    assert [t.user_attrs.get("warm_start") for t in trials] == [
        "last-night#0",
        "last-night#2",
        None,
    ]
    # Its choices are replayed; choices it did not make (round_to here) are the sampler's.
    assert {k: trials[0].params[k] for k in told[0]} == told[0]
    assert {k: trials[1].params[k] for k in told[2]} == told[2]

    # Running it again resumes; it does not enqueue the front a second time.
    more = quick_config(
        tmp_path,
        name="tonight",
        search__trials=4,
        search__concurrency=1,
        search__warm_start={"study": "last-night"},
    )
    run_search(prepare(more), progress=lines.append)
    trials = optuna.load_study(study_name="tonight", storage=config.storage).trials
    assert len(trials) == 4 and trials[3].user_attrs.get("warm_start") is None


def test_a_missing_source_study_is_named_before_any_trial(tmp_path):
    config = quick_config(tmp_path, name="cold", search__warm_start={"study": "no-such"})
    with pytest.raises(ValueError, match="search.warm_start.study: no study 'no-such'"):
        run_search(prepare(config), progress=lambda line: None)
