"""apply_plan on the digits network: ratios become channel counts, monotonically."""

from __future__ import annotations

import pytest
import torch

from search_space import PruningPlan, discover
from workers import DigitsNet, apply_plan, channel_counts

X = torch.randn(2, 1, 8, 8)


def _plan(ratios: dict[str, float], round_to: int = 1) -> PruningPlan:
    return PruningPlan(ratios=ratios, units={n: (n,) for n in ratios}, round_to=round_to)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DigitsNet().eval()


def test_a_ratio_removes_that_share_of_a_group_and_leaves_the_rest_alone(model):
    names = discover(model, X).names
    target = names[0]
    pruned = apply_plan(model, X, _plan({target: 0.5}))
    before, after = channel_counts(model), channel_counts(pruned)
    assert after[target] == before[target] // 2
    assert pruned(X).shape == model(X).shape
    untouched = [n for n in names if n != target and n in before]
    assert untouched and all(after[n] == before[n] for n in untouched)


@pytest.mark.parametrize("ratio, kept", [(0.5, 16), (0.7, 8), (0.8, 8), (0.95, 8)])
def test_round_to_never_lets_a_high_ratio_skip_the_group(model, ratio, kept):
    # 32 channels at 0.8 leave 6.4, which round_to=8 rounds to 0: Torch-Pruning would then
    # skip the group and prune nothing. The plan must instead keep one block of 8.
    name = "stem.0"
    assert channel_counts(model)[name] == 32
    pruned = apply_plan(model, X, _plan({name: ratio}, round_to=8))
    assert channel_counts(pruned)[name] == kept


def test_a_group_no_larger_than_round_to_is_left_whole():
    torch.manual_seed(0)
    narrow = DigitsNet(width=8).eval()
    pruned = apply_plan(narrow, X, _plan({"stem.0": 0.9}, round_to=8))
    assert channel_counts(pruned)["stem.0"] == 8


def test_a_plan_for_another_model_is_refused_by_name(model):
    with pytest.raises(ValueError, match="groups this model does not have"):
        apply_plan(model, X, _plan({"encoder.7": 0.5}))
