"""search.anchors: a new search's first trials put every unit at one ratio, evenly spaced."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
from optuna.trial import TrialState

from orchestrator import (
    SearchContext,
    anchor_cap,
    anchor_trials,
    anchored_ask,
    capped_space,
    config_from_dict,
    prepare,
    queue_anchor,
    run_search,
)
from search_space import SearchSpace
from workers import TrialStatus

from ..e2e.helpers import quick_config


def _config(**search):
    return config_from_dict(
        {
            "name": "a",
            "search": {
                "space": {"granularity": "layer", "ratio": [0.0, 0.8]},
                "screen": {"candidates": 0},
                **search,
            },
        }
    )


def _study() -> optuna.Study:
    return optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0)
    )


def _level(params: dict) -> float:
    (value,) = {v for k, v in params.items() if k.startswith("ratio/")}
    return value


def test_anchors_are_capped_by_the_budget_and_skip_ratio_sets_already_queued(digits_discovery):
    space = SearchSpace(granularity="layer", ratio=(0.0, 0.8))
    prepared = SimpleNamespace(space=space, discovery=digits_discovery)

    def anchors(config, study):
        return anchor_trials(config, study, prepared, progress=lambda line: None)

    assert [_level(a) for a in anchors(_config(anchors=4, trials=24), _study())] == [
        0.8,
        0.4,
        0.2,
        0.6,
    ]
    assert anchors(_config(anchors=0), _study()) == []
    # A warm start queued two trials, one with the same ratios as an anchor: 3 trials of budget left,
    # 3 anchors spaced for them (0.8, 0.25, 0.5), and the one the warm start already has is dropped.
    study = _study()
    names = digits_discovery.names
    study.enqueue_trial({**{f"ratio/{n}": 0.8 for n in names}, "criterion": "l2"})
    study.enqueue_trial({f"ratio/{n}": 0.3 for n in names})
    assert [_level(a) for a in anchors(_config(anchors=4, trials=5), study)] == [0.25, 0.5]
    assert anchors(_config(anchors=4, trials=2), study) == []


def test_one_anchor_is_queued_per_ask_after_what_already_waits():
    study = _study()
    study.enqueue_trial({"x": 0.5}, user_attrs={"warm_start": "w#0"})
    anchors = [{"x": 0.1}, {"x": 0.2}]
    values, left = [], []
    for _ in range(4):
        left.append(queue_anchor(study, anchors))
        trial = study.ask()
        values.append(trial.suggest_float("x", 0.0, 1.0))
        # Never more than the trial being asked is queued: a stop leaves nothing waiting.
        assert not study.get_trials(states=(TrialState.WAITING,))
        study.tell(trial, [0.0, 0.0])
    assert values[:3] == [0.5, 0.1, 0.2]
    assert [t.user_attrs.get("anchor") for t in study.trials] == [None, "1/2", "2/2", None]
    assert left == [True, True, True, False]  # then the cap applies


def test_a_new_search_starts_with_its_anchors_and_a_resumed_one_does_not(tmp_path, ray_cluster):
    config = quick_config(tmp_path, name="anchored", search__trials=3, search__anchors=2)
    lines: list[str] = []
    run_search(prepare(config), progress=lines.append)
    assert "anchors: 2 first trial(s) with every unit at one ratio (0.7, 0.4)" in lines, lines
    study = optuna.load_study(study_name="anchored", storage=config.storage)
    anchors = [t for t in study.trials if t.user_attrs.get("anchor")]
    assert [(t.number, t.user_attrs["anchor"]) for t in anchors] == [(0, "1/2"), (1, "2/2")]
    for t, level in zip(anchors, (0.7, 0.4), strict=True):  # quick_config's range is [0.1, 0.7]
        assert {v for k, v in t.params.items() if k.startswith("ratio/")} == {level}
        assert set(t.user_attrs["plan"]["ratios"].values()) == {level}
        assert t.state == TrialState.COMPLETE
    sampled = {v for k, v in study.trials[2].params.items() if k.startswith("ratio/")}
    assert len(sampled) > 1  # after the anchors, per-unit ratios are sampled

    # Resuming with a larger budget samples: no anchor a second time (a cap the stored anchors
    # set still holds: it is recomputed from them).
    more = quick_config(tmp_path, name="anchored", search__trials=4, search__anchors=2)
    lines.clear()
    run_search(prepare(more), progress=lines.append)
    assert not any("first trial(s)" in line for line in lines), lines
    study = optuna.load_study(study_name="anchored", storage=config.storage)
    assert len(study.trials) == 4 and study.trials[3].user_attrs.get("anchor") is None


def test_a_search_stopped_before_its_anchors_ran_leaves_none_waiting(tmp_path, ray_cluster):
    # A deadline already past: the loop asks nothing. Anchors queued up front would wait forever.
    config = quick_config(tmp_path, name="stopped", search__trials=4, search__deadline_s=1e-6)
    outcome = run_search(prepare(config), progress=lambda line: None)
    assert outcome.stopped_by == "deadline"
    study = optuna.load_study(study_name="stopped", storage=config.storage)
    assert not study.get_trials(states=(TrialState.WAITING,))


def test_anchors_zero_is_a_plain_sampled_search(tmp_path, ray_cluster):
    config = quick_config(tmp_path, name="plain", search__trials=2, search__anchors=0)
    run_search(prepare(config), progress=lambda line: None)
    study = optuna.load_study(study_name="plain", storage=config.storage)
    assert not any(t.user_attrs.get("anchor") for t in study.trials)


def _told_anchor(study: optuna.Study, level: float, accuracy: float, names) -> None:
    dists = {
        f"ratio/{n}": optuna.distributions.FloatDistribution(0.0, 0.8, step=0.05) for n in names
    }
    study.add_trial(
        optuna.trial.create_trial(
            params={k: level for k in dists},
            distributions=dists,
            values=[accuracy, 1.0],
            user_attrs={"anchor": "x", "anchor_level": level, "status": TrialStatus.COMPLETE},
        )
    )


def test_after_the_anchors_sampled_ratios_stay_under_the_lowest_level_that_fell_under_the_floor(
    digits_discovery,
):
    space = SearchSpace(granularity="layer", ratio=(0.0, 0.8), overrides={"head*": (0.0, 0.8)})
    study = _study()
    names = digits_discovery.names
    for level, accuracy in ((0.8, 0.30), (0.4, 0.95), (0.2, 0.97), (0.6, 0.70)):
        _told_anchor(study, level, accuracy, names)
    assert anchor_cap(study, 0.88) == 0.6
    capped = capped_space(space, digits_discovery, 0.6)
    assert capped.overrides["layer1.0.conv1"] == (0.0, 0.6)
    assert (
        capped.overrides["head*"] == (0.0, 0.8) and "head.0" not in capped.overrides
    )  # the user's own
    # A resumed search: the anchors are in the study, none left to queue.
    lines: list[str] = []
    ask = anchored_ask(
        SearchContext(_config(), space, digits_discovery), study, [], 0.88, lines.append
    )
    _, spec = ask()
    assert lines == [
        "anchors: every unit at ratio 0.6 fell under accuracy 0.8800; sampling per-unit ratios "
        "up to 0.6 from now on"
    ]
    assert spec.plan.ratios["layer1.0.conv1"] <= 0.6 + 1e-9
    assert max(spec.plan.ratios.values()) <= 0.8 + 1e-9
    ask()
    assert len(lines) == 1  # said once


def test_no_anchor_under_the_floor_leaves_the_space_as_it_is(digits_discovery):
    space = SearchSpace(granularity="layer", ratio=(0.0, 0.8))
    study = _study()
    for level in (0.8, 0.4):
        _told_anchor(study, level, 0.9, digits_discovery.names)
    assert anchor_cap(study, 0.5) is None
    lines: list[str] = []
    anchored_ask(SearchContext(_config(), space, digits_discovery), study, [], 0.5, lines.append)()
    assert lines == []  # sampled from the space as it is


def test_a_real_search_caps_what_it_samples_after_its_anchors(tmp_path, ray_cluster):
    # One trial at a time, so every anchor is told before the first sampled trial is asked.
    config = quick_config(
        tmp_path,
        name="capped",
        search__trials=6,
        search__concurrency=1,
        search__anchors=4,
        search__space__ratio=[0.0, 0.9],
    )
    lines: list[str] = []
    outcome = run_search(prepare(config), progress=lines.append)
    floor = outcome.base["accuracy"] - 0.10
    study = optuna.load_study(study_name="capped", storage=config.storage)
    anchors, sampled = study.trials[:4], study.trials[4:]
    assert [t.user_attrs["anchor_level"] for t in anchors] == [0.9, 0.45, 0.2, 0.65]
    bad = [t.user_attrs["anchor_level"] for t in anchors if t.values[0] < floor]
    if not bad:  # nothing to learn: the space stays whole
        assert not any("fell under" in line for line in lines)
        return
    cap = min(bad)
    assert any(
        line.startswith(f"anchors: every unit at ratio {cap:g} fell under") for line in lines
    ), lines
    for t in sampled:
        assert all(v <= cap + 1e-9 for k, v in t.params.items() if k.startswith("ratio/")), t.params


def test_the_default_allocation_space_without_a_screen_starts_with_uniform_anchors(
    tmp_path, ray_cluster
):
    """search.screen.candidates 0 with the default granularity (allocation): its anchors are
    levels of the allocator at blend 0, the uniform plan, not per-unit ratios."""
    config = quick_config(
        tmp_path,
        name="alloc",
        search__trials=3,
        search__anchors=2,
        search__space__granularity="allocation",
    )
    lines: list[str] = []
    outcome = run_search(prepare(config), progress=lines.append)
    assert "anchors: 2 first trial(s) with every unit at one ratio (0.7, 0.4)" in lines, lines
    assert outcome.counts[TrialStatus.COMPLETE] == 3
    study = optuna.load_study(study_name="alloc", storage=config.storage)
    anchors = [t for t in study.trials if t.user_attrs.get("anchor")]
    assert [t.params["alloc/level"] for t in anchors] == [0.7, 0.4]
    for t in anchors:  # the uniform plan: one ratio for every unit
        assert len(set(t.user_attrs["plan"]["ratios"].values())) == 1
