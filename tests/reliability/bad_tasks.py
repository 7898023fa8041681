"""Tasks a search must refuse before any trial, each broken in one way (tests/reliability/test_bad_input.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from workers import Task, build_digits


class ListOutput(nn.Module):
    """Returns Python lists: Torch-Pruning has no autograd graph to trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor):
        return self.fc(self.conv(x).mean((2, 3))).tolist()


def untraceable(options: Mapping[str, Any]) -> Task:
    task = build_digits({})
    task.model = ListOutput().eval()
    return task


class OnlyTheHead(nn.Module):
    """One Linear layer, the classifier: its outputs are the classes, so nothing can be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def nothing_to_prune(options: Mapping[str, Any]) -> Task:
    task = build_digits({})
    task.model = OnlyTheHead().eval()
    return task


def empty_train(options: Mapping[str, Any]) -> Task:
    task = build_digits({})
    task.train_loader = DataLoader(
        TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=64
    )
    return task


def empty_val(options: Mapping[str, Any]) -> Task:
    task = build_digits({})
    task.val_loader = DataLoader(
        TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=64
    )
    return task


def three_channels(options: Mapping[str, Any]) -> Task:
    """Example inputs the model cannot run (3 channels for a 1-channel model)."""
    task = build_digits({})
    task.example_inputs = torch.zeros(1, 3, 8, 8)
    return task


def smaller_images(options: Mapping[str, Any]) -> Task:
    """Example inputs the model runs (it pools globally) but that are not what it is trained on:
    latency would be measured on 4x4 images for a model that serves 8x8 ones."""
    task = build_digits({})
    task.example_inputs = torch.zeros(1, 1, 4, 4)
    return task


def no_batch_dim(options: Mapping[str, Any]) -> Task:
    task = build_digits({})
    task.example_inputs = task.example_inputs[0]
    return task


def not_a_task(options: Mapping[str, Any]) -> dict:
    return {"model": None}


def missing_checkpoint(options: Mapping[str, Any]) -> Task:
    torch.load("/nonexistent/prunesearch/checkpoint.pt", weights_only=True)
    raise AssertionError("unreachable")


NOT_CALLABLE = 42
