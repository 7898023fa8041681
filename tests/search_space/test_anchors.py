"""Anchor trials: every unit at one ratio, evenly spaced over the space's range."""

from __future__ import annotations

import optuna
import pytest

from search_space import SearchSpace, anchor_params, spread_order, suggest_plan


def ratios(params: dict) -> set[float]:
    return {v for k, v in params.items() if k.startswith("ratio/")}


@pytest.mark.parametrize("count", range(1, 9))
def test_every_prefix_of_the_order_is_spread_and_the_top_comes_first(count):
    order = spread_order(count)
    assert sorted(order) == list(range(1, count + 1)) and order[0] == count
    if count >= 2:
        assert (
            order[1] == count // 2
        )  # the second splits the range: a 2-trial prefix is low and high


def test_anchors_put_every_unit_at_one_ratio_evenly_spaced_top_first(digits_discovery):
    space = SearchSpace(granularity="layer", ratio=(0.0, 0.8), step=0.05)
    anchors = anchor_params(space, digits_discovery, 4)
    assert [ratios(a) for a in anchors] == [{0.8}, {0.4}, {0.2}, {0.6}]
    for a in (
        anchors
    ):  # every unit, the first criterion, the finest rounding: an anchor prunes exactly its ratio
        assert set(a) == {f"ratio/{n}" for n in digits_discovery.names} | {"criterion", "round_to"}
        assert a["criterion"] == "l1" and a["round_to"] == 1


def test_anchors_start_above_the_low_end_and_snap_to_the_step_grid(digits_discovery):
    space = SearchSpace(granularity="layer", ratio=(0.1, 0.7), step=0.05)
    levels = sorted(next(iter(ratios(a))) for a in anchor_params(space, digits_discovery, 4))
    assert levels == [0.25, 0.4, 0.55, 0.7]
    odd = SearchSpace(granularity="layer", ratio=(0.0, 0.7), step=0.1)
    assert sorted(next(iter(ratios(a))) for a in anchor_params(odd, digits_discovery, 3)) == [
        0.2,
        0.4,
        0.7,
    ]


def test_anchors_respect_each_units_own_range_and_drop_duplicates(digits_discovery):
    space = SearchSpace(
        granularity="layer",
        ratio=(0.0, 0.8),
        step=0.05,
        overrides={"stem*": (0.0, 0.0), "head*": (0.0, 0.3)},
    )
    anchors = anchor_params(space, digits_discovery, 4)
    for a in anchors:
        assert not any(k.startswith("ratio/stem") for k in a)  # frozen: not a parameter
        assert all(v <= 0.3 for k, v in a.items() if k.startswith("ratio/head"))
    narrow = SearchSpace(
        granularity="layer", ratio=(0.0, 0.8), step=0.05, overrides={"*": (0.0, 0.2)}
    )
    assert [ratios(a) for a in anchor_params(narrow, digits_discovery, 4)] == [
        {0.2}
    ]  # all clip to one
    assert (
        anchor_params(SearchSpace(granularity="layer", ratio=(0.0, 0.0)), digits_discovery, 4) == []
    )


def test_uniform_and_block_granularity_get_anchors_per_unit(digits_discovery):
    uniform = SearchSpace(
        granularity="uniform", ratio=(0.0, 0.6), criteria=("lamp", "l1"), round_to=(8, 4)
    )
    assert anchor_params(uniform, digits_discovery, 2) == [
        {"ratio/all": 0.6, "criterion": "lamp", "round_to": 4},
        {"ratio/all": 0.3, "criterion": "lamp", "round_to": 4},
    ]
    blocks = anchor_params(SearchSpace(granularity="block"), digits_discovery, 1)[0]
    assert {k for k in blocks if k.startswith("ratio/")} == {
        "ratio/stem",
        "ratio/layer1",
        "ratio/layer2",
        "ratio/layer3",
        "ratio/head",
    }


def test_an_enqueued_anchor_becomes_the_plan(digits_discovery):
    space = SearchSpace(granularity="layer", ratio=(0.0, 0.8), step=0.05, criteria=("l1", "lamp"))
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.TPESampler(seed=0)
    )
    for params in anchor_params(space, digits_discovery, 3):
        study.enqueue_trial(params)
    plans = []
    for _ in range(3):
        trial = study.ask()
        plans.append(suggest_plan(trial, space, digits_discovery))
        study.tell(trial, [0.9, 1.0])
    assert [set(p.ratios.values()) for p in plans] == [
        {0.8},
        {0.25},
        {0.5},
    ]  # 0.267 and 0.533 snapped down
    assert all(p.criterion == "l1" and p.round_to == 1 for p in plans)
