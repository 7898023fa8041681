"""A gated model family, for ``benchmarks.quality --tasks benchmarks.gated_task:build``: every
conv's output is chunked in two and one half gates the other (``a * sigmoid(b)``, as in gated
convs, WaveNet-style blocks and GLU layers), and the head is a fused gate-and-up projection
(``silu(g) * u``, as in LLaMA-style MLPs). Channel ``i`` of each such layer is tied to channel
``i + C/2``: Torch-Pruning removes the pair when asked for one.

A gated stem, a gated downsampling conv, a residual block whose first conv is gated, and the
fused head, with BatchNorm after every conv, on scikit-learn's digits upsampled to 16x16 (no
download). Nothing in prunesearch knows this module. The base model trains once per options and
is cached (``workers.load_or_train``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from benchmarks.mixed_task import cached_digits_task
from workers import Task

DEFAULTS = {"seed": 0, "width": 24, "hidden": 64, "base_epochs": 12, "base_lr": 0.05}


class Gated(nn.Module):
    """conv -> BatchNorm -> chunk -> a * sigmoid(b): ``cout`` channels out of ``2 * cout``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, 2 * cout, 3, padding=1, stride=stride)
        self.bn = nn.BatchNorm2d(2 * cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.bn(self.conv(x)).chunk(2, dim=1)
        return a * torch.sigmoid(b)


class GatedNet(nn.Module):
    def __init__(self, width: int = 24, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = Gated(1, w)
        self.down = Gated(w, 2 * w, stride=2)
        self.block = nn.Sequential(
            Gated(2 * w, 2 * w), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w)
        )
        self.gate_up = nn.Linear(2 * w, 2 * hidden)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.stem(x))
        x = torch.relu(x + self.block(x)).mean(dim=(2, 3))
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.fc(nn.functional.silu(g) * u)


def build(options: Mapping[str, Any]) -> Task:
    return cached_digits_task(
        options,
        DEFAULTS,
        lambda opts: GatedNet(int(opts["width"]), int(opts["hidden"])),
        ("gated", 1),
    )
