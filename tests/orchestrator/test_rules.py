"""The front board's rules, as plain objects (the Ray actor runs exactly this class)."""

from __future__ import annotations

from orchestrator import FrontBoard
from workers import TrialStatus


def board(front, max_latency_ms=None):
    b = FrontBoard(max_latency_ms=max_latency_ms, best_possible_accuracy=0.99, margin=0.02)
    b.update(front)
    return b


def test_the_constraint_comes_first_and_says_infeasible():
    verdict = board([], max_latency_ms=1.0).reject(1.5)
    assert verdict[0] == TrialStatus.INFEASIBLE and "1.500 ms > constraint 1.0 ms" in verdict[1]
    assert board([], max_latency_ms=1.0).reject(0.9) is None


def test_dominated_only_by_a_faster_model_at_the_best_reachable_accuracy():
    assert board([(0.99, 0.5)]).reject(0.6)[0] == TrialStatus.REJECTED
    assert board([(0.99, 0.5)]).reject(0.4) is None  # faster than the front: may be new
    assert board([(0.98, 0.5)]).reject(0.6) is None  # the front model could still be beaten
    assert board([(0.99, 0.5)]).reject(0.6, dominated=False) is None


def test_hopeless_needs_a_faster_front_model_ahead_by_more_than_the_remaining_slack():
    b = board([(0.97, 0.5)])
    # After epoch 1 of 4: 3 epochs left, slack 0.06.
    assert b.hopeless(latency_ms=0.6, accuracy=0.90, epoch=0, epochs=4)
    assert not b.hopeless(latency_ms=0.6, accuracy=0.92, epoch=0, epochs=4)
    assert not b.hopeless(
        latency_ms=0.4, accuracy=0.50, epoch=0, epochs=4
    )  # faster than the front model
    assert not b.hopeless(
        latency_ms=0.6, accuracy=0.10, epoch=3, epochs=4
    )  # the last epoch is never cut
