"""Models that take a set time on a shared, simulated machine: timing tests see known ratios."""

from __future__ import annotations

import time

import torch
from torch import nn


class Machine:
    """A shared clock factor: how slow the machine is right now, for every model on it."""

    def __init__(self) -> None:
        self.factor = 1.0
        self.calls: list[str] = []
        self.slow_after: int | None = None


class Busy(nn.Module):
    """A model that takes ``ms`` x the machine's factor (busy-waiting: sleep is too coarse)."""

    def __init__(self, name: str, ms: float, machine: Machine) -> None:
        super().__init__()
        self.name, self.ms, self.machine = name, ms, machine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.machine
        m.calls.append(self.name)
        if m.slow_after is not None and len(m.calls) > m.slow_after:
            m.factor = 3.0  # from here on the machine is three times slower, for both models
        end = time.perf_counter() + self.ms * m.factor / 1000
        while time.perf_counter() < end:
            pass
        return x
