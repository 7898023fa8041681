"""Models that take a set time on a shared, simulated machine: timing tests see known ratios.

Their time is simulated: a run advances ``CLOCK`` by its milliseconds, and the fixture
``simulated_time`` (tests/workers/conftest.py) makes ``time.perf_counter`` read it. Busy-waiting
on the real clock made these tests about the machine: a preemption by a neighbour (under a load
of 4 on 2 cores, in three runs of four) passed for the noise or the speed a test had set up."""

from __future__ import annotations

import torch
from torch import nn


class Clock:
    """Simulated time in nanoseconds; only Busy models move it."""

    def __init__(self) -> None:
        self.ns = 0

    def perf_counter_ns(self) -> int:
        return self.ns

    def perf_counter(self) -> float:
        return self.ns / 1e9


CLOCK = Clock()


class Machine:
    """A shared clock factor: how slow the machine is right now, for every model on it."""

    def __init__(self) -> None:
        self.factor = 1.0
        self.calls: list[str] = []
        self.slow_after: int | None = None


class Busy(nn.Module):
    """A model that takes ``ms`` x the machine's factor, in simulated time (``CLOCK``)."""

    def __init__(self, name: str, ms: float, machine: Machine) -> None:
        super().__init__()
        self.name, self.ms, self.machine = name, ms, machine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.machine
        m.calls.append(self.name)
        if m.slow_after is not None and len(m.calls) > m.slow_after:
            m.factor = 3.0  # from here on the machine is three times slower, for both models
        CLOCK.ns += round(self.ms * m.factor * 1e6)
        return x
