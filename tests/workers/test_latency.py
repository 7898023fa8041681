from __future__ import annotations

import pytest
import torch

from search_space import uniform_plan
from workers import Target, apply_plan, measure_group, measure_latency, measure_relative

from .busy_models import Busy, Machine

X = torch.zeros(1, 1)


def test_stats_are_consistent(digits_task):
    stats = measure_latency(
        digits_task.model, digits_task.example_inputs, {"batch_size": 4, "rounds": 3, "runs": 20}
    )
    assert 0 < stats.median_ms <= stats.p90_ms
    assert stats.runs == 60  # rounds x runs of the accepted attempt
    assert stats.batch_size == 4 and stats.device == "cpu"
    assert stats.throughput == pytest.approx(4 / (stats.median_ms / 1000))
    assert stats.peak_memory_mb is None  # CPU: no allocator statistics


@pytest.mark.usefixtures("simulated_time")
@pytest.mark.parametrize("bursts", [1, 99])
def test_rounds_that_disagree_are_measured_again_until_they_agree_or_the_retries_run_out(bursts):
    """A neighbour's bursts make every other round twice as slow, for ``bursts`` attempts: the
    rounds are re-measured until their medians agree; still apart after every retry, the
    figure is flagged noisy."""
    machine = Machine()
    model = Busy("a", 1.0, machine)
    target = Target(warmup=1, rounds=4, runs=10, max_cv=0.1, retries=2)
    per_attempt = target.rounds * target.runs

    def forward(x: torch.Tensor) -> torch.Tensor:
        timed = len(machine.calls) - target.warmup  # this run's index among the timed ones
        burst = timed // per_attempt < bursts and (timed % per_attempt) // target.runs % 2
        machine.factor = 2.0 if burst else 1.0
        return Busy.forward(model, x)

    model.forward = forward  # type: ignore[method-assign]
    stats = measure_latency(model, X, target)
    if bursts == 1:
        assert stats.attempts == 2 and stats.cv <= target.max_cv and not stats.noisy
        assert stats.median_ms == pytest.approx(1.0, rel=0.01)
    else:
        assert stats.attempts == target.retries + 1 and stats.cv > target.max_cv and stats.noisy


def test_half_pruned_model_is_faster_at_batch_32(digits_task, digits_discovery):
    pruned = apply_plan(
        digits_task.model, digits_task.example_inputs, uniform_plan(digits_discovery, 0.5)
    )
    target = Target(batch_size=32, rounds=5, runs=20)
    dense = measure_latency(digits_task.model, digits_task.example_inputs, target)
    half = measure_latency(pruned, digits_task.example_inputs, target)
    assert half.median_ms < dense.median_ms


def test_threads_are_restored_after_timing(digits_task):
    before = torch.get_num_threads()
    measure_latency(
        digits_task.model, digits_task.example_inputs, {"threads": 1, "rounds": 2, "runs": 5}
    )
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "data, message",
    [
        ({"dtype": "fp16"}, "only measured on cuda"),
        ({"device": "tpu"}, "target.device"),
        ({"batch_size": 0}, "target.batch_size"),
        ({"batchsize": 4}, "unknown keys"),
        ({"dtype": "int3"}, "target.dtype"),
    ],
)
def test_bad_targets_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        Target.from_dict(data)


@pytest.mark.parametrize("runtime", ["torchscript", "compile"])
def test_other_runtimes_time_the_same_model(digits_task, runtime):
    stats = measure_latency(
        digits_task.model,
        digits_task.example_inputs,
        {"runtime": runtime, "batch_size": 2, "rounds": 2, "runs": 5, "warmup": 3},
    )
    assert stats.median_ms > 0 and stats.runs == 10


def test_onnxruntime_needs_its_package_or_says_so(digits_task):
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="onnxruntime is not installed"):
            measure_latency(
                digits_task.model, digits_task.example_inputs, {"runtime": "onnxruntime"}
            )
        return
    stats = measure_latency(
        digits_task.model,
        digits_task.example_inputs,
        {"runtime": "onnxruntime", "batch_size": 4, "rounds": 2, "runs": 5},
    )
    assert stats.median_ms > 0 and stats.runs == 10 and stats.batch_size == 4


def test_a_model_the_torchscript_exporter_refuses_is_timed_on_onnxruntime():
    """``nn.RMSNorm`` (as Llama-style models normalise) has no TorchScript ONNX symbolic; the
    onnxruntime target exports it with torch's dynamo exporter instead."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.RMSNorm(16)).eval()
    with pytest.raises(Exception, match="rms_norm"):
        torch.onnx.export(model, (torch.randn(2, 8),), None, dynamo=False)
    stats = measure_latency(
        model, torch.randn(2, 8), {"runtime": "onnxruntime", "batch_size": 4, "rounds": 2}
    )
    assert stats.median_ms > 0 and stats.batch_size == 4


def test_an_unknown_runtime_is_refused():
    with pytest.raises(ValueError, match="target.runtime: 'tensorrt'"):
        Target(runtime="tensorrt")


class _Tokens(torch.nn.Module):
    """A text classifier's front: token ids (integers) into an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).mean(dim=1))


def test_integer_inputs_are_timed_as_integers_alone_paired_and_in_a_group():
    """Token ids stay integers (a cast to the target's float dtype broke every embedding model)."""
    model, ids = _Tokens().eval(), torch.randint(0, 50, (1, 12))
    target = Target(batch_size=4, threads=1, warmup=1, pairs=4, min_seconds=0.05, max_seconds=1.0)
    assert measure_latency(model, ids, target).median_ms > 0
    paired = measure_latency(model, ids, target, reference=_Tokens().eval())
    assert paired.ratio is not None and paired.ratio > 0
    group = measure_group([model, _Tokens().eval()], ids, target, reference=_Tokens().eval())
    assert len(group) == 2 and all(s.ratio > 0 for s in group)


def test_timing_leaves_the_callers_model_in_its_own_dtype():
    # The target's fp32 was applied in place: a float64 model then failed its own evaluation.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten())
    model = model.double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    stats = measure_latency(model, x, Target(runs=5, warmup=1, rounds=1), reference=model)
    assert stats.median_ms > 0 and stats.ratio is not None
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(x).dtype == torch.float64


def test_measure_relative_reports_the_ratio_of_real_models(digits_task):
    target = Target(batch_size=8, warmup=2, pairs=48)
    same = measure_relative(
        digits_task.model, digits_task.model, digits_task.example_inputs, target
    )
    assert same["ratio"] == pytest.approx(1.0, rel=0.15)  # 0.96-0.99 measured under a load of 11
    assert same["pairs"] % 48 == 0 and same["reference_ms"] > 0  # blocks of 48 until precise
