"""Models of several inputs, several outputs and keyword inputs go through a trial and the screen
like a model of one tensor in and out: trained, pruned, scored by the task's own loss, timed at
the target's batch size on every runtime; and a base model whose layers insist on the state
dict's versions loads on a worker."""

from __future__ import annotations

import copy

import pytest
import torch

from search_space import PruningPlan, discover, uniform_plan
from workers import (
    TrialStatus,
    batch_size_of,
    build_task,
    load_pruned,
    measure_latency,
    run_trial,
)

from .screen_tasks import check_lighter_cut_ranks_higher

TWO_HEADS = "tests.workers.odd_models:two_heads"
KEYWORDS = "tests.workers.odd_models:keyword_heads"
FAST = {"batch_size": 4, "warmup": 1, "rounds": 2, "runs": 3}


@pytest.fixture(scope="module")
def heads():
    task = build_task(TWO_HEADS)
    return task, discover(task.model, task.example_inputs, verify=False, warn=False)


def _spec(task: str, plan: PruningPlan, **kw) -> dict:
    return {
        "number": 3,
        "plan": plan.to_dict(),
        "task": task,
        "finetune": {"epochs": 1, "lr": 0.01},
        "target": FAST,
        **kw,
    }


@pytest.mark.parametrize("criterion", ["l1", "taylor"])
def test_a_trial_of_two_inputs_and_a_dict_of_outputs_runs_whole(heads, criterion):
    task, found = heads
    # Taylor ranks by the gradients of the task's own loss, which takes the dict whole.
    plan = uniform_plan(found, 0.4, criterion=criterion)
    result = run_trial(_spec(TWO_HEADS, plan))
    assert result.status == TrialStatus.COMPLETE, result.reason
    assert 0.3 < result.accuracy <= 1.0  # digit top-1 by the task's evaluate
    assert result.latency.median_ms > 0 and result.latency.figures["batch_size"] == 4
    model, _ = load_pruned(result.model_bytes, copy.deepcopy(task.model))
    with torch.no_grad():
        out = model(*task.example_inputs)
    assert set(out) == {"digit", "remainder"} and out["digit"].shape == (1, 10)


def test_the_screen_scores_a_model_of_two_inputs_by_its_task_s_loss(heads):
    check_lighter_cut_ranks_higher(TWO_HEADS, heads[1], "hessian")


def test_keyword_inputs_train_and_time_like_positional_ones():
    task = build_task(KEYWORDS)
    found = discover(task.model, task.example_inputs, verify=False, warn=False)
    result = run_trial(_spec(KEYWORDS, uniform_plan(found, 0.3)))
    assert result.status == TrialStatus.COMPLETE, result.reason
    assert result.accuracy > 0.3 and result.latency.median_ms > 0
    for runtime in ("eager", "torchscript"):
        stats = measure_latency(task.model, task.example_inputs, FAST | {"runtime": runtime})
        assert stats.median_ms > 0 and stats.batch_size == 4
    with pytest.raises(ValueError, match="example_inputs is a dict"):
        measure_latency(task.model, task.example_inputs, FAST | {"runtime": "onnxruntime"})


@pytest.mark.parametrize("runtime", ["eager", "torchscript", "compile", "onnxruntime"])
def test_several_inputs_are_timed_at_the_target_batch_on_every_runtime(heads, runtime):
    task, _ = heads
    seen: list[tuple[int, int]] = []

    def record(module, args):
        seen.append((args[0].shape[0], args[1].shape[0]))

    model = copy.deepcopy(task.model)
    model.register_forward_pre_hook(record)
    stats = measure_latency(model, task.example_inputs, FAST | {"runtime": runtime})
    assert stats.median_ms > 0
    if runtime == "eager":  # hooks run only where the module itself is called
        assert seen and set(seen) == {(4, 4)}


def test_inputs_without_a_batch_dimension_are_refused_naming_the_fix():
    assert batch_size_of((torch.zeros(3, 2), torch.zeros(3))) == 3
    for bad in (torch.tensor(1.0), (torch.zeros(2), torch.tensor(0)), "text", ()):
        with pytest.raises(TypeError, match="batch dimension first"):
            batch_size_of(bad)


def test_a_base_state_without_versions_loads_into_layers_that_insist_on_them():
    """The driver sends the base model's tensors as a plain mapping, which has lost the state
    dict's per-module versions; MNASNet-like layers refuse a load without them."""
    task = build_task("tests.workers.odd_models:versioned_digits")
    state = {k: v.clone() for k, v in task.model.state_dict().items()}
    with pytest.raises(ValueError, match="version should be set"):
        copy.deepcopy(task.model).load_state_dict(state)
    found = discover(task.model, task.example_inputs, verify=False, warn=False)
    spec = _spec("tests.workers.odd_models:versioned_digits", uniform_plan(found, 0.3))
    result = run_trial(spec, state)
    assert result.status == TrialStatus.COMPLETE, result.reason


def test_a_model_returning_a_dataclass_record_is_searched_and_its_trial_runs_whole():
    """Model libraries return dataclass records (``Output(logits=..., ...)``); Torch-Pruning
    walks tuples, lists and dicts only, and discovery failed: "'Scores' object is not
    iterable"."""
    ref = "tests.workers.odd_models:recorded_digits"
    task = build_task(ref)
    found = discover(task.model, task.example_inputs, warn=False)
    assert len(found.groups) == len(discover(task.model.inner, task.example_inputs).groups) > 0
    result = run_trial(_spec(ref, uniform_plan(found, 0.3)))
    assert result.status == TrialStatus.COMPLETE, result.reason
    assert 0.5 < result.accuracy <= 1.0
    model, _ = load_pruned(result.model_bytes, copy.deepcopy(task.model))
    with torch.no_grad():
        assert model(task.example_inputs).logits.shape == (1, 10)


@pytest.mark.parametrize("wrapper", ["compiled", "parallel"])
def test_a_compiled_or_data_parallel_model_is_searched_as_the_model_it_wraps(wrapper):
    """A compiled model recompiled at every shape a dry run tried (a ResNet-18's discovery
    67 s against 0.2 s), and both wrappers prefixed every layer name."""
    ref = f"tests.workers.odd_models:{wrapper}_digits"
    with pytest.warns(UserWarning, match="wrapper; prunesearch searches the"):
        task = build_task(ref)
    base = build_task("digits").model
    assert type(task.model) is type(base)
    found = discover(task.model, task.example_inputs, warn=False)
    assert found.names == discover(base, task.example_inputs, warn=False).names
    result = run_trial(_spec(ref, uniform_plan(found, 0.3)))
    assert result.status == TrialStatus.COMPLETE, result.reason
    # The pruned file loads onto the user's own wrapped model, as onto the bare one.
    wrap = torch.compile if wrapper == "compiled" else torch.nn.DataParallel
    model, _ = load_pruned(result.model_bytes, wrap(base))
    assert type(model) is type(base)
    with torch.no_grad():
        assert model(task.example_inputs).shape == (1, 10)


def test_a_torchscript_model_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="TorchScript module .* before torch.jit.script"):
        build_task("tests.workers.odd_models:scripted_digits")
