"""The reliability suite's ledger: every test counts what it injects and what it checks.

``ledger.fault(kind)`` for each fault injected (a killed worker, a stopped server, ...),
``ledger.bad_input()`` for each malformed input tried, ``ledger.planted(n)`` for credentials
planted where a search could leak them, ``ledger.lost(n)`` for results that a
test found missing after a fault (each test also asserts its own count is 0), and
``ledger.check(n)`` for assertions made. The totals are printed at the end of the session and
written to ``$PRUNESEARCH_CACHE/../reliability-ledger.json`` (what the issue's note reports).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest


class Ledger:
    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()

    def fault(self, kind: str, n: int = 1) -> None:
        self.totals["faults injected"] += n
        self.kinds[kind] += n

    def bad_input(self) -> None:
        self.totals["bad inputs tried"] += 1

    def planted(self, n: int) -> None:
        """Credentials planted where a search could leak them (the secrets tests)."""
        self.totals["secrets planted"] += n

    def lost(self, n: int) -> None:
        self.totals["results lost"] += n

    def check(self, n: int = 1) -> None:
        self.totals["checks"] += n

    def summary(self) -> dict[str, int]:
        keys = ("faults injected", "bad inputs tried", "secrets planted", "results lost", "checks")
        return {k: self.totals[k] for k in keys}


LEDGER = Ledger()


@pytest.fixture
def ledger() -> Ledger:
    return LEDGER


def pytest_terminal_summary(terminalreporter):
    if not any(LEDGER.totals.values()):
        return
    summary = LEDGER.summary()
    terminalreporter.write_sep("-", "reliability ledger")
    terminalreporter.write_line(", ".join(f"{k}: {v}" for k, v in summary.items()))
    faults = {k: v for k, v in sorted(LEDGER.kinds.items()) if v}
    if faults:
        terminalreporter.write_line(
            "faults by kind: " + ", ".join(f"{k} {v}" for k, v in faults.items())
        )
    out = Path(os.environ["PRUNESEARCH_CACHE"]).parent / "reliability-ledger.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**summary, "faults by kind": faults}, indent=2) + "\n")
