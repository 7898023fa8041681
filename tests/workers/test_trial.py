from __future__ import annotations

import copy

import torch

from search_space import PruningPlan, uniform_plan
from workers import TrialLatency, TrialStatus, load_pruned, run_trial


def spec(plan: PruningPlan, **kw) -> dict:
    return {
        "number": 7,
        "plan": plan.to_dict(),
        "task": "digits",
        "finetune": {"epochs": 1, "lr": 0.01},
        "target": {"batch_size": 1, "rounds": 3, "runs": 10},
        **kw,
    }


def test_a_trial_prunes_measures_finetunes_and_returns_the_model(digits_task, digits_discovery):
    plan = uniform_plan(digits_discovery, 0.3, criterion="taylor")
    result = run_trial(spec(plan))
    assert result.status == TrialStatus.COMPLETE, result.reason
    assert result.number == 7 and result.plan == plan
    assert 0.5 < result.accuracy <= 1.0
    assert len(result.epoch_accuracy) == 1 and result.accuracy == result.epoch_accuracy[-1]
    assert result.latency.median_ms > 0 and result.latency.figures["runs"] == 30
    assert set(result.seconds) >= {"build", "prune", "measure", "finetune"}
    model, again = load_pruned(result.model_bytes, copy.deepcopy(digits_task.model))
    assert again == plan
    from workers import evaluate

    assert evaluate(model, digits_task) == result.accuracy


def test_a_candidate_over_the_latency_constraint_is_not_finetuned(digits_discovery):
    result = run_trial(spec(uniform_plan(digits_discovery, 0.1), max_latency_ms=1e-6))
    assert result.status == TrialStatus.INFEASIBLE
    assert "not finetuned" in result.reason
    assert result.epoch_accuracy == [] and "finetune" not in result.seconds
    assert result.latency.median_ms > 1e-6  # the rejection used a real measurement
    assert result.accuracy is not None  # accuracy as pruned, for the sampler


def test_a_trial_error_is_returned_as_failed_not_raised(digits_discovery):
    plan = PruningPlan(ratios={"x": 0.5}, units={"x": ("no.such.layer",)})
    result = run_trial(spec(plan))
    assert result.status == TrialStatus.FAILED
    assert "no.such.layer" in result.reason


class StopAtOnce:
    def reject(self, latency):
        return None

    def stop(self, latency_ms, epoch, accuracy):
        return True


class RejectAll:
    def reject(self, latency):
        return TrialStatus.REJECTED, "dominated (test)"

    def stop(self, latency_ms, epoch, accuracy):
        raise AssertionError("a rejected trial must not be finetuned")


def test_the_rules_can_reject_before_finetuning(digits_discovery):
    result = run_trial(spec(uniform_plan(digits_discovery, 0.3)), rules=RejectAll())
    assert (result.status, result.reason) == (TrialStatus.REJECTED, "dominated (test)")
    assert result.epoch_accuracy == []


def test_a_custom_measure_is_what_the_result_records(digits_discovery):
    seen = []

    def measure(model, inputs, signature):
        seen.append(signature)
        return {"median_ms": 1.25, "cached": True}

    result = run_trial(spec(uniform_plan(digits_discovery, 0.3)), measure=measure)
    assert result.status == TrialStatus.COMPLETE
    assert result.latency == TrialLatency(median_ms=1.25, cached=True)
    assert result.latency.to_dict() == {"median_ms": 1.25, "cached": True}
    assert seen == [result.signature]


def test_the_early_stopping_hook_stops_finetuning(digits_discovery):
    plan = uniform_plan(digits_discovery, 0.3)
    result = run_trial(spec(plan, finetune={"epochs": 3, "lr": 0.01}), rules=StopAtOnce())
    assert result.status == TrialStatus.STOPPED
    assert len(result.epoch_accuracy) == 1
    assert "stopped after epoch 1" in result.reason


def test_a_trial_is_reproducible_from_its_spec_whatever_ran_before_on_the_worker(digits_discovery):
    plan = uniform_plan(digits_discovery, 0.3)
    first = run_trial(spec(plan, seed=3))
    run_trial(
        spec(uniform_plan(digits_discovery, 0.5), seed=4)
    )  # moves the cached task's loader state
    again = run_trial(spec(plan, seed=3))
    assert first.status == again.status == TrialStatus.COMPLETE
    assert again.epoch_accuracy == first.epoch_accuracy
    assert again.model_bytes == first.model_bytes  # the same data order, so the same weights


def test_a_trial_says_which_criterion_ranked_its_groups(digits_task, digits_discovery):
    """bn_scale ranks the groups with a BatchNorm in them; l1 ranks the rest (the digits net's
    hidden Linear layer has none)."""
    result = run_trial(spec(uniform_plan(digits_discovery, 0.3, criterion="bn_scale")))
    assert result.status == TrialStatus.COMPLETE, result.reason
    modules = dict(digits_task.model.named_modules())
    normed = sum(
        any(isinstance(modules[m], torch.nn.BatchNorm2d | torch.nn.BatchNorm1d) for m in g.members)
        for g in digits_discovery.groups
    )
    assert 0 < normed < len(digits_discovery.groups)
    assert result.ranked_by == {"bn_scale": normed, "l1": len(digits_discovery.groups) - normed}
