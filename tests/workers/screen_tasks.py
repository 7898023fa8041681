"""Tasks for the screening tests, named as ``module:function`` like a user's own task."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workers import Task, build_task


class Forbidden:
    """A validation loader that must never be read by screening."""

    def __iter__(self):
        raise AssertionError("screening read the validation loader")

    def __len__(self) -> int:
        return 1


def digits_without_validation(options: dict[str, Any]) -> Task:
    """The built-in digits task whose validation loader raises when read."""
    task = build_task("digits", options)
    task.val_loader = Forbidden()
    return task


# (gradients on?, the batch's labels) of every loss the screen computes: training or scoring.
LOSSES_SEEN: list[tuple[bool, tuple[int, ...]]] = []


def digits_watched(options: dict[str, Any]) -> Task:
    """Digits without validation data, whose loss records which batches it was computed on and
    whether for a training step (gradients on) or for the proxy's score."""
    return _watched(digits_without_validation(options))


def plain_watched(options: dict[str, Any]) -> Task:
    """``digits_watched`` with a model that has no BatchNorm (a small MLP, untrained: the
    screen needs no trained model to run)."""
    task = digits_watched(options)
    torch.manual_seed(0)
    task.model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return task


def _watched(task: Task) -> Task:
    loss = task.loss_fn

    def watched(out, y):
        LOSSES_SEEN.append((torch.is_grad_enabled(), tuple(y.tolist())))
        return loss(out, y)

    task.loss_fn = watched
    return task


def softmax_ended(options: dict[str, Any]) -> Task:
    """``plain_watched`` whose model ends in LogSoftmax after its last Linear: no output layer
    whose output is the model's (the screen's refit does not apply)."""
    task = plain_watched(options)
    task.model = nn.Sequential(*task.model, nn.LogSoftmax(dim=1))
    return task


def check_lighter_cut_ranks_higher(task: str, discovery: Any, heavy_criterion: str) -> None:
    """The screen's contract on a model of any shape: two uniform plans screen without failing,
    each with a finite proxy and a latency, and the lighter cut (0.2, l1) keeps more of the
    model than the heavier one (0.7, ``heavy_criterion``, a gradient criterion through the
    task's own loss)."""
    import math

    from search_space import uniform_plan
    from workers import TrialStatus, screen_candidates

    plans = [uniform_plan(discovery, 0.2), uniform_plan(discovery, 0.7, criterion=heavy_criterion)]
    results = screen_candidates(
        {
            "task": task,
            "bn_batches": 2,
            "score_batches": 2,
            "target": {"batch_size": 4, "warmup": 1, "rounds": 2, "runs": 3},
            "candidates": [{"number": i, "plan": p.to_dict()} for i, p in enumerate(plans)],
        }
    )
    assert [r.status for r in results] == [TrialStatus.COMPLETE] * 2, [r.reason for r in results]
    assert all(math.isfinite(r.proxy) and r.latency["median_ms"] > 0 for r in results)
    assert results[0].proxy > results[1].proxy
