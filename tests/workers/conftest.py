"""Fixtures of the workers' tests."""

from __future__ import annotations

import time

import pytest

from .busy_models import CLOCK


@pytest.fixture
def simulated_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timers read the Busy models' simulated clock, not the machine's (busy_models.py)."""
    monkeypatch.setattr(time, "perf_counter_ns", CLOCK.perf_counter_ns)
    monkeypatch.setattr(time, "perf_counter", CLOCK.perf_counter)
