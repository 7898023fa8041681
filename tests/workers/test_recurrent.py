"""A recurrent model (a two-layer LSTM or GRU reading the digit row by row) goes through a trial
and the screen like a convolutional one: its hidden units pruned, finetuned, timed, saved and
reloaded, and its candidates screened."""

from __future__ import annotations

import copy

import pytest

from search_space import discover, uniform_plan
from workers import (
    TrialStatus,
    build_task,
    evaluate,
    load_pruned,
    profile_groups,
    run_trial,
)

from .screen_tasks import check_lighter_cut_ranks_higher

ROWS = "tests.workers.odd_models:digit_rows"
FAST = {"batch_size": 4, "warmup": 1, "rounds": 2, "runs": 3}


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_trial_prunes_a_recurrent_model_s_hidden_units_and_its_file_reloads(cell):
    task = build_task(ROWS, {"cell": cell})
    base_accuracy = evaluate(task.model, task)
    found = discover(task.model, task.example_inputs, verify=False, warn=False)
    assert "rnn" in found.names
    plan = uniform_plan(found, 0.5)
    spec = {
        "number": 1,
        "plan": plan.to_dict(),
        "task": ROWS,
        "task_options": {"cell": cell},
        "finetune": {"epochs": 1, "lr": 0.01},
        "target": FAST,
    }
    result = run_trial(spec)
    assert result.status == TrialStatus.COMPLETE, result.reason
    assert base_accuracy > 0.8 and result.accuracy > 0.5  # chance is 0.1
    assert result.latency.median_ms > 0
    model, _ = load_pruned(result.model_bytes, copy.deepcopy(task.model))
    assert model.rnn.hidden_size == 16 and model.hidden.in_features == 16
    assert evaluate(model, task) == pytest.approx(result.accuracy)


def test_the_screen_screens_a_recurrent_model_s_candidates():
    task = build_task(ROWS)
    found = discover(task.model, task.example_inputs, verify=False, warn=False)
    check_lighter_cut_ranks_higher(ROWS, found, "taylor")


def test_the_cost_model_counts_a_recurrent_layer_s_work_on_both_sides_of_its_units():
    """Its input weights scale with its kept units, its recurrence (and the layers above the
    first) with them twice: half the units leave about a quarter of that work."""
    task = build_task(ROWS)
    found = discover(task.model, task.example_inputs, verify=False, warn=False)
    profile = profile_groups(task, task.model, found, batches=2)
    layers = {layer.name: layer for layer in profile.layers}
    inputs, recurrence = layers["rnn"], layers["rnn:recurrent"]
    assert (inputs.out_group, inputs.in_group) == ("rnn", None)
    assert (recurrence.out_group, recurrence.in_group) == ("rnn", "rnn")
    # 8 steps, 4 gates of 32 units: 8 inputs in the first layer; 32 recurrent in each of two
    # layers and 32 inputs in the second.
    assert inputs.cost == 8 * 4 * 32 * 8 and recurrence.cost == 8 * 4 * 32 * (32 * 2 + 32)
    full, half = profile.works({}), profile.works({"rnn": 0.5})
    index = [layer.name for layer in profile.layers].index("rnn:recurrent")
    assert half[index] == pytest.approx(full[index] / 4)
