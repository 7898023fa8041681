"""The duel: which family of plans, uniform or the allocator's, selection should trust, settled by
finetuning one of each at the same latency.

The proxy scores a plan before any finetune, and plans recover from finetuning unevenly. On
digits the allocator's plans won the proxy at the front's knee and finetuned about 3 points
under uniform plans of the same latency and the same proxy (seed 3: proxy -0.50, 0.947 against
0.980), while on colour_shapes they finetune ahead. No proxy threshold tells the two tasks apart
before a finetune; one pair finetuned side by side does. So once three picks are told, the next
pick is the other family's candidate nearest the latency of the fastest pick that held the floor
(the front's knee, where the families differ most), no slower; from then on each bin picks
from the family that won the pairs (``preferred_family``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from ._select import Candidate

# Two picks are a pair when their screen latencies are within this fraction of each other.
DUEL_SPAN = 0.10
TOLD_FIRST = 3  # picks told before the duel: the middle and both ends of the range, usually


def duel_pick(
    screened: Sequence[Candidate],
    picked: Sequence[FrozenTrial],
    floor: float,
    pool: Sequence[Candidate],
    beaten: set[int],
) -> Candidate | None:
    """The duel's pick, or None (no duel is due: one was asked already, fewer than
    ``TOLD_FIRST`` picks are told, no told pick held ``floor``, or no open candidate of the other
    family, not ``beaten`` within its family, is as fast as the target and within ``DUEL_SPAN``
    of it). The rival nearest the target's latency, not slower: a pair is won by dominance (see
    ``family_edge``), and a faster rival can only win by being as accurate too."""
    uniform = {c.number: c.uniform for c in screened}
    told = [t for t in _told(picked) if _number(t) in uniform]
    held = [t for t in told if t.values[0] >= floor]
    if len(told) < TOLD_FIRST or not held or _pairs(screened, picked):
        return None
    target = min(held, key=_latency)
    lat = _latency(target)
    rivals = [
        c
        for c in pool
        if c.uniform != uniform[_number(target)]
        and c.number not in beaten
        and (1 - DUEL_SPAN) * lat <= c.latency_ms <= lat
    ]
    return max(rivals, key=lambda c: (c.latency_ms, c.proxy, -c.number), default=None)


def preferred_family(screened: Sequence[Candidate], picked: Sequence[FrozenTrial]) -> bool | None:
    """The family that won more of the told pairs (uniform: True, the allocator's: False), or
    None before a pair is won or on a tie."""
    edge = family_edge(screened, picked)
    if edge is None or edge[0] == 0:
        return None
    return edge[0] < 0


def family_edge(
    screened: Sequence[Candidate], picked: Sequence[FrozenTrial]
) -> tuple[int, int] | None:
    """The allocator's plans' wins minus uniform plans' wins over the told pairs (each uniform
    pick with the allocated pick nearest its latency, within ``DUEL_SPAN``), and the number of
    pairs; None without a told pair. A pair is won by the pick that dominates the other (as fast
    and as accurate, better in one): two picks that trade accuracy for time decide nothing,
    since the trade's worth depends on where on the front they sit."""
    pairs = _pairs(screened, _told(picked))
    if not pairs:
        return None
    return sum(_winner(a, u) - _winner(u, a) for u, a in pairs), len(pairs)


def _winner(a: FrozenTrial, b: FrozenTrial) -> int:
    """1 if ``a`` dominates ``b`` (as fast by the screen and as accurate, better in one)."""
    faster, better = _latency(a) <= _latency(b), a.values[0] >= b.values[0]
    strictly = _latency(a) < _latency(b) or a.values[0] > b.values[0]
    return int(faster and better and strictly)


def _pairs(
    screened: Sequence[Candidate], picked: Sequence[FrozenTrial]
) -> list[tuple[FrozenTrial, FrozenTrial]]:
    """Each uniform pick with the allocated pick nearest its latency, within ``DUEL_SPAN``."""
    uniform = {c.number: c.uniform for c in screened}
    mine = [t for t in picked if "screen" in t.user_attrs and _number(t) in uniform]
    allocated = [t for t in mine if not uniform[_number(t)]]
    pairs = []
    for u in (t for t in mine if uniform[_number(t)]):
        near = [a for a in allocated if abs(_latency(a) - _latency(u)) <= DUEL_SPAN * _latency(u)]
        if near:
            pairs.append((u, min(near, key=lambda a: abs(_latency(a) - _latency(u)))))
    return pairs


def _told(picked: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return [
        t
        for t in picked
        if "screen" in t.user_attrs and t.state == TrialState.COMPLETE and t.values
    ]


def _number(t: FrozenTrial) -> int:
    return int(t.user_attrs["screen"]["number"])


def _latency(t: FrozenTrial) -> float:
    return float(t.user_attrs["screen"]["latency_ms"])
