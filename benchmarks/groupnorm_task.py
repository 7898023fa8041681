"""A model family normalised by GroupNorm throughout, for ``benchmarks.quality --tasks
benchmarks.groupnorm_task:build``: every prunable group is cut in equal slices (GroupNorm's
groups), as in detection heads, diffusion U-Nets and small-batch training generally.

A plain conv stem, a residual block and a downsampling conv, each conv followed by
``GroupNorm(groups, channels)``, on scikit-learn's digits upsampled to 16x16 (no download). No
BatchNorm: the screen's proxy is the post-prune loss (after its short finetune, ``steps: auto``).
Nothing in prunesearch knows this module. The base model trains once per options and is cached
(``workers.load_or_train``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from benchmarks.mixed_task import cached_digits_task
from workers import Task

DEFAULTS = {"seed": 0, "width": 32, "groups": 8, "base_epochs": 12, "base_lr": 0.05}


def _conv(cin: int, cout: int, groups: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, stride=stride), nn.GroupNorm(groups, cout), nn.ReLU()
    )


class GroupNormNet(nn.Module):
    def __init__(self, width: int = 32, groups: int = 8, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = _conv(1, w, groups)
        self.down = _conv(w, 2 * w, groups, stride=2)
        self.block = nn.Sequential(
            _conv(2 * w, 2 * w, groups),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.GroupNorm(groups, 2 * w),
        )
        self.last = _conv(2 * w, 4 * w, groups, stride=2)
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.stem(x))
        x = torch.relu(x + self.block(x))
        return self.fc(self.last(x).mean(dim=(2, 3)))


def build(options: Mapping[str, Any]) -> Task:
    return cached_digits_task(
        options,
        DEFAULTS,
        lambda opts: GroupNormNet(int(opts["width"]), int(opts["groups"])),
        ("groupnorm", 1),
    )
