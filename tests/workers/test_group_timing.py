"""A batch timed against shared reference runs: the order, the ratios, drift cancelling."""

from __future__ import annotations

import pytest
import torch

from workers import GROUP_SHARE, Target, measure_group

from .busy_models import Busy, Machine

X = torch.zeros(1, 1)
pytestmark = pytest.mark.usefixtures("simulated_time")


def test_the_batch_runs_as_one_sequence_a_reference_half_between_every_share_and_reversed():
    target = Target(warmup=1, pairs=2, max_pairs=2, pair_runs=1, min_seconds=0.0)
    for share, rounds in ((2, "rabrcr" + "rcbrar"), (4, "rabcr" + "rcbar")):
        machine = Machine()
        ref = Busy("r", 0.05, machine)
        models = [Busy(n, 0.05, machine) for n in "abc"]
        stats = measure_group(models, X, target, ref, share=share)
        assert "".join(machine.calls) == "rabc" + rounds  # warm-up, then two rounds
        assert [s.pairs for s in stats] == [2, 2, 2]
        assert [s.runs for s in stats] == [2, 2, 2]  # each model's own runs


def test_ratios_come_back_in_order_and_match_the_models():
    machine = Machine()
    ref = Busy("r", 1.2, machine)
    models = [Busy(str(i), ms, machine) for i, ms in enumerate((0.3, 0.9, 0.6))]
    stats = measure_group(models, X, Target(warmup=1, pairs=8, min_seconds=0.0), ref)
    assert [s.ratio for s in stats] == pytest.approx([0.25, 0.75, 0.5], rel=0.1)
    assert all(s.reference_ms == pytest.approx(1.2, rel=0.2) for s in stats)
    assert all(s.ratio_se is not None and s.ratio_se < 0.05 for s in stats)


def test_a_slowdown_mid_batch_moves_the_absolute_times_not_the_ratios():
    machine = Machine()
    ref = Busy("r", 1.0, machine)
    models = [Busy(str(i), ms, machine) for i, ms in enumerate((0.4, 0.7))]
    target = Target(warmup=1, pairs=8, max_pairs=8, min_seconds=0.0)
    steady = measure_group(models, X, target, ref)
    machine.calls.clear()
    machine.slow_after = 3 + 3 * 4 * 3  # warm-up and the first four rounds run at 1x
    slowed = measure_group(models, X, target, ref)
    for before, after in zip(steady, slowed, strict=True):
        assert after.ratio == pytest.approx(before.ratio, rel=0.1)
        assert after.median_ms > 1.5 * before.median_ms  # the absolute figure moved
    assert [s.ratio for s in steady] == pytest.approx([0.4, 0.7], rel=0.1)


def test_the_reference_runs_once_per_share_of_candidates_not_once_per_candidate():
    target = Target(warmup=1, pairs=4, max_pairs=4, pair_runs=1, min_seconds=0.0)
    rounds = 4
    for share in (2, GROUP_SHARE):
        machine = Machine()
        ref = Busy("r", 0.05, machine)
        models = [Busy(n, 0.05, machine) for n in "abcdefgh"]
        measure_group(models, X, target, ref, share=share)
        assert machine.calls.count("r") == 1 + rounds * (len(models) // share + 1)
        assert all(machine.calls.count(n) == 1 + rounds for n in "abcdefgh")


def test_each_model_stops_on_its_own_and_the_rest_go_on():
    machine = Machine()
    ref = Busy("r", 0.05, machine)
    models = [Busy("a", 0.05, machine), Busy("b", 0.05, machine)]
    # min_seconds: a's halves are 50x longer, so only a reaches the floor after the first block
    models[0].ms = 2.5
    target = Target(warmup=1, pairs=2, max_pairs=64, pair_runs=1, min_seconds=0.004, precision=0.9)
    a, b = measure_group(models, X, target, ref)
    assert a.pairs == 2
    assert b.pairs > a.pairs


def test_no_models_is_no_work():
    machine = Machine()
    assert measure_group([], X, Target(), Busy("r", 0.05, machine)) == []
    assert machine.calls == []
