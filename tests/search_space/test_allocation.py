"""The latency-aware allocator: pure, so tested on hand-made profiles."""

from __future__ import annotations

import random

import optuna
import pytest

from search_space import (
    GroupProfile,
    LayerCost,
    Profile,
    PruningPlan,
    SearchSpace,
    allocate,
    fit_costs,
    kept_channels,
    kept_ratio_cap,
    suggest_plan,
    uniform_plan,
    with_damage,
)


def _profile() -> Profile:
    """Three groups in a chain: "cheap" does much work and matters little, "vital" the opposite."""
    groups = {
        "cheap": GroupProfile(32, tuple(0.01 * (i + 1) for i in range(32))),
        "vital": GroupProfile(32, tuple(1.0 + i for i in range(32))),
        "mid": GroupProfile(16, tuple(0.5 for _ in range(16))),
    }
    layers = (
        LayerCost("a", 1000.0, "cheap", None),
        LayerCost("b", 4000.0, "mid", "cheap"),
        LayerCost("c", 300.0, "vital", "mid"),
        LayerCost("head", 50.0, None, "vital"),
    )
    return Profile(groups, layers, intercept=10.0)


def test_blend_zero_is_the_uniform_plan():
    profile = _profile()
    for level in (0.0, 0.25, 0.5, 0.75):
        assert allocate(profile, level, 0.0, max_ratio=0.9) == dict.fromkeys(profile.groups, level)


def test_allocation_costs_what_the_uniform_plan_costs_and_cuts_where_importance_is_cheap():
    profile = _profile()
    for level in (0.25, 0.5):
        ratios = allocate(profile, level, 1.0, max_ratio=0.9)
        uniform = profile.predict(dict.fromkeys(profile.groups, level))
        assert profile.predict(ratios) == pytest.approx(uniform, rel=0.02)
        assert ratios["cheap"] > level > ratios["vital"]


def test_groups_left_whole_are_not_pruned_and_the_rest_save_what_uniform_on_them_saves():
    profile = _profile()
    for whole in (("vital",), ("cheap", "mid"), ("mid",)):
        rest = [g for g in profile.groups if g not in whole]
        for level in (0.25, 0.5):
            uniform = allocate(profile, level, 0.0, max_ratio=0.9, whole=whole)
            assert uniform == {g: 0.0 if g in whole else level for g in profile.groups}
            ratios = allocate(profile, level, 1.0, max_ratio=0.9, whole=whole)
            assert all(ratios[g] == 0.0 for g in whole) and any(ratios[g] > 0 for g in rest)
            assert profile.predict(ratios) == pytest.approx(profile.predict(uniform), rel=0.02)
    # Nothing left to prune but one group: the allocator takes what its cap allows there.
    capped = allocate(profile, 0.5, 1.0, max_ratio=0.6, whole=("cheap", "vital"))
    assert capped["cheap"] == capped["vital"] == 0.0 and 0.5 <= capped["mid"] <= 0.6
    assert allocate(profile, 0.5, 1.0, whole=()) == allocate(profile, 0.5, 1.0)


def test_the_cost_model_counts_both_sides_of_a_layer():
    profile = _profile()
    # "b" loses a quarter of its work per side at half width: 4000 * 0.5 * 0.5 left.
    assert profile.predict({"cheap": 0.5, "mid": 0.5}) == pytest.approx(10 + 500 + 1000 + 150 + 50)
    assert Profile.from_dict(profile.to_dict()) == profile


def test_blend_moves_between_uniform_and_allocation():
    profile = _profile()
    full, half = allocate(profile, 0.5, 1.0), allocate(profile, 0.5, 0.5)
    for g in profile.groups:
        assert half[g] == pytest.approx((0.5 + full[g]) / 2, abs=1e-3)


def test_caps_keep_round_to_channels_and_max_ratio():
    groups = {
        "a": GroupProfile(16, tuple(0.0 for _ in range(16))),
        "b": GroupProfile(16, tuple(9.0 for _ in range(16))),
    }
    profile = Profile(groups, (LayerCost("x", 100.0, "a", None), LayerCost("y", 100.0, "b", "a")))
    ratios = allocate(profile, 0.7, 1.0, max_ratio=0.95, round_to=8)
    assert 16 - round(ratios["a"] * 16) >= 8
    assert allocate(profile, 0.7, 1.0, max_ratio=0.5)["a"] <= 0.5


def _pruned_keeps(ratio: float, channels: int, round_to: int) -> int:
    """What our pruner keeps at ``ratio``: the ratio capped so ``round_to`` channels stay, then
    Torch-Pruning's ``int(C * (1 - r))`` rounded down to ``round_to`` when it prunes."""
    kept = int(channels * (1 - kept_ratio_cap(ratio, channels, round_to)))
    return kept - kept % round_to if kept < channels else kept


def test_rounded_allocation_is_what_the_pruner_keeps_and_costs_what_uniform_costs():
    # Uneven groups (48 channels: 32 removed is 0.6667, which a plain round would push a hair
    # over, so that the pruner keeps 15 and rounds down to 8).
    rng = random.Random(1)
    groups = {
        n: GroupProfile(c, tuple(rng.uniform(0, s) for _ in range(c)))
        for n, c, s in (("a", 48, 1.0), ("b", 24, 5.0), ("c", 16, 0.2), ("d", 40, 2.0))
    }
    layers = (
        LayerCost("l1", 900.0, "a", None),
        LayerCost("l2", 3000.0, "b", "a"),
        LayerCost("l3", 1200.0, "c", "b"),
        LayerCost("l4", 2500.0, "d", "c"),
        LayerCost("head", 40.0, None, "d"),
    )
    profile = Profile(groups, layers, intercept=5.0)
    for level in (0.2, 0.35, 0.5, 0.65):
        uniform_kept = {g: _pruned_keeps(level, p.channels, 8) for g, p in groups.items()}
        uniform_cost = profile.predict(
            {g: 1 - k / groups[g].channels for g, k in uniform_kept.items()}
        )
        block = max(
            profile.predict({}) - profile.predict({g: 8 / p.channels}) for g, p in groups.items()
        )
        for blend in (0.5, 1.0):
            ratios = allocate(profile, level, blend, max_ratio=0.9, round_to=8)
            for g, r in ratios.items():
                c = groups[g].channels
                kept = int(c * (1 - r))
                # The ratio itself lands on a step: nothing is left for the pruner to round.
                assert kept == c or kept % 8 == 0, (level, blend, g, r, kept)
                assert kept >= 8
            if blend == 1.0:
                applied = {
                    g: 1 - _pruned_keeps(r, groups[g].channels, 8) / groups[g].channels
                    for g, r in ratios.items()
                }
                assert abs(profile.predict(applied) - uniform_cost) <= block / 2 + 1e-9, level


def test_a_group_cut_in_slices_is_allocated_a_slice_at_a_time():
    # A GroupNorm(8, 32) group loses channels 8 at a time (one of each slice): the allocator
    # must allocate in those steps, ranked by each index's importance over the slices, and its
    # plans must cost, as pruned, what the uniform plan costs as pruned (within half a step).
    rng = random.Random(3)
    importance = tuple(rng.uniform(0.1, 2.0) for _ in range(32))
    groups = {
        "normed": GroupProfile(32, importance, split=8),
        "plain": GroupProfile(24, tuple(rng.uniform(0.1, 2.0) for _ in range(24))),
    }
    layers = (
        LayerCost("l1", 2000.0, "normed", None),
        LayerCost("l2", 1500.0, "plain", "normed"),
        LayerCost("head", 10.0, None, "plain"),
    )
    profile = Profile(groups, layers, intercept=1.0)
    assert Profile.from_dict(profile.to_dict()) == profile  # the slices travel with it
    assert profile.splits == {"normed": 8, "plain": 1}
    with pytest.raises(ValueError, match="split"):
        GroupProfile(30, tuple(range(30)), split=8)
    for level in (0.1, 0.3, 0.5, 0.7):
        uniform = {g: level for g in groups}
        uniform_cost = profile.predict(
            PruningPlan(uniform, {g: (g,) for g in groups}).applied_ratios(
                profile.channels, profile.splits
            )
        )
        step_cost = profile.predict({}) - profile.predict({"normed": 8 / 32})
        for blend in (0.5, 1.0):
            ratios = allocate(profile, level, blend)
            kept = {
                g: kept_channels(r, groups[g].channels, 1, groups[g].split)
                for g, r in ratios.items()
            }
            assert kept["normed"] % 8 == 0 and kept["normed"] == int(32 * (1 - ratios["normed"]))
            if blend == 1.0:
                plan = PruningPlan(ratios, {g: (g,) for g in groups})
                cost = profile.predict(plan.applied_ratios(profile.channels, profile.splits))
                assert abs(cost - uniform_cost) <= step_cost / 2 + 1e-9, level


def test_the_budget_is_the_uniform_plan_as_the_pruner_applies_it_with_round_to_kept():
    # At 0.6 with round_to 8 a 16-channel group would round to nothing; the pruner caps it to
    # keep 8 (removes half), so the uniform plan saves far less than "wholly removed" says.
    groups = {
        "small": GroupProfile(16, tuple(0.1 * (i + 1) for i in range(16))),
        "wide": GroupProfile(32, tuple(0.1 * (i + 1) for i in range(32))),
    }
    layers = (
        LayerCost("l1", 2000.0, "small", None),
        LayerCost("l2", 1000.0, "wide", "small"),
        LayerCost("head", 10.0, None, "wide"),
    )
    profile = Profile(groups, layers, intercept=1.0)
    as_pruned = {g: 1 - _pruned_keeps(0.6, p.channels, 8) / p.channels for g, p in groups.items()}
    assert as_pruned == {"small": 0.5, "wide": 0.75}
    ratios = allocate(profile, 0.6, 1.0, max_ratio=0.95, round_to=8)
    applied = {
        g: 1 - _pruned_keeps(r, groups[g].channels, 8) / groups[g].channels
        for g, r in ratios.items()
    }
    block = max(
        profile.predict({}) - profile.predict({g: 8 / p.channels}) for g, p in groups.items()
    )
    assert abs(profile.predict(applied) - profile.predict(as_pruned)) <= block / 2 + 1e-9
    # Counting "small" as wholly removed would have asked for a saving no plan can reach.
    assert profile.predict({"small": 1.0, "wide": 0.75}) < profile.predict(applied) - block / 2


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="level"):
        allocate(_profile(), 1.0)
    with pytest.raises(ValueError, match="blend"):
        allocate(_profile(), 0.5, 1.5)
    with pytest.raises(ValueError, match="importances"):
        GroupProfile(4, (1.0, 2.0))
    with pytest.raises(ValueError, match="nope"):
        Profile(_profile().groups, (LayerCost("z", 1.0, "nope", None),))


def test_fit_costs_recovers_each_layers_milliseconds_from_measured_plans():
    rng = random.Random(0)
    profile = _profile()
    truth = {"a": 2e-3, "b": 1e-4, "c": 3e-3, "head": 1e-3}  # ms per MAC: the layers are not alike
    plans, lat = [], []
    for _ in range(60):
        ratios = {g: rng.uniform(0, 0.8) for g in profile.groups}
        plans.append(ratios)
        keep = {g: 1 - r for g, r in ratios.items()} | {None: 1.0}
        work = {x.name: x.cost * keep[x.out_group] * keep[x.in_group] for x in profile.layers}
        lat.append(0.5 + sum(truth[n] * w for n, w in work.items()) + rng.gauss(0, 0.005))
    fitted = fit_costs(profile, plans, lat, prior_weight=0.01)
    assert fitted.unit == "ms" and fitted.intercept == pytest.approx(0.5, abs=0.1)
    for x, orig in zip(fitted.layers, profile.layers, strict=True):
        if x.name in ("a", "b", "c"):  # the head does too little work to be told apart from noise
            assert x.cost == pytest.approx(truth[x.name] * orig.cost, rel=0.25), x.name
    assert fit_costs(profile, plans[:2], lat[:2]) == profile  # too few plans: the prior stays


def test_suggest_plan_allocation_needs_a_profile_and_blend_zero_matches_uniform(digits_discovery):
    space = SearchSpace(ratio=(0.0, 0.8))
    groups = {
        g.name: GroupProfile(g.channels, tuple(float(i) for i in range(g.channels)))
        for g in digits_discovery.groups
    }
    profile = Profile(groups, tuple(LayerCost(g, 100.0 + i, g, None) for i, g in enumerate(groups)))
    trial = optuna.trial.FixedTrial(
        {
            "alloc/level": 0.4,
            "alloc/blend": 0.0,
            "criterion": "l1",
            "round_to": 1,
            "global_pruning": False,
            "isomorphic": False,
            "iterative_steps": 1,
        }
    )
    plan = suggest_plan(trial, space, digits_discovery, profile)
    assert plan.group_ratios() == uniform_plan(digits_discovery, 0.4).group_ratios()
    with pytest.raises(ValueError, match="profile"):
        suggest_plan(trial, space, digits_discovery)


def test_a_subset_plan_leaves_the_groups_it_samples_whole(digits_discovery):
    space = SearchSpace(ratio=(0.0, 0.8))
    names = digits_discovery.names
    groups = {
        g.name: GroupProfile(g.channels, tuple(float(i) for i in range(g.channels)))
        for g in digits_discovery.groups
    }
    profile = Profile(groups, tuple(LayerCost(g, 100.0 + i, g, None) for i, g in enumerate(groups)))
    fixed = {
        "alloc/level": 0.4,
        "alloc/blend": 1.0,
        "criterion": "l1",
        "round_to": 1,
        "global_pruning": False,
        "isomorphic": False,
        "iterative_steps": 1,
    }
    whole = set(names[::2])
    params = fixed | {f"alloc/whole/{g}": g in whole for g in names}
    ratios = suggest_plan(
        optuna.trial.FixedTrial(params), space, digits_discovery, profile, subset=True
    ).ratios
    on_rest = {g: 0.0 if g in whole else 0.4 for g in names}
    assert all(ratios[g] == 0.0 for g in whole) and any(ratios[g] > 0 for g in names)
    assert profile.predict(ratios) == pytest.approx(profile.predict(on_rest), rel=0.02)
    # Every group whole would be the base model: the plain allocation instead.
    params = fixed | {f"alloc/whole/{g}": True for g in names}
    every = suggest_plan(
        optuna.trial.FixedTrial(params), space, digits_discovery, profile, subset=True
    )
    plain = suggest_plan(optuna.trial.FixedTrial(fixed), space, digits_discovery, profile)
    assert every.ratios == plain.ratios and any(r > 0 for r in plain.ratios.values())


def test_measured_damage_becomes_importance_in_one_unit_across_groups():
    """Each group pruned alone: "vital" hurt the loss most, "cheap" barely. With damage as the
    importance the allocator cuts where the measured damage per unit of cost is least, whatever
    the first-order importances said (here reversed on purpose)."""
    reversed_importance = Profile(
        {
            "cheap": GroupProfile(32, tuple(10.0 + i for i in range(32))),
            "vital": GroupProfile(32, tuple(0.001 * (i + 1) for i in range(32))),
            "mid": GroupProfile(16, (0.5,) * 16),
        },
        _profile().layers,
        intercept=10.0,
    )
    damage = {
        "cheap": {0.25: 0.001, 0.5: 0.002, 0.75: 0.01},
        "vital": {0.25: 0.5, 0.5: 2.0, 0.75: 6.0},
        "mid": {0.25: 0.05, 0.5: 0.2, 0.75: 0.3},
    }
    measured = with_damage(reversed_importance, damage)
    assert measured.layers == reversed_importance.layers  # the cost model is untouched
    vital = measured.groups["vital"].importance
    # 8 channels to the first point (0.5 over 8: 0.0625 each), then 1.5 over the next 8.
    assert vital[0] == pytest.approx(0.5 / 8) and vital[8] == pytest.approx(1.5 / 8)
    assert vital[-1] == pytest.approx(4.0 / 8)  # past the last point: the last slope
    ratios = allocate(measured, 0.5, 1.0, max_ratio=0.9)
    assert ratios["cheap"] > 0.5 > ratios["vital"]
    flipped = allocate(reversed_importance, 0.5, 1.0, max_ratio=0.9)
    assert flipped["vital"] > ratios["vital"]


def test_damage_noise_and_missing_groups_do_not_invent_preferences():
    profile = _profile()
    # A point below an earlier one is noise: the curve is held flat there, never negative.
    measured = with_damage(profile, {"cheap": {0.25: 0.4, 0.5: 0.1, 0.75: 0.4}, "vital": {}})
    cheap = measured.groups["cheap"].importance
    assert min(cheap) >= 0.0 and sum(cheap) == pytest.approx(0.4) and cheap.count(0.0) == 24
    # "vital" and "mid" measured nothing: both get the median slope of what was measured.
    assert len(set(measured.groups["vital"].importance)) == 1
    assert measured.groups["vital"].importance == measured.groups["mid"].importance[:1] * 32
