"""Paired timing: a candidate against a reference, pair by pair, so drift cancels in the ratio."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import replace

import pytest
import torch

from workers import (
    Target,
    calibrate,
    log_ratio_centre,
    measure_latency,
    rebase,
)

from .busy_models import Busy, Machine

TARGET = Target(warmup=1, pairs=24, min_seconds=0.0)  # the stop rule on precision alone
X = torch.zeros(1, 1)
# Simulated time (busy_models.py); real models are timed in test_latency.py.
pytestmark = pytest.mark.usefixtures("simulated_time")


def test_a_slowdown_mid_measurement_moves_the_absolute_median_not_the_ratio():
    machine = Machine()
    model, reference = Busy("a", 0.5, machine), Busy("b", 1.0, machine)
    steady = measure_latency(model, X, TARGET, reference=reference)
    machine.calls.clear()
    machine.slow_after = 2 + 12  # warm-up (1 run each) and the first six pairs run at 1x
    slowed = measure_latency(model, X, TARGET, reference=reference)
    assert steady.ratio == pytest.approx(0.5, rel=0.1)
    assert slowed.ratio == pytest.approx(steady.ratio, rel=0.1)
    assert slowed.median_ms > 2 * steady.median_ms  # the absolute figure moved with the machine
    assert slowed.reference_ms > 2 * steady.reference_ms


def test_pairs_alternate_which_model_goes_first():
    machine = Machine()
    model, reference = Busy("a", 0.05, machine), Busy("b", 0.05, machine)
    single = Target(warmup=1, pairs=4, max_pairs=4, pair_runs=1)
    stats = measure_latency(model, X, single, reference=reference)
    assert machine.calls[2:] == list("abbaabba")  # after one warm-up run each: A B, B A, ...
    assert stats.pairs == 4 and stats.runs == 4  # the model's runs only


def test_each_half_of_a_pair_is_a_block_of_runs():
    machine = Machine()
    model, reference = Busy("a", 0.05, machine), Busy("b", 0.05, machine)
    blocks = Target(warmup=1, pairs=2, max_pairs=2, pair_runs=3)
    stats = measure_latency(model, X, blocks, reference=reference)
    assert machine.calls[2:] == list("aaabbbbbbaaa")  # A B, then B A, three runs a half
    assert stats.pairs == 2 and stats.runs == 6


def test_the_fastest_of_a_block_is_immune_to_interference_that_single_runs_are_not():
    """Every other run on the machine is preempted (+1 ms). Interference only ever adds time, so
    the fastest of three back-to-back runs is a clean one; a single run is clean half the time,
    and which half of a pair it hits decides the ratio."""
    machine = Machine()
    spiky = []
    for name, ms in (("a", 0.5), ("b", 1.0)):
        m = Busy(name, ms, machine)

        def forward(x: torch.Tensor, m: Busy = m, base: float = ms) -> torch.Tensor:
            m.ms = base + (1.0 if len(machine.calls) % 2 else 0.0)
            return Busy.forward(m, x)

        m.forward = forward  # type: ignore[method-assign]
        spiky.append(m)
    fixed = Target(warmup=1, pairs=8, max_pairs=8)
    blocks = measure_latency(spiky[0], X, replace(fixed, pair_runs=3), reference=spiky[1])
    single = measure_latency(spiky[0], X, replace(fixed, pair_runs=1), reference=spiky[1])
    assert blocks.ratio == pytest.approx(0.5, rel=0.1)
    assert abs(single.ratio - 0.5) > 0.1


def test_absolute_mode_has_no_ratio():
    machine = Machine()
    stats = measure_latency(Busy("a", 0.05, machine), X, Target(warmup=1, rounds=2, runs=3))
    assert stats.ratio is None and stats.reference_ms is None and stats.pairs == 0
    assert set(machine.calls) == {"a"}


def test_calibration_times_the_reference_against_itself():
    machine = Machine()
    cal = calibrate(Busy("a", 0.3, machine), X, Target(warmup=1, pairs=2, max_pairs=2))
    assert cal["pairs"] == 6  # three times a measurement's pairs
    assert cal["ms"] == pytest.approx(0.3, rel=0.5)
    assert 0 <= cal["noise"] < 0.5 and cal["seconds"] > 0


def test_rebase_puts_a_paired_measurement_on_any_calibration():
    machine = Machine()
    model, reference = Busy("a", 0.2, machine), Busy("b", 0.4, machine)
    stats = measure_latency(model, X, TARGET, reference=reference).to_dict()
    on_one = rebase(stats, 10.0)
    assert on_one["median_ms"] == pytest.approx(stats["ratio"] * 10.0)
    assert on_one["raw_median_ms"] == stats["median_ms"]  # the absolute figure is kept
    assert on_one["drift"] == pytest.approx(stats["reference_ms"] / 10.0)
    on_two = rebase(on_one, 20.0)  # a new calibration re-bases from the raw figures
    assert on_two["median_ms"] == pytest.approx(2 * on_one["median_ms"])
    assert on_two["p90_ms"] == pytest.approx(2 * on_one["p90_ms"])
    assert on_two["raw_median_ms"] == stats["median_ms"]
    assert on_two["throughput"] == pytest.approx(on_one["throughput"] / 2)


def test_pairs_must_be_positive_and_precision_a_fraction():
    with pytest.raises(ValueError, match="target.pairs"):
        Target(pairs=0)
    with pytest.raises(ValueError, match="target.precision"):
        Target(precision=0.0)


def test_noisy_pairs_get_more_pairs_until_the_median_is_precise():
    """A model whose every other run is slow (a busy neighbour): the ratios scatter, so blocks
    of pairs are added until the median's standard error is within the precision, or the cap."""
    machine = Machine()
    noisy = Busy("a", 0.2, machine)
    flaky = [0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        flaky[0] += 1
        noisy.ms = 0.2 if flaky[0] % 3 else 0.5
        return Busy.forward(noisy, x)

    noisy.forward = forward  # type: ignore[method-assign]
    single = replace(TARGET, pair_runs=1)  # blocks of three would see through this neighbour
    quiet = measure_latency(Busy("c", 0.2, machine), X, single, reference=Busy("d", 0.2, machine))
    scattered = measure_latency(
        noisy, X, replace(single, max_pairs=96), reference=Busy("b", 0.2, machine)
    )
    assert quiet.pairs == TARGET.pairs  # precise after the first block
    assert scattered.pairs > TARGET.pairs and scattered.pairs % TARGET.pairs == 0
    assert scattered.pairs <= 96


def test_pairs_go_on_until_they_have_run_min_seconds_even_when_precise():
    """Two steady models are precise after the first block, but that block lasts ~15 ms: the
    time floor adds blocks until the timed runs of both models add up to ``min_seconds``."""
    machine = Machine()
    floor = replace(TARGET, pairs=4, pair_runs=1, min_seconds=0.1)
    pair = (Busy("a", 0.5, machine), Busy("b", 0.5, machine))
    brief = measure_latency(*pair[:1], X, replace(floor, min_seconds=0.0), reference=pair[1])
    spanned = measure_latency(*pair[:1], X, floor, reference=pair[1])
    assert brief.pairs == 4  # 4 pairs x 2 runs x 0.5 ms: precise, and no floor
    # 100 pairs x 2 runs x 0.5 ms = 0.1 s; runs take a little over 0.5 ms (a loaded machine:
    # up to 1 ms), and the floor is on time run, so it stops at the first block past 0.1 s.
    assert spanned.pairs % 4 == 0 and 48 <= spanned.pairs <= 104
    assert spanned.seconds >= 0.1
    capped = measure_latency(*pair[:1], X, replace(floor, max_pairs=8), reference=pair[1])
    assert capped.pairs == 8  # the cap bounds the cost, as it does for precision
    with pytest.raises(ValueError, match="target.min_seconds"):
        Target(min_seconds=-1.0)


def test_max_seconds_stops_an_imprecise_measurement_after_whole_blocks():
    """Two models whose runs scatter +-50 % never reach 0.1 %: without a cap in seconds the
    pairs would go on to max_pairs; with one they stop at the first block past it."""
    machine = Machine()
    rng = random.Random(0)

    class Jittery(Busy):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            machine.factor = rng.uniform(0.5, 1.5)
            return super().forward(x)

    pair = (Jittery("a", 0.5, machine), Jittery("b", 0.5, machine))
    target = replace(TARGET, pairs=4, pair_runs=1, precision=0.001, max_pairs=10_000)
    capped = measure_latency(pair[0], X, replace(target, max_seconds=0.05), reference=pair[1])
    assert capped.pairs % 4 == 0 and 40 <= capped.pairs <= 80  # ~50 pairs of 2 x 0.5 ms
    assert capped.ratio_se > 0.001  # it says how precise it got
    first = measure_latency(pair[0], X, replace(target, max_seconds=1e-6), reference=pair[1])
    assert first.pairs == 4  # at least one block, however small the cap
    with pytest.raises(ValueError, match="target.max_seconds"):
        Target(min_seconds=1.0, max_seconds=1.0)
    assert calibrate(pair[1], X, replace(target, max_seconds=0.02))["pairs"] <= 3 * 40


def test_the_centre_is_the_interquartile_mean_of_the_log_ratios_with_its_standard_error():
    """By hand: n = 8, a quarter (2) trimmed at each end leaves 2 3 4 5, mean 3.5; winsorized
    2 2 2 3 4 5 5 5 has variance 14 / 7 = 2, so SE = sqrt(2) / (0.5 x sqrt(8)) = 1."""
    centre, se = log_ratio_centre([7.0, 0.0, 5.0, 1.0, 3.0, 6.0, 2.0, 4.0])  # order does not matter
    assert centre == pytest.approx(3.5)
    assert se == pytest.approx(1.0)
    wild, wild_se = log_ratio_centre(
        [1000.0, -1000.0, 5.0, 1.0, 3.0, 6.0, 2.0, 4.0]
    )  # 0 and 7 gone wild
    assert (wild, wild_se) == pytest.approx((3.5, 1.0))  # trimmed and winsorized away
    assert log_ratio_centre([0.5])[1] == math.inf  # one pair: no error estimate, never "precise"


def test_the_interquartile_mean_needs_fewer_pairs_than_the_median_for_one_precision():
    """Why the centre is no longer the median: over many samples of normal log ratios (48
    pairs each) the interquartile mean scatters less, and its SE estimate matches its scatter."""
    rng = random.Random(0)
    samples = [[rng.gauss(0.0, 0.1) for _ in range(48)] for _ in range(2000)]
    iqm = [log_ratio_centre(s)[0] for s in samples]
    med = [statistics.median(s) for s in samples]
    assert statistics.stdev(iqm) < 0.92 * statistics.stdev(med)  # theory: 0.87
    mean_se = statistics.fmean(log_ratio_centre(s)[1] for s in samples)
    assert mean_se == pytest.approx(statistics.stdev(iqm), rel=0.15)
