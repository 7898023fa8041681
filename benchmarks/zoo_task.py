"""torchvision's MobileNetV2 (``weights=None``) for ``benchmarks.quality --tasks
benchmarks.zoo_task:build``: a second model family outside the built-in tasks, as a user brings it.

Inverted residual blocks with depthwise convs, ReLU6 and BatchNorm, on scikit-learn's digits
upsampled to 32x32 and repeated over three channels (no download). ``width`` is torchvision's
``width_mult``. Nothing in prunesearch knows this module: the search must work on it unchanged.
The base model trains once per options and is cached (``workers.load_or_train``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torchvision
from torch.utils.data import DataLoader

from benchmarks.mixed_task import digits_data
from workers import Task, load_or_train

DEFAULTS = {"seed": 0, "width": 0.5, "base_epochs": 15, "base_lr": 0.05}


def build(options: Mapping[str, Any]) -> Task:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"task_options: unknown keys {unknown}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    torch.manual_seed(int(opts["seed"]))
    train, val = digits_data(int(opts["seed"]), size=32, channels=3)
    gen = torch.Generator().manual_seed(int(opts["seed"]))
    model = torchvision.models.mobilenet_v2(
        weights=None, num_classes=10, width_mult=float(opts["width"])
    )
    task = Task(
        model=model,
        example_inputs=train[0][0].unsqueeze(0),
        train_loader=DataLoader(train, batch_size=64, shuffle=True, generator=gen),
        val_loader=DataLoader(val, batch_size=256),
    )
    load_or_train(
        task, opts, "zoo-mobilenet_v2", version=1
    )  # trained once per options, then cached
    return task
