"""Layers whose weight a parametrization computes: ``weight_norm`` (as audio models use it) is
taken off while a pruner works and put back on the pruned weight, exactly; ``spectral_norm``,
whose state is shaped by the weight, is left out with why."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from search_space import computed_weights, copy_model, discover, uniform_plan
from workers import BaseGradients, apply_plan, load_pruned, save_pruned


class _Normed(nn.Module):
    def __init__(self, norm=parametrizations.weight_norm) -> None:
        super().__init__()
        self.first = norm(nn.Conv1d(4, 16, 3, padding=1))
        self.second = parametrizations.weight_norm(nn.Conv1d(16, 16, 3, padding=1))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.second(torch.relu(self.first(x)))).mean(-1))


def _hooked_weight_norm(layer: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, still in many models
        return nn.utils.weight_norm(layer)


@pytest.mark.parametrize(
    "norm,magnitude",
    [
        (parametrizations.weight_norm, "first.parametrizations.weight.original0"),
        (_hooked_weight_norm, "first.weight_g"),
    ],
    ids=["parametrizations", "hook"],
)
def test_weight_norm_layers_are_pruned_exactly_and_stay_weight_normed(norm, magnitude, tmp_path):
    torch.manual_seed(0)
    model, x = _Normed(norm).eval(), torch.randn(3, 4, 10)
    # Without gradients: a hook-form weight_norm layer run with them holds a weight that is no
    # graph leaf, and then cannot be deep-copied (PyTorch's own limit, pytorch#103001).
    with torch.no_grad():
        expected = model(x)
    found = discover(model, x, verify=True, warn=False)
    assert set(found.names) == {"first", "second"}
    assert found.group("second").kind == "Conv1d (weight_norm)"
    plan = uniform_plan(found, 0.5)
    pruned = apply_plan(model, x, plan, discovery=found)

    # The base model is untouched (a deep copy shares a parametrized module's class).
    with torch.no_grad():
        assert parametrize.is_parametrized(model.second) and torch.equal(model(x), expected)
    # Pruned, each layer is weight-normed again: the base model's tensor names, smaller.
    assert parametrize.is_parametrized(pruned.second, "weight")
    names = {n: p.shape for n, p in pruned.named_parameters()}
    assert names.keys() == dict(model.named_parameters()).keys()
    assert names[magnitude] == (8, 1, 1)
    assert names["second.parametrizations.weight.original1"] == (8, 8, 3)

    # Exact: the base model's effective weights, `second` reading nothing of the channels of
    # `first` that were removed, and kept to its own kept rows, compute the pruned model.
    conv = nn.functional.conv1d
    w1, w2 = model.first.weight.detach(), model.second.weight.detach()
    kept1 = [int((w1 - w).abs().flatten(1).sum(1).argmin()) for w in pruned.first.weight]
    kept2 = [int((w2[:, kept1] - w).abs().flatten(1).sum(1).argmin()) for w in pruned.second.weight]
    h = torch.relu(conv(x, w1[kept1], model.first.bias[kept1], padding=1))
    h = torch.relu(conv(h, w2[kept2][:, kept1], model.second.bias[kept2], padding=1))
    head = nn.functional.linear(h.mean(-1), model.head.weight[:, kept2], model.head.bias)
    torch.testing.assert_close(pruned(x), head)

    loaded, _ = load_pruned(
        save_pruned(pruned, plan, tmp_path / "m.safetensors", base_model=model),
        copy.deepcopy(model),
    )
    torch.testing.assert_close(loaded(x), pruned(x))


def test_a_spectral_normed_layer_is_left_out_with_why():
    model = _Normed(parametrizations.spectral_norm).eval()
    found = discover(model, torch.randn(3, 4, 10), warn=False)
    assert "first" not in found.names and "second" in found.names
    assert "pruning it breaks the model" in {e.name: e.reason for e in found.excluded}["first"]


class _Residual(nn.Module):
    """Weight-normed convolutions with a residual branch written in the parent's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.first = parametrizations.weight_norm(nn.Conv1d(4, 16, 3, padding=1))
        self.branch = parametrizations.weight_norm(nn.Conv1d(16, 16, 3, padding=1))
        self.last = parametrizations.weight_norm(nn.Conv1d(16, 16, 3, padding=1))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        h = h + torch.relu(self.branch(h))
        return self.head(torch.relu(self.last(h)).mean(-1))


def test_a_pruned_weight_normed_model_with_a_dropped_branch_travels_to_a_latency_bench():
    """A parametrized module refuses to pickle, and a latency bench is sent the model: it gets
    the weights computed once (the same function). The rewritten forward of a dropped branch
    keeps no reference to the branch (it did, and the branch was still weight-normed)."""
    torch.manual_seed(0)
    model, x = _Residual().eval(), torch.randn(2, 4, 12)
    found = discover(model, x, warn=False)
    plan = dataclasses.replace(uniform_plan(found, 0.5), drop={"branch::branch": []})
    pruned = apply_plan(model, x, plan, discovery=found)
    assert not hasattr(pruned.forward.__self__, "branch")  # the rewritten forward's module
    plain = computed_weights(pruned)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    torch.testing.assert_close(pickle.loads(pickle.dumps(plain))(x), pruned(x))
    assert parametrize.is_parametrized(pruned.first)  # the model itself is left as it was


@pytest.mark.parametrize("criterion", ["taylor", "hessian"])
def test_gradients_taken_once_rank_a_weight_normed_model_as_its_own_calibration(criterion):
    """The screen takes the base model's gradients once and lays them on each candidate as its
    pruner sees it: weights computed, not the parametrization's g and v."""
    torch.manual_seed(0)
    model, x = _Normed().eval(), torch.randn(8, 4, 10)
    batches = [(x, torch.randint(0, 3, (8,)))]
    found = discover(model, x, warn=False)
    plan = uniform_plan(found, 0.5, criterion=criterion)
    own = apply_plan(model, x, plan, discovery=found, calibration=batches)
    shared = apply_plan(model, x, plan, discovery=found, gradients=BaseGradients(model, batches))
    torch.testing.assert_close(shared(x), own(x))


def test_a_hook_weight_normed_model_trained_with_gradients_is_still_copied_and_pruned():
    """After a forward with gradients, a hook-form weight_norm layer holds a weight that is no
    graph leaf, which a deep copy refuses; the copies the search makes (every trial's, every
    candidate's) detach it first."""
    torch.manual_seed(0)
    model, x = _Normed(_hooked_weight_norm).train(), torch.randn(3, 4, 10)
    model(x).sum().backward()  # as a task's build that trains the model leaves it
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    copied = copy_model(model.eval())
    with torch.no_grad():
        torch.testing.assert_close(copied(x), model(x))
    found = discover(model, x, warn=False)
    assert set(found.names) == {"first", "second"}
    assert apply_plan(model, x, uniform_plan(found, 0.5), discovery=found)(x).shape == (3, 3)


class _CachedBias(nn.Module):
    """A layer keeping a value computed from its parameters in a plain attribute, made in an
    eval forward (with gradients on) and cleared when it trains, as timm's LeViT keeps its
    attention biases gathered per position."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bias_table = nn.Parameter(torch.randn(4))
        self.register_buffer("idx", torch.tensor([0, 1, 2, 3, 3, 2, 1, 0]), persistent=False)
        self.cache: dict[str, torch.Tensor] = {}
        self.head = nn.Linear(16, 8)

    def train(self, mode: bool = True) -> _CachedBias:
        super().train(mode)
        self.cache = {}
        return self

    def gathered(self) -> torch.Tensor:
        if self.training:
            return self.bias_table[self.idx]
        if "cpu" not in self.cache:
            self.cache["cpu"] = self.bias_table[self.idx]
        return self.cache["cpu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3))) + self.gathered()


def test_a_model_caching_a_computed_tensor_is_copied_discovered_and_pruned():
    """A tensor with a graph kept in a plain attribute (a cache of values computed from the
    parameters) is no graph leaf, which a deep copy refuses; every discovery's dry run copies
    the model, so such a model (timm's LeViT) could not be searched at all. The copy holds the
    same values, detached."""
    torch.manual_seed(0)
    model, x = _CachedBias().eval(), torch.randn(2, 3, 6, 6)
    expected = model(x)  # with gradients on, as a user's own check leaves it
    assert model.cache["cpu"].grad_fn is not None
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    copied = copy_model(model)
    assert copied.cache["cpu"].grad_fn is None
    assert copied.cache["cpu"] is not model.cache["cpu"]
    torch.testing.assert_close(copied(x), expected)
    assert model.cache["cpu"].grad_fn is not None  # the model itself is left as it was
    found = discover(model, x, warn=False)
    assert found.names == ("conv",)
    pruned = apply_plan(model, x, uniform_plan(found, 0.5), discovery=found)
    assert pruned.conv.out_channels == 8 and pruned(x).shape == (2, 8)
