"""A model whose attention reshapes by sizes it stored (timm's) goes through a trial: its
projections cut per head, the stored head width following the cut, finetuned, saved and
reloaded."""

from __future__ import annotations

import copy

import pytest

from search_space import discover, uniform_plan
from workers import TrialStatus, build_task, evaluate, load_pruned, run_trial

VIT = "tests.workers.odd_models:digit_vit"
FAST = {"batch_size": 4, "warmup": 1, "rounds": 2, "runs": 3}


def test_a_trial_prunes_attention_reshaped_by_stored_sizes_and_its_file_reloads():
    task = build_task(VIT)
    found = discover(task.model, task.example_inputs, warn=False)
    assert "attn.qkv" in found.names  # before: left out, its stored head width no longer fit
    spec = {
        "number": 1,
        "plan": uniform_plan(found, 0.5).to_dict(),
        "task": VIT,
        "finetune": {"epochs": 1, "lr": 0.003},
        "target": FAST,
    }
    result = run_trial(spec)
    assert result.status == TrialStatus.COMPLETE, result.reason
    assert evaluate(task.model, task) > 0.6 and result.accuracy > 0.25  # chance is 0.1
    model, _ = load_pruned(result.model_bytes, copy.deepcopy(task.model))
    attn = model.attn
    assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (4, 4, 16)
    assert tuple(attn.qkv.weight.shape) == (48, 16)  # the stream, too, cut by half
    assert evaluate(model, task) == pytest.approx(result.accuracy)
