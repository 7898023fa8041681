"""The screen's head refit (search.screen.refit_head), on the real digits model and data."""

from __future__ import annotations

import copy

import torch
from torch import nn

from search_space import discover, uniform_plan
from workers import (
    OutputHead,
    TrialStatus,
    adapt_batchnorm,
    build_task,
    proxy_batches,
    proxy_measures,
    screen_candidates,
)


def _slices(task):
    return proxy_batches(task, 0, 2, 2)


def _scored(model, task, bn, score, head):
    """The proxy of ``model`` with the output layer re-solved on its BatchNorm pass."""
    with head.watch(model) as seen:
        adapt_batchnorm(model, bn)
    refit = head.solve(seen)
    assert refit is not None
    return proxy_measures(model, task, score, refit)


def test_the_output_layer_is_the_linear_whose_output_the_model_returns(digits_task):
    bn, _ = _slices(digits_task)
    head = OutputHead.find(digits_task.model, bn)
    assert head is not None and head.name == "fc"
    assert head.targets.shape == (sum(len(y) for _, y in bn), 10)  # the base's outputs, stacked
    # Anything after the last Linear, a tuple returned, or no Linear: nothing to re-solve.
    after = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.LogSoftmax(dim=1))
    assert OutputHead.find(after, bn) is None
    assert OutputHead.find(_Pair(), bn) is None
    assert OutputHead.find(nn.Sequential(nn.Flatten()), bn) is None


def test_refit_takes_out_what_a_finetune_fixes_first_and_keeps_what_pruning_lost(digits_task):
    """An output layer scrambled (its class rows swapped) leaves the features whole: the plain
    loss calls the model ruined, the refit proxy scores it as the base. Features cut to a few
    channels have lost something no output layer gives back: the refit proxy says so."""
    bn, score = _slices(digits_task)
    base = digits_task.model
    head = OutputHead.find(base, bn)
    assert head is not None
    scrambled = copy.deepcopy(base)
    with torch.no_grad():
        scrambled.fc.weight.copy_(scrambled.fc.weight.roll(3, dims=0))
        scrambled.fc.bias.copy_(scrambled.fc.bias.roll(3))
    plain_base = proxy_measures(copy.deepcopy(base), digits_task, score)[0]
    plain_scrambled = proxy_measures(scrambled, digits_task, score)[0]
    refit_base = _scored(copy.deepcopy(base), digits_task, bn, score, head)[0]
    refit_scrambled = _scored(scrambled, digits_task, bn, score, head)[0]
    assert plain_scrambled < plain_base - 1.0  # the stale layer: a loss far worse
    assert abs(refit_scrambled - refit_base) < 0.05  # re-solved: the same features, the same proxy
    collapsed = copy.deepcopy(base)
    with torch.no_grad():
        collapsed.head[0].weight.zero_()  # every feature the output layer reads is now constant
    worst, se, _ = _scored(collapsed, digits_task, bn, score, head)
    assert worst < refit_base - 1.0 and se >= 0.0  # finite, solvable, and ranked far lower


def test_the_screen_scores_through_the_refit_unless_turned_off(digits_task, digits_discovery):
    plans = [uniform_plan(digits_discovery, r) for r in (0.2, 0.6)]
    job = {
        "task": "digits",
        "seed": 0,
        "bn_batches": 2,
        "score_batches": 2,
        "timed": [],
        "candidates": [{"number": i, "plan": p.to_dict()} for i, p in enumerate(plans)],
    }
    on = screen_candidates(job)
    off = screen_candidates(job | {"refit_head": False})
    assert all(r.status == TrialStatus.COMPLETE for r in on + off), [r.reason for r in on + off]
    assert [r.refit for r in on] == [True, True] and [r.refit for r in off] == [False, False]
    assert on[0].proxy > on[1].proxy and off[0].proxy > off[1].proxy  # deeper cuts rank lower
    assert on[1].proxy > off[1].proxy  # the stale output layer costs the deep cut more
    assert [r.score for r in on] == [r.score for r in off]  # the score is the model's own


def test_a_model_without_an_output_linear_is_scored_by_the_plain_loss():
    """``plain_watched``'s MLP (no BatchNorm) does have one: its refit runs on a forward pass of
    the BatchNorm slice; a model ending in LogSoftmax has none and keeps the plain loss."""

    def screened(name: str):
        task = build_task(f"tests.workers.screen_tasks:{name}")
        plan = uniform_plan(discover(task.model, task.example_inputs), 0.3)
        job = {
            "task": f"tests.workers.screen_tasks:{name}",
            "seed": 0,
            "bn_batches": 2,
            "score_batches": 2,
            "timed": [],
            "steps": 0,
            "candidates": [{"number": 0, "plan": plan.to_dict()}],
        }
        (result,) = screen_candidates(job)
        assert result.status == TrialStatus.COMPLETE, result.reason
        return result

    assert screened("plain_watched").refit
    assert not screened("softmax_ended").refit


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fc(x.flatten(1))
        return out, out
