"""Dropping residual blocks on a real model: pruning, saving and loading, screening, profiling."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from search_space import (
    PruningPlan,
    architecture_signature,
    discover,
    residual_blocks,
    uniform_plan,
)
from workers import (
    TrialStatus,
    apply_plan,
    build_task,
    load_pruned,
    profile_job,
    pruned_bytes,
    screen_candidates,
)

from ..nets import Encoder


def _with_drop(plan: PruningPlan, drop: dict[str, tuple[str, ...]]) -> PruningPlan:
    return PruningPlan.from_dict({**plan.to_dict(), "drop": {k: list(v) for k, v in drop.items()}})


def test_a_dropped_block_becomes_the_identity_and_the_saved_model_rebuilds_it(digits_discovery):
    task = build_task("digits")
    plan = _with_drop(uniform_plan(digits_discovery, 0.25), {"layer1.1": ("layer1.1.conv1",)})
    model = apply_plan(task.model, task.example_inputs, plan)
    assert isinstance(model.layer1[1], nn.Identity) and not isinstance(model.layer1[0], nn.Identity)
    kept = apply_plan(task.model, task.example_inputs, uniform_plan(digits_discovery, 0.25))
    assert architecture_signature(model) != architecture_signature(kept)
    x = torch.randn(3, *task.example_inputs.shape[1:])
    assert model(x).shape == kept(x).shape
    # The file holds no tensor of the dropped block; its plan drops it again on load.
    data = pruned_bytes(model, plan, task.model)
    loaded, again = load_pruned(data, copy.deepcopy(task.model))
    assert again == plan and isinstance(loaded.layer1[1], nn.Identity)
    assert torch.equal(loaded(x), model(x))


def test_the_profile_ranks_the_blocks_by_measured_damage_when_depth_is_on(digits_discovery):
    job = {"task": "digits", "seed": 0, "bn_batches": 2, "score_batches": 2}
    assert profile_job(job, None, digits_discovery).blocks == ()  # off: nothing measured
    blocks = profile_job({**job, "depth": True}, None, digits_discovery).blocks
    assert {b.name for b in blocks} == {"layer1.0", "layer1.1", "layer2.1"}
    damage = [b.damage for b in blocks]
    assert damage == sorted(damage) and all(math.isfinite(d) for d in damage)
    assert max(damage) > 0  # dropping a trained block costs loss somewhere


def test_a_screened_candidate_that_drops_blocks_is_its_own_smaller_architecture(digits_discovery):
    plain = uniform_plan(digits_discovery, 0.25)
    dropped = _with_drop(plain, {"layer1.0": ("layer1.0.conv1",), "layer1.1": ("layer1.1.conv1",)})
    job = {
        "task": "digits",
        "seed": 0,
        "bn_batches": 2,
        "score_batches": 2,
        "target": {"warmup": 2, "rounds": 3, "runs": 10},
        "candidates": [{"number": i, "plan": p.to_dict()} for i, p in enumerate([plain, dropped])],
    }
    results = screen_candidates(job)
    assert [r.status for r in results] == [TrialStatus.COMPLETE] * 2, [r.reason for r in results]
    assert results[0].signature != results[1].signature
    # Two of five blocks gone: fewer parameters (timing, at this size, is within its noise).
    assert results[1].params < results[0].params


class _Inline(nn.Module):
    """A hand-written model whose residuals are in its own forward, not modules of their own."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, d, 3, padding=1), nn.BatchNorm2d(d), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, groups=d), nn.BatchNorm2d(d))
        self.pw = nn.Sequential(nn.Conv2d(d, d, 1), nn.BatchNorm2d(d))
        self.attn = nn.MultiheadAttention(d, num_heads=2, batch_first=True)
        self.fc = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.pw(torch.relu(self.dw(x))))
        tokens = x.flatten(2).transpose(1, 2)
        return self.fc((tokens + self.attn(tokens, tokens, tokens)[0]).mean(dim=1))


def test_a_branch_dropped_from_a_parents_forward_prunes_saves_and_loads():
    base, x = _Inline().eval(), torch.randn(1, 1, 8, 8)
    found = discover(base, x)
    blocks = {b.name: b.groups for b in residual_blocks(base, x, found)}
    assert set(blocks) == {"branch::dw+pw", "branch::attn"}
    plan = _with_drop(uniform_plan(found, 0.25), {"branch::dw+pw": blocks["branch::dw+pw"]})
    model = apply_plan(base, x, plan)
    assert isinstance(model.dw, nn.Identity) and not isinstance(base.dw, nn.Identity)
    batch = torch.randn(3, 1, 8, 8)
    # The saved file rebuilds the same model on a fresh copy of the base: same outputs.
    loaded, again = load_pruned(pruned_bytes(model, plan, base), copy.deepcopy(base))
    assert again == plan and isinstance(loaded.pw, nn.Identity)
    with torch.no_grad():
        assert torch.allclose(loaded(batch), model(batch), atol=1e-6)
        # And it exports (MLflow's default flavour is torch.export) with the branch gone.
        exported = torch.export.export(model, (batch,)).module()
        assert torch.allclose(exported(batch), model(batch), atol=1e-6)


def test_a_torch_nn_encoder_layer_drops_beside_pruned_channels_saves_and_loads():
    base, x = Encoder().eval(), torch.randn(2, 5, 8)
    found = discover(base, x)
    blocks = {b.name: b.groups for b in residual_blocks(base, x, found)}
    # Not the first: nn.TransformerEncoder reads layers[0].self_attn on every call.
    assert set(blocks) == {"encoder.layers.1", "encoder.layers.2"}
    plan = _with_drop(uniform_plan(found, 0.5), {"encoder.layers.2": blocks["encoder.layers.2"]})
    model = apply_plan(base, x, plan)
    assert isinstance(model.encoder.layers[2], nn.Identity)
    assert (
        model.encoder.layers[0].linear1.out_features < base.encoder.layers[0].linear1.out_features
    )
    loaded, again = load_pruned(pruned_bytes(model, plan, base), copy.deepcopy(base))
    assert again == plan and isinstance(loaded.encoder.layers[2], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
