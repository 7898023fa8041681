"""A target or trial no node can run is refused before any trial is dispatched."""

from __future__ import annotations

import optuna
import pytest

from orchestrator import label_matches, prepare, run_search

from ..e2e.helpers import quick_config


@pytest.mark.parametrize(
    "value, selector, hit",
    [
        ("edge", "edge", True),
        ("edge", "gpu", False),
        (None, "edge", False),
        ("edge", "!gpu", True),
        ("gpu", "!gpu", False),
        (None, "!gpu", True),
        ("b", "in(a, b)", True),
        ("c", "in(a,b)", False),
        ("c", "!in(a,b)", True),
    ],
)
def test_label_selector_values_match_like_ray(value, selector, hit):
    assert label_matches(value, selector) is hit


@pytest.mark.parametrize(
    "patch, message",
    [
        (
            {"target__resources": {"tpu_v9": 1}},
            "target 'cpu': no node of the Ray cluster has resources {'tpu_v9': 1.0}",
        ),
        (
            {"target__label_selector": {"hw": "rpi5"}},
            "ray start --address=HEAD:6379 --labels=hw=rpi5",
        ),
        (
            {"target": [{}, {"name": "gpu", "device": "cuda", "resources": {"t4": 1}}]},
            "target 'gpu': no node",
        ),
        (
            {"resources__custom": {"trainer": 1}},
            "or fix resources.custom / resources.label_selector",
        ),
        # The session cluster has 2 CPUs: timing on 2 threads would leave none for training.
        (
            {"target__threads": 2},
            "this one-node cluster has 2 and timing reserves 2 (target.threads)",
        ),
    ],
)
def test_an_unplaceable_target_or_trial_is_refused_before_dispatch(
    tmp_path, ray_cluster, patch, message
):
    config = quick_config(tmp_path, name="placement", **patch)
    with pytest.raises(ValueError) as err:
        run_search(prepare(config), progress=lambda line: None)
    assert message in str(err.value)
    study = optuna.load_study(study_name="placement", storage=config.storage)
    assert study.trials == []
