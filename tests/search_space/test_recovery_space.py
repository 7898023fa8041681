"""The recovery recipe and its search space: defaults change nothing, each method brings its own
parameters only when chosen, bad values name their field, and a config can set it all."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml

from search_space import (
    PruningPlan,
    Recovery,
    RecoverySpace,
    SearchSpace,
    suggest_plan,
    suggest_recovery,
)

ALL = RecoverySpace(
    methods=("oneshot", "iterative", "sparse"),
    steps=(2, 4),
    sparse_share=(0.25, 0.5),
    reg=(1e-4, 1e-1),
    sparse_pruners=("group_norm", "bn_scale", "growing_reg"),
    kd=(False, True),
)


def _trials(space: RecoverySpace, n: int, seed: int = 0):
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=seed)
    )
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((suggest_recovery(trial, space), trial))
        study.tell(trial, [0.0, 0.0])
    return out


def test_the_default_space_is_oneshot_without_any_new_parameter(digits_discovery):
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    plan = suggest_plan(trial, SearchSpace(granularity="layer"), digits_discovery)
    names = set(trial.params)
    assert suggest_recovery(trial, SearchSpace().recovery) == Recovery()
    assert set(trial.params) == names  # existing searches keep their Optuna parameters
    assert not any(n.startswith("recovery/") for n in names) and plan.iterative_steps == 1


def test_each_method_samples_its_own_parameters_only_when_chosen():
    seen = set()
    for recovery, trial in _trials(ALL, 60):
        seen.add(recovery.method)
        params = {k for k in trial.params if k.startswith("recovery/")}
        assert "recovery/method" in params and "recovery/kd" in params
        assert ("recovery/steps" in params) == (recovery.method == "iterative")
        sparse = {"recovery/sparse_share", "recovery/reg", "recovery/sparse_pruner"}
        assert (sparse & params) == (sparse if recovery.method == "sparse" else set())
        assert (
            ("recovery/kd_alpha" in params) == recovery.kd == ("recovery/kd_temperature" in params)
        )
        if recovery.method == "iterative":
            assert recovery.steps in (2, 4)
        if recovery.method == "sparse":
            assert 1e-4 <= recovery.reg <= 1e-1 and recovery.sparse_share in (0.25, 0.5)
            assert trial.distributions["recovery/reg"].log  # strengths span decades: log-uniform
        if recovery.kd:
            assert 2.0 <= recovery.kd_temperature <= 8.0 and 0.3 <= recovery.kd_alpha <= 0.9
    assert seen == {"oneshot", "iterative", "sparse"}


def test_a_single_choice_is_a_constant_not_a_parameter():
    space = RecoverySpace(
        methods=("sparse",),
        sparse_share=(0.5,),
        reg=(0.01, 0.01),
        kd=(True,),
        kd_temperature=(4.0, 4.0),
        kd_alpha=(0.5, 0.5),
    )
    ((recovery, trial),) = _trials(space, 1)
    assert recovery == Recovery(
        "sparse", sparse_share=0.5, reg=0.01, kd=True, kd_temperature=4.0, kd_alpha=0.5
    )
    assert trial.params == {}


def test_a_recovery_round_trips_through_json_and_an_absent_one_is_oneshot():
    r = Recovery(
        "sparse", sparse_share=0.25, reg=3e-3, sparse_pruner="growing_reg", kd=True, kd_alpha=0.7
    )
    assert Recovery.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert Recovery.from_dict(None) == Recovery.from_dict({}) == Recovery()
    assert (
        Recovery.from_dict({"method": "iterative", "steps": 3}).steps == 3
    )  # missing keys: defaults


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"method": "magic"}, "recovery.method"),
        ({"method": "iterative", "steps": 1}, "recovery.steps"),
        ({"method": "sparse", "sparse_share": 0.5}, "needs sparse_share > 0 and reg > 0"),
        ({"method": "sparse", "sparse_share": 1.0, "reg": 0.1}, "recovery.sparse_share"),
        ({"sparse_pruner": "l0"}, "recovery.sparse_pruner"),
        ({"kd": True, "kd_alpha": 1.5}, "recovery.kd_alpha"),
        ({"kd_temperature": 0}, "recovery.kd_temperature"),
        ({"teacher": "big"}, "unknown keys"),
    ],
)
def test_a_bad_recipe_is_refused_naming_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        Recovery.from_dict(bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"methods": ("oneshot", "distil")}, r"search\.space\.recovery\.methods: unknown 'distil'"),
        ({"methods": ()}, r"search\.space\.recovery\.methods: give at least one"),
        ({"steps": (1, 2)}, r"search\.space\.recovery\.steps"),
        ({"sparse_share": (0.0,)}, r"search\.space\.recovery\.sparse_share"),
        ({"reg": (0.0, 0.1)}, r"search\.space\.recovery\.reg"),
        ({"reg": (0.1, 0.01)}, r"search\.space\.recovery\.reg"),
        ({"sparse_pruners": ("slim",)}, r"search\.space\.recovery\.sparse_pruners"),
        ({"kd": ()}, r"search\.space\.recovery\.kd"),
        ({"kd_alpha": (0.5, 1.2)}, r"search\.space\.recovery\.kd_alpha"),
    ],
)
def test_a_bad_space_is_refused_naming_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        RecoverySpace(**bad)


def test_a_config_sets_the_recovery_space_from_yaml():
    from orchestrator import ConfigError, config_from_dict

    text = """
    name: x
    search: {space: {recovery: {methods: [oneshot, iterative, sparse], kd: [false, true], reg: [1.0e-4, 0.5]}}}
    """
    config = config_from_dict(yaml.safe_load(text))
    assert config.search.space.recovery == RecoverySpace(
        methods=("oneshot", "iterative", "sparse"), kd=(False, True), reg=(1e-4, 0.5)
    )
    assert config_from_dict({"name": "x"}).search.space.recovery == RecoverySpace()
    with pytest.raises(ConfigError, match=r"search\.space\.recovery\.methods: unknown 'distil'"):
        config_from_dict({"name": "x", "search": {"space": {"recovery": {"methods": ["distil"]}}}})
    with pytest.raises(ConfigError, match=r"search\.space\.recovery\.kd_temp"):
        config_from_dict({"name": "x", "search": {"space": {"recovery": {"kd_temp": [1, 2]}}}})


def test_old_plans_still_load_and_the_plan_carries_no_recipe():
    old = {
        "ratios": {"a": 0.5},
        "units": {"a": ["a"]},
        "criterion": "l1",
    }  # a plan saved before recovery existed
    plan = PruningPlan.from_dict(old)
    assert plan.iterative_steps == 1 and "recovery" not in plan.to_dict()
