from __future__ import annotations

import optuna
import pytest

from orchestrator import Point, faster_than_base, front, front_table, hypervolume
from search_space import PruningPlan


def test_hypervolume_of_a_known_staircase():
    # Reference: latency 10 ms, accuracy floor 0.5.
    pts = [Point(0, 0.9, 4.0), Point(1, 0.7, 2.0)]
    # [2,4) at height 0.2, [4,10) at height 0.4 -> 0.4 + 2.4
    assert hypervolume(pts, 10.0, 0.5) == pytest.approx(2.8)


def test_dominated_and_out_of_box_points_add_nothing():
    pts = [Point(0, 0.9, 4.0), Point(1, 0.7, 2.0)]
    more = pts + [Point(2, 0.6, 5.0), Point(3, 0.99, 11.0), Point(4, 0.4, 1.0)]
    assert hypervolume(more, 10.0, 0.5) == pytest.approx(hypervolume(pts, 10.0, 0.5))
    assert hypervolume([], 10.0, 0.5) == 0.0


def test_front_excludes_infeasible_trials():
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc, lat, feasible in [
        (0.9, 5.0, True),
        (0.95, 6.0, False),
        (0.8, 2.0, True),
        (0.7, 3.0, True),
    ]:
        t = study.ask()
        t.set_constraint("latency_ms", -1.0 if feasible else 1.0)
        study.tell(t, [acc, lat])
    assert [t.number for t in front(study)] == [2, 0]  # sorted by latency; trial 1 is infeasible


def test_front_leaves_out_what_the_base_model_dominates():
    """A pruned model no faster than the base and no more accurate is no pick: on a target where
    pruning buys no speed, every trial can be such a model and the front is empty."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc, lat in [(0.94, 3.48), (0.81, 3.34), (0.96, 3.50), (0.93, 3.425)]:
        study.tell(study.ask(), [acc, lat])
    base = {"accuracy": 0.95, "latency_ms": 3.425}
    assert [t.number for t in front(study)] == [1, 3, 0, 2]
    # 0 is slower and less accurate; 3 as fast and less accurate;
    # 1 is faster, 2 more accurate: both stay.
    assert [t.number for t in front(study, base)] == [1, 2]
    slow = {"accuracy": 0.99, "latency_ms": 3.0}
    assert front(study, slow) == []


def test_faster_than_the_base_means_by_more_than_its_latency_s_noise_floor():
    """Timed paired, the base model against itself spreads by its noise floor: a model within
    it is not shown faster, so one that is also less accurate is no pick; more accurate, it
    stays."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc, lat in [(0.90, 9.0), (0.93, 9.7), (0.96, 9.8)]:
        study.tell(study.ask(), [acc, lat])
    base = {"accuracy": 0.95, "latency_ms": 10.0}
    assert [t.number for t in front(study, base)] == [0, 1, 2]  # unpaired: no floor
    noisy = base | {"calibration_noise": 0.05}
    assert faster_than_base(noisy) == pytest.approx(9.5)
    # 1 is 3 % faster and less accurate (within the floor); 2 is more accurate.
    assert [t.number for t in front(study, noisy)] == [0, 2]
    assert front(study, noisy | {"calibration_noise": 0.2, "accuracy": 0.99}) == []


def test_the_front_table_names_the_criteria_that_ranked_each_model():
    """A bn_scale plan on layers without BatchNorm was ranked by l1: the table says l1 (most
    groups first where criteria mixed), and the plan's own criterion where a trial from before
    trials reported it said nothing."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    units = {"a": ("a",), "b": ("b",), "c": ("c",)}
    for acc, lat, ranked_by in [
        (0.9, 3.0, {"l1": 3}),
        (0.8, 2.0, {"l1": 1, "bn_scale": 2}),
        (0.7, 1.0, None),
    ]:
        t = study.ask()
        plan = PruningPlan(ratios=dict.fromkeys(units, 0.3), units=units, criterion="bn_scale")
        t.set_user_attr("plan", plan.to_dict())
        if ranked_by is not None:
            t.set_user_attr("ranked_by", ranked_by)
        study.tell(t, [acc, lat])
    rows = front_table(study, {"accuracy": 0.95, "latency_ms": 4.0})
    assert [(r["trial"], r["criterion"]) for r in rows] == [
        (2, "bn_scale"),
        (1, "bn_scale+l1"),
        (0, "l1"),
    ]
