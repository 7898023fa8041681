"""Paired timing of many models against one reference, the reference's runs shared.

``measure_latency(model, ..., reference=base)`` times one candidate in pairs: every half of
the candidate has a half of the reference beside it. A screen times its candidates in batches
against the same base model, and the base model is the slowest of them all (every candidate is
a pruned copy of it): on `shifted_digits` at batch 16 its halves were about two thirds of a
pair's time. Here a batch runs as one sequence, a reference half between every ``share``
candidate halves (4, ``GROUP_SHARE``),

    R C1 C2 C3 C4 R C5 ...   then, reversed,   ... C5 R C4 C3 C2 C1 R

and each candidate's log ratio is taken against the mean log of the two reference halves that
bracket it. So every candidate still has the reference's runs near it (within ``share``
halves: drift slower than a few halves cancels, as in a pair), the reference costs 1 half
per ``share`` candidates instead of 1 per candidate, and the denominator of each ratio is two
halves, not one. Reversing the order each round moves every candidate between "just after the
reference" and "just before it", as the ABBA order of a pair does, so neither position's
cache effects stay with one candidate.

Each candidate stops on its own rule, the pairs' rule (``target.pairs`` rounds at least, then
more in blocks of as many until its ratio's standard error is within ``target.precision`` and
it has run ``target.min_seconds``, or until ``target.max_pairs`` / ``target.max_seconds``);
the candidates still running share the reference halves of the rounds that remain.
"""

from __future__ import annotations

import math
import socket
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._latency import (
    LatencyStats,
    Target,
    _quartile,
    _runner,
    _sync,
    _time_round,
    fixed_threads,
    log_ratio_centre,
    target_inputs,
)

# Candidates between two reference halves. The base model is the slowest model of a screen's
# batch, so the fewer of its halves the cheaper: with 4, a batch's timing cost 1.78-1.90x less
# than pairs (with 2, 1.31-1.51x) on all three built-in tasks, quiet and beside a busy process,
# and ranked as well (Kendall tau with a careful re-timing 0.927-0.980, pairs 0.948-0.984; 2,
# 0.927-0.976; benchmarks/screen_timing.py). No candidate is more than two halves from a
# reference half, and its ratio is taken against the halves either side of it, so drift over a
# few halves cancels as in a pair.
GROUP_SHARE = 4


class _Candidate:
    """One model's runs and per-round log ratios while its batch is timed."""

    def __init__(self, run: Callable) -> None:
        self.run, self.runs, self.logs = run, [], []
        # seconds of timed runs: its own, and a reference half's worth per round, as in a pair
        self.timed = 0.0

    def half(self, x: torch.Tensor, target: Target, device: torch.device) -> tuple[float, float]:
        """(the fastest run, the half's seconds)"""
        runs = _time_round(self.run, x, target.pair_runs, device)
        self.runs.extend(runs)
        spent = sum(runs) / 1000.0
        self.timed += spent
        return min(runs), spent

    def done(self, target: Target) -> bool:
        n = len(self.logs)
        if n < target.pairs or n % target.pairs:
            return n >= target.max_pairs
        _, se = log_ratio_centre(self.logs)
        precise = se <= target.precision and self.timed >= target.min_seconds
        return precise or n >= target.max_pairs or self.timed >= target.max_seconds


def measure_group(
    models: Sequence[nn.Module],
    example_inputs: torch.Tensor,
    target: Target,
    reference: nn.Module,
    share: int = GROUP_SHARE,
) -> list[LatencyStats]:
    """Paired latency of each of ``models`` against ``reference`` (see the module's docstring),
    in order; each result has ``ratio``, ``ratio_se``, ``ratio_spread``, ``reference_ms`` and
    ``pairs`` as ``measure_latency(model, ..., reference=reference)`` would, and ``seconds`` is
    its share of the group's time (its own runs and its part of the reference's)."""
    if not models:
        return []
    device = torch.device(target.device)
    started = time.perf_counter()
    x = target_inputs(example_inputs, target, device)
    with fixed_threads(target.threads), torch.inference_mode():
        base = _Candidate(_runner(reference, x, target, device))
        group = [_Candidate(_runner(m, x, target, device)) for m in models]
        for _ in range(target.warmup):  # all warm, so no candidate's first half is a cold one
            for member in (base, *group):
                member.run(x)
        _sync(device)
        _rounds(base, group, x, target, device, max(1, share))
    seconds = (time.perf_counter() - started) / len(models)
    return [_stats(c, base, target, seconds) for c in group]


def _rounds(
    base: _Candidate,
    group: list[_Candidate],
    x: torch.Tensor,
    target: Target,
    device: torch.device,
    share: int,
) -> None:
    running, order = list(group), 0
    while running:
        line = running if order % 2 == 0 else running[::-1]
        left = base.half(x, target, device)
        for start in range(0, len(line), share):
            chunk = line[start : start + share]
            halves = [c.half(x, target, device)[0] for c in chunk]
            right = base.half(x, target, device)
            # A timer tick (1 ns) as the floor: a log ratio is always finite.
            against = (math.log(max(left[0], 1e-6)) + math.log(max(right[0], 1e-6))) / 2
            for c, took in zip(chunk, halves, strict=True):
                c.logs.append(math.log(max(took, 1e-6)) - against)
                c.timed += (left[1] + right[1]) / 2
            left = right
        order += 1
        running = [c for c in running if not c.done(target)]


def _stats(c: _Candidate, base: _Candidate, target: Target, seconds: float) -> LatencyStats:
    centre, se = log_ratio_centre(c.logs)
    ratios = sorted(math.exp(v) for v in c.logs)
    flat = sorted(c.runs)
    median = statistics.median(flat)
    return LatencyStats(
        median_ms=median,
        p90_ms=flat[min(len(flat) - 1, int(0.9 * len(flat)))],
        mean_ms=statistics.fmean(flat),
        cv=0.0,  # the ratio's standard error says how precise it is, as in paired timing
        throughput=target.batch_size / (median / 1000.0),
        # None on CUDA too: the device's peak over a batch is the largest candidate's, not each one's
        peak_memory_mb=None,
        runs=len(flat),
        attempts=1,
        noisy=False,
        device=target.device,
        batch_size=target.batch_size,
        host=socket.gethostname(),
        seconds=seconds,
        ratio=math.exp(centre),
        ratio_spread=_quartile(ratios, 3) - _quartile(ratios, 1),
        reference_ms=statistics.median(base.runs),
        pairs=len(c.logs),
        ratio_se=se,
    )
