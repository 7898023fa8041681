"""A GPT-2 written with its own ``Conv1D`` layers (a dense layer Torch-Pruning has no pruner
for) goes through a trial as a model of Linear layers does: its MLPs and residual stream
pruned by every criterion, counted, costed, finetuned, saved and reloaded."""

from __future__ import annotations

import copy

import pytest
import torch

from search_space import PruningPlan, discover, uniform_plan
from workers import (
    CRITERIA,
    TrialStatus,
    apply_plan,
    build_task,
    channel_counts,
    count_macs_params,
    evaluate,
    load_pruned,
    profile_groups,
    run_trial,
)

from ..nets import TinyGPT

GPT = "tests.workers.odd_models:digit_gpt"
FAST = {"batch_size": 4, "warmup": 1, "rounds": 2, "runs": 3}
MLPS = ("blocks.0.c_fc", "blocks.1.c_fc")


def test_a_trial_prunes_a_gpt2_s_own_layers_and_its_file_reloads():
    task = build_task(GPT)
    base_accuracy = evaluate(task.model, task)
    found = discover(task.model, task.example_inputs, warn=False)
    spec = {
        "number": 1,
        "plan": uniform_plan(found, 0.5).to_dict(),
        "task": GPT,
        "finetune": {"epochs": 1, "lr": 0.003},
        "target": FAST,
    }
    result = run_trial(spec)
    assert result.status == TrialStatus.COMPLETE, result.reason
    # Chance is 0.1; half of every group cut, the attention's heads too (since its stored part
    # size follows the cut), leaves one epoch short of the base.
    assert base_accuracy > 0.7 and result.accuracy > 0.3
    model, _ = load_pruned(result.model_bytes, copy.deepcopy(task.model))
    block = model.blocks[0]
    assert (block.d, block.c_attn.nf) == (16, 48)  # q, k and v split by the stored width
    # The widths it stores follow its weights: nf sizes its output's view.
    assert (block.c_fc.nf, block.c_fc.nx, tuple(block.c_fc.weight.shape)) == (32, 16, (16, 32))
    assert (block.c_proj.nf, block.c_proj.nx) == (16, 32) and model.embed.nf == 16
    assert evaluate(model, task) == pytest.approx(result.accuracy)


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_its_mlps_are_pruned_by_every_criterion(criterion):
    """No criterion of Torch-Pruning's reads such a layer: their own weights rank the group
    (counted as l1) where the criterion reads no member, as a recurrent layer's do."""
    torch.manual_seed(0)
    model, x = TinyGPT().eval(), torch.randn(4, 8, 8)
    plan = PruningPlan(ratios={"mlp": 0.5}, units={"mlp": MLPS}, criterion=criterion)
    counts: list[dict[str, int]] = []
    calibration = [(x, torch.tensor([0, 1, 2, 3]))]
    pruned = apply_plan(model, x, plan, calibration=calibration, on_ranked=counts.append)
    widths = channel_counts(pruned)
    assert [widths[m] for m in MLPS] == [32, 32] and widths["embed"] == 32
    assert sum(counts[0].values()) == 2 and set(counts[0]) <= {criterion, "l1"}


def test_its_macs_are_counted_and_costed_by_the_groups_that_cut_them():
    task = build_task(GPT)
    model, x = task.model, task.example_inputs
    found = discover(model, x, warn=False)
    plan = PruningPlan(ratios={"mlp": 0.5}, units={"mlp": MLPS})
    before, after = (
        count_macs_params(model, x)[0],
        count_macs_params(apply_plan(model, x, plan), x)[0],
    )
    # Each MLP: 8 tokens x (32 x 64 in, 64 x 32 out), halved in its hidden width.
    assert before - after == 2 * 8 * (32 * 64 + 64 * 32) // 2
    profile = profile_groups(task, model, found, batches=2)
    layers = {layer.name: layer for layer in profile.layers}
    stream = next(g.name for g in found.groups if "embed" in g.members)
    assert (layers["blocks.0.c_fc"].out_group, layers["blocks.0.c_fc"].in_group) == (
        "blocks.0.c_fc",
        stream,
    )
    assert layers["blocks.1.c_proj"].cost == 8 * 64 * 32
