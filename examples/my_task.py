"""Plug your own model into prunesearch: a function that returns a ``workers.Task``.

Point a config at it with ``task: examples.my_task:build``: a ``module:function`` resolves from
the config file's directory and the current directory (on the driver and on every Ray worker,
and it travels with ``submit``), from PYTHONPATH, or from an installed ``prunesearch.tasks``
entry point.
``task_options`` from the config arrive as the ``options`` dict.

Here: a small 1-D CNN on generated sensor-like data, trained in a few seconds. Replace the
body with "load my checkpoint, build my loaders".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from workers import Task, finetune


def make_model(channels: int = 32, classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, channels, 5, padding=2),
        nn.BatchNorm1d(channels),
        nn.ReLU(),
        nn.Conv1d(channels, 2 * channels, 5, padding=2, stride=2),
        nn.BatchNorm1d(2 * channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(2 * channels, classes),
    )


def make_data(n: int, seed: int, classes: int = 4, noise: float = 1.3) -> TensorDataset:
    """Sines of class-dependent frequency in noise: learnable, no download, and noisy enough that
    a pruned model loses accuracy (a front with a real trade-off, not one perfect point)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    t = torch.linspace(0, 1, 64)
    freq = (y.float() + 1).view(-1, 1, 1) * 3
    x = torch.sin(2 * torch.pi * freq * t) + noise * torch.randn(n, 3, 64, generator=g)
    return TensorDataset(x, y)


def build(options: Mapping[str, Any]) -> Task:
    torch.manual_seed(int(options.get("seed", 0)))
    noise = float(options.get("noise", 1.3))
    train, val = make_data(800, seed=1, noise=noise), make_data(200, seed=2, noise=noise)
    task = Task(
        model=make_model(int(options.get("channels", 32))),
        example_inputs=train[0][0].unsqueeze(0),  # one batch the model accepts
        train_loader=DataLoader(train, batch_size=64, shuffle=True),
        val_loader=DataLoader(val, batch_size=200),
    )
    # Your base model would load a checkpoint here; this example trains briefly instead.
    finetune(task.model, task, epochs=int(options.get("epochs", 3)), lr=0.05)
    return task
