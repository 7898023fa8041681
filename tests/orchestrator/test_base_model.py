"""The base model's check: a search over an untrained model says so once its accuracy is known."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from orchestrator import untrained_warning
from workers import Task


def _task(outputs: int, evaluate=None) -> Task:
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, max(outputs, 2), (8,)))
    return Task(
        model=nn.Linear(4, outputs),
        example_inputs=torch.randn(1, 4),
        train_loader=DataLoader(data, batch_size=4),
        val_loader=DataLoader(data, batch_size=4),
        evaluate=evaluate,
    )


def test_an_accuracy_at_guessing_names_the_classes_the_level_and_the_task():
    warning = untrained_warning(_task(10), 0.0781, "zoo:build")
    assert warning is not None
    assert "0.0781" in warning and "10 outputs" in warning and "0.1000" in warning
    assert "'zoo:build'" in warning and "trained weights" in warning


def test_a_trained_accuracy_or_a_task_scored_its_own_way_warns_nothing():
    assert untrained_warning(_task(10), 0.16, "t") is None  # clear of 1/10 + 0.05
    assert untrained_warning(_task(2), 0.9, "t") is None
    assert untrained_warning(_task(2), 0.52, "t") is not None  # a coin flip on two classes
    # A task's own evaluate has no known floor (a score in [0, 1] that need not be accuracy).
    assert untrained_warning(_task(10, evaluate=lambda m, loader: 0.01), 0.01, "t") is None


def test_an_output_with_no_class_axis_warns_nothing():
    assert untrained_warning(_task(1), 0.0, "t") is None  # one output: no classes to guess among
    task = _task(10)
    task.model = nn.Sequential(nn.Linear(4, 10), nn.Flatten(0))  # a flat vector, not [batch, C]
    assert untrained_warning(task, 0.0, "t") is None
