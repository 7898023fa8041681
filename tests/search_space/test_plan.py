from __future__ import annotations

import json

import pytest

from search_space import PruningPlan


def make_plan(**kw) -> PruningPlan:
    base = dict(
        ratios={"b": 0.5, "a": 0.25},
        units={"a": ("x",), "b": ("y", "z")},
        criterion="lamp",
        round_to=8,
    )
    return PruningPlan(**{**base, **kw})


def test_json_round_trip_is_exact():
    plan = make_plan(criteria={"b": "l2"}, iterative_steps=3, global_pruning=True)
    text = plan.to_json()
    again = PruningPlan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    assert json.loads(text)["units"] == {"a": ["x"], "b": ["y", "z"]}


def test_group_ratios_expand_units():
    plan = make_plan()
    assert plan.group_ratios() == {"x": 0.25, "y": 0.5, "z": 0.5}
    assert plan.mean_ratio() == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert plan.max_group_ratio() == 0.5


def test_digest_is_stable_and_content_sensitive():
    assert make_plan().digest() == make_plan().digest()
    assert make_plan().digest() != make_plan(round_to=16).digest()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratios": {"a": 1.0, "b": 0.1}}, "must lie in [0, 1)"),
        ({"ratios": {"a": -0.1, "b": 0.1}}, "must lie in [0, 1)"),
        ({"ratios": {"a": 0.1}}, "must name the same units"),
        ({"round_to": 0}, "round_to"),
        ({"iterative_steps": 0}, "iterative_steps"),
    ],
)
def test_bad_plans_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        make_plan(**kwargs)


def test_unknown_keys_and_versions_are_refused():
    data = make_plan().to_dict()
    with pytest.raises(ValueError, match="unknown keys"):
        PruningPlan.from_dict({**data, "ratio": 0.3})
    with pytest.raises(ValueError, match="version 99"):
        PruningPlan.from_dict({**data, "version": 99})
