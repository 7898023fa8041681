from __future__ import annotations

import optuna
import pytest

from search_space import SearchSpace, suggest_plan, units_for


def sample(space: SearchSpace, discovery, n: int = 10, seed: int = 0):
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=seed)
    )
    plans = []
    for _ in range(n):
        trial = study.ask()
        plans.append(suggest_plan(trial, space, discovery))
        study.tell(trial, [0.0, 0.0])
    return plans


def test_layer_granularity_gives_each_group_a_ratio_in_range(digits_discovery):
    space = SearchSpace(
        granularity="layer",
        ratio=(0.1, 0.6),
        step=0.05,
        criteria=("l1", "lamp"),
        round_to=(1, 8, 16),
    )
    for plan in sample(space, digits_discovery):
        assert set(plan.group_ratios()) == set(digits_discovery.names)
        assert all(0.1 - 1e-9 <= r <= 0.6 + 1e-9 for r in plan.ratios.values())
        assert plan.criterion in ("l1", "lamp")
        assert plan.round_to in (1, 8, 16)


def test_block_granularity_ties_groups_by_name_prefix(digits_discovery):
    units = units_for(SearchSpace(granularity="block"), digits_discovery)
    assert {"stem", "layer1", "layer2", "layer3", "head"} == set(units)
    assert set(units["layer1"]) == {n for n in digits_discovery.names if n.startswith("layer1.")}
    plan = sample(SearchSpace(granularity="block"), digits_discovery, n=1)[0]
    ratios = plan.group_ratios()
    assert len({ratios[g] for g in units["layer2"]}) == 1


def test_uniform_granularity_has_one_dimension(digits_discovery):
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    plan = suggest_plan(trial, SearchSpace(granularity="uniform"), digits_discovery)
    assert list(plan.ratios) == ["all"]
    assert [k for k in trial.params if k.startswith("ratio/")] == ["ratio/all"]


def test_overrides_narrow_or_freeze_a_unit(digits_discovery):
    space = SearchSpace(granularity="layer", overrides={"stem*": (0.0, 0.0), "layer3*": (0.5, 0.6)})
    for plan in sample(space, digits_discovery, n=5):
        assert plan.ratios["stem.0"] == 0.0
        assert 0.5 <= plan.ratios["layer3.0.conv1"] <= 0.6


def test_per_layer_criteria_are_sampled_per_unit(digits_discovery):
    plan = sample(
        SearchSpace(granularity="layer", per_layer_criteria=True, criteria=("l1", "l2")),
        digits_discovery,
        n=1,
    )[0]
    assert set(plan.criteria) == set(plan.units)
    assert set(plan.criteria.values()) <= {"l1", "l2"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"granularity": "stage"}, "granularity"),
        ({"ratio": (0.5, 0.2)}, "low <= high"),
        ({"ratio": (0.0, 1.0)}, "< 1"),
        ({"criteria": ("l3",)}, "unknown criterion 'l3'"),
        ({"criteria": ()}, "at least one"),
        ({"round_to": (0,)}, "round_to"),
        ({"step": 0.0}, "step"),
        # each unit is one group: global ranking would change nothing (the same models, tested
        # on three tasks' plans), nor would isomorphic ranking
        (
            {"granularity": "layer", "global_pruning": (True,)},
            r"search.space.global_pruning: .* every unit is one group",
        ),
        (
            {"granularity": "allocation", "isomorphic": (False, True)},
            r"search.space.isomorphic: .* needs granularity: uniform",
        ),
    ],
)
def test_bad_spaces_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace(**kwargs)


def test_narrow_space_caps_units_but_user_overrides_win(digits_discovery):
    from search_space import narrow_space

    space = SearchSpace(
        granularity="layer", ratio=(0.0, 0.8), step=0.05, overrides={"stem*": (0.0, 0.1)}
    )
    narrowed = narrow_space(space, {"stem.0": 0.5, "layer1.0.conv1": 0.33, "head.0": 0.9})
    assert narrowed.overrides["stem*"] == (0.0, 0.1) and "stem.0" not in narrowed.overrides
    assert narrowed.overrides["layer1.0.conv1"] == (0.0, 0.3)  # snapped down to the step grid
    assert narrowed.overrides["head.0"] == (0.0, 0.8)  # never above the space's own range
    for plan in sample(narrowed, digits_discovery, n=8):
        assert plan.ratios["layer1.0.conv1"] <= 0.3 + 1e-9 and plan.ratios["stem.0"] <= 0.1 + 1e-9


def test_seed_params_put_units_at_fractions_of_their_bounds(digits_discovery):
    from search_space import seed_params

    space = SearchSpace(granularity="layer", ratio=(0.0, 0.8), step=0.05, criteria=("lamp", "l1"))
    bounds = {n: 0.6 for n in digits_discovery.names}
    full, half = seed_params(space, digits_discovery, bounds, (1.0, 0.5))
    assert full["criterion"] == "lamp"
    assert {v for k, v in full.items() if k.startswith("ratio/")} == {0.6}
    assert {v for k, v in half.items() if k.startswith("ratio/")} == {0.3}
