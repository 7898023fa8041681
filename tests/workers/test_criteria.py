"""Every criterion in the registry runs the same contract on the trained digits model.

Contract: applied through a plan it prunes exactly the planned share, the model still runs
and still classifies (finite outputs, accuracy far above chance without finetuning at a mild
ratio), the choice is deterministic for a fixed model and data, and it is a *ranking* of its
own: channels chosen by informed criteria beat the random one on accuracy.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from search_space import CRITERIA as SPACE_CRITERIA
from search_space import PruningPlan, discover, uniform_plan
from tests.nets import MixBlock
from workers import (
    CRITERIA,
    BaseGradients,
    Task,
    accuracy,
    apply_plan,
    channel_counts,
    get_criterion,
    profile_groups,
)

from .odd_models import OneHeadInTheLoss, first_head

UNITS = ("layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1")


def _plan(criterion: str, ratio: float) -> PruningPlan:
    return PruningPlan(
        ratios=dict.fromkeys(UNITS, ratio), units={u: (u,) for u in UNITS}, criterion=criterion
    )


_BATCHES: dict[int, list] = {}


def _calibration(task) -> list:
    """The same two training batches every time (the loader reshuffles on each pass)."""
    if id(task) not in _BATCHES:
        _BATCHES[id(task)] = list(itertools.islice(iter(task.train_loader), 2))
    return _BATCHES[id(task)]


def _prune(task, criterion: str, ratio: float = 0.5):
    torch.manual_seed(0)
    batches = _calibration(task)
    return apply_plan(task.model, task.example_inputs, _plan(criterion, ratio), calibration=batches)


def _kept(pruned, base, name: str) -> torch.Tensor:
    """Which of the base layer's output channels survive (matched by their weights)."""
    w0 = dict(base.named_modules())[name].weight.flatten(1)
    w1 = dict(pruned.named_modules())[name].weight
    # Input channels of these convs are untouched (their block input is not planned).
    return torch.tensor([int((w0 - row.flatten()).abs().sum(1).argmin()) for row in w1])


def test_the_registry_and_the_space_offer_the_same_criteria():
    assert set(CRITERIA) == set(SPACE_CRITERIA)
    with pytest.raises(ValueError, match="unknown criterion 'l3'"):
        get_criterion("l3")


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_every_criterion_prunes_the_planned_share_and_the_model_still_classifies(
    digits_task, criterion
):
    pruned = _prune(digits_task, criterion)
    before, after = channel_counts(digits_task.model), channel_counts(pruned)
    for u in UNITS:
        assert after[u] == before[u] // 2, (criterion, u)
    with torch.no_grad():
        out = pruned(digits_task.example_inputs)
    assert torch.isfinite(out).all()
    assert accuracy(pruned, digits_task.val_loader) > 0.2  # 10 classes: chance is 0.1


@pytest.mark.parametrize("criterion", sorted(set(CRITERIA) - {"random"}))
def test_every_informed_criterion_is_deterministic(digits_task, criterion):
    a, b = _prune(digits_task, criterion), _prune(digits_task, criterion)
    for u in UNITS:
        assert torch.equal(dict(a.named_modules())[u].weight, dict(b.named_modules())[u].weight)


def test_informed_criteria_choose_differently_and_better_than_random(digits_task):
    kept = {
        c: _kept(_prune(digits_task, c), digits_task.model, "layer1.0.conv1")
        for c in ("l1", "taylor", "random")
    }
    assert not torch.equal(
        kept["l1"].sort().values, kept["taylor"].sort().values
    )  # gradients change the ranking
    acc = {
        c: accuracy(_prune(digits_task, c, 0.6), digits_task.val_loader)
        for c in ("l1", "l2", "lamp", "random")
    }
    assert max(acc["l1"], acc["l2"], acc["lamp"]) > acc["random"], acc


def test_gradient_criteria_refuse_to_rank_without_calibration_data(digits_task):
    with pytest.raises(ValueError, match="need calibration batches"):
        apply_plan(digits_task.model, digits_task.example_inputs, _plan("taylor", 0.5))


@pytest.mark.parametrize("criterion", ["taylor", "hessian"])
def test_gradients_taken_once_from_the_base_prune_each_copy_as_its_own_calibration_would(
    digits_task, criterion
):
    # Hessian runs a backward pass per sample: a few samples keep the test short.
    batches = [(x[:8], y[:8]) for x, y in _calibration(digits_task)]
    calls = []

    def loss(outputs, targets, **kw):
        calls.append(len(targets))
        return torch.nn.functional.cross_entropy(outputs, targets, **kw)

    before = [p.grad for p in digits_task.model.parameters()]
    taken = BaseGradients(digits_task.model, batches, loss)
    for ratio in (0.3, 0.6):
        plan = _plan(criterion, ratio)
        own = apply_plan(digits_task.model, digits_task.example_inputs, plan, calibration=batches)
        restored = apply_plan(
            digits_task.model,
            digits_task.example_inputs,
            plan,
            calibration=batches,
            gradients=taken,
        )
        a, b = own.state_dict(), restored.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), criterion
    assert calls == [8, 8]  # one calibration for both plans: one loss per batch
    after = [p.grad for p in digits_task.model.parameters()]
    assert all(a is b for a, b in zip(before, after, strict=True))  # the base is never calibrated


def test_each_group_is_counted_under_the_criterion_that_ranked_it(digits_task):
    counts: list[dict[str, int]] = []
    batches = _calibration(digits_task)
    apply_plan(
        digits_task.model,
        digits_task.example_inputs,
        _plan("bn_scale", 0.5),
        on_ranked=counts.append,
    )
    mixed = replace(_plan("l1", 0.5), criteria={UNITS[0]: "lamp"})
    apply_plan(
        digits_task.model,
        digits_task.example_inputs,
        mixed,
        calibration=batches,
        on_ranked=counts.append,
    )
    assert counts == [{"bn_scale": 3}, {"l1": 2, "lamp": 1}]


def test_bn_scale_without_batchnorm_prunes_as_l1_and_says_so():
    """bn_scale cannot rank a group with no BatchNorm in it: l1 ranks it, and the count says l1,
    so a front does not name a criterion that ranked nothing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip
    x = torch.randn(2, 1, 8, 8)
    units = {"0": ("0",), "2": ("2",)}
    counts: list[dict[str, int]] = []
    pruned = {
        c: apply_plan(
            model,
            x,
            PruningPlan(ratios=dict.fromkeys(units, 0.5), units=units, criterion=c),
            on_ranked=counts.append,
        )
        for c in ("bn_scale", "l1")
    }
    assert counts == [{"l1": 2}, {"l1": 2}]
    a, b = pruned["bn_scale"].state_dict(), pruned["l1"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same model: l1 ranked both


@pytest.mark.parametrize("criterion", ["taylor", "hessian"])
def test_a_layer_the_loss_does_not_reach_is_ranked_by_l1(criterion):
    # Its weight has no gradient, which Torch-Pruning's Taylor and Hessian read unchecked:
    # every candidate of such a model (a head the loss leaves out) failed with AttributeError.
    torch.manual_seed(0)
    model, x = OneHeadInTheLoss().eval(), torch.randn(4, 3, 6, 6)
    calibration = [(x, torch.tensor([0, 1, 2, 0]))]
    units = {n: (n,) for n in ("stem", "a", "b")}
    plan = PruningPlan(ratios=dict.fromkeys(units, 0.5), units=units, criterion=criterion)
    counts: list[dict[str, int]] = []
    pruned = apply_plan(
        model,
        x,
        plan,
        calibration=calibration,
        on_ranked=counts.append,
        loss_fn=first_head,
    )
    assert counts == [{criterion: 2, "l1": 1}]  # 'b' alone is out of the loss's reach
    assert {k: channel_counts(pruned)[k] for k in ("stem", "a", "b")} == dict.fromkeys(units, 4)


class _StackedRecurrent(torch.nn.Module):
    """A GRU feeding an LSTM: the GRU's group holds recurrent layers only, which none of
    Torch-Pruning's criteria read."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.GRU(6, 12, batch_first=True)
        self.second = torch.nn.LSTM(12, 10, batch_first=True)
        self.head = torch.nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.first(x)[0])[0][:, -1])


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_a_group_of_recurrent_layers_alone_is_pruned_by_every_criterion(criterion):
    """TP keeps a group no criterion ranks whole, whatever its ratio: the recurrent layers'
    own weights rank it (counted as l1) where the criterion reads no member."""
    torch.manual_seed(0)
    model, x = _StackedRecurrent().eval(), torch.randn(4, 5, 6)
    units = {"first": ("first",), "second": ("second",)}
    plan = PruningPlan(ratios=dict.fromkeys(units, 0.5), units=units, criterion=criterion)
    counts: list[dict[str, int]] = []
    calibration = [(x, torch.tensor([0, 1, 2, 0]))]
    pruned = apply_plan(model, x, plan, calibration=calibration, on_ranked=counts.append)
    assert channel_counts(pruned) == {"first": 6, "second": 5, "head": 3}
    assert sum(counts[0].values()) == 2 and set(counts[0]) <= {criterion, "l1"}
    assert counts[0].get("l1", 0) >= (criterion != "random")  # random ranks any group


class _EmbeddedRecurrent(torch.nn.Module):
    """Token ids through an embedding into an LSTM: the embedding's group holds an embedding and
    the LSTM's inputs, which none of Torch-Pruning's criteria read."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(40, 12)
        self.rnn = torch.nn.LSTM(12, 10, batch_first=True)
        self.head = torch.nn.Linear(10, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0][:, -1])


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_an_embedding_read_by_a_recurrent_layer_is_pruned_by_every_criterion(criterion):
    torch.manual_seed(0)
    model, tokens = _EmbeddedRecurrent().eval(), torch.randint(0, 40, (4, 7))
    units = {"embed": ("embed",), "rnn": ("rnn",)}
    plan = PruningPlan(ratios=dict.fromkeys(units, 0.5), units=units, criterion=criterion)
    counts: list[dict[str, int]] = []
    calibration = [(tokens, torch.tensor([0, 1, 2, 0]))]
    pruned = apply_plan(model, tokens, plan, calibration=calibration, on_ranked=counts.append)
    assert channel_counts(pruned) == {"embed": 6, "rnn": 5, "head": 3}
    assert pruned.rnn.input_size == 6 and pruned(tokens).shape == (4, 3)
    assert sum(counts[0].values()) == 2 and set(counts[0]) <= {criterion, "l1"}
    if criterion in ("l1", "l2"):  # magnitude: the embedding's columns with the LSTM's inputs
        kept = {
            j
            for j in range(12)
            for i in range(6)
            if torch.equal(model.embed.weight[:, j], pruned.embed.weight[:, i])
        }
        owned = model.embed.weight.abs().sum(0) + model.rnn.weight_ih_l0.abs().sum(0)
        assert sum(owned[sorted(kept)]) >= sum(owned.sort().values[-6:]) * 0.999


def _mixed_pointwise() -> tuple[MixBlock, torch.Tensor, list]:
    """MixNet's block with its pointwise convs mixed too: each depthwise piece roots a group of
    its own, whose 12 channels the pointwise convs on either side hold in two halves."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    return MixBlock(se=False, mixed_pointwise=True).eval(), x, [(x, torch.arange(8) % 10)]


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_a_group_whose_root_the_criterion_does_not_score_is_ranked_whole(criterion):
    """Taylor and FPGM score no depthwise conv and no BatchNorm, and Torch-Pruning sized the
    group's importance by the first member they do score, holding half its channels: "index 6
    is out of bounds", and timm's MixNet could not be pruned under those criteria, nor
    profiled for any search."""
    model, x, calibration = _mixed_pointwise()
    found = discover(model, x, warn=False)
    plan = uniform_plan(found, 0.5, criterion=criterion)
    pruned = apply_plan(model, x, plan, calibration=calibration, discovery=found)
    assert [c.out_channels for c in pruned.depthwise.convs] == [6, 6, 6]
    assert pruned(x).shape == (8, 10)


def test_such_a_group_is_profiled_with_an_importance_for_every_channel():
    model, x, calibration = _mixed_pointwise()
    found = discover(model, x, warn=False)
    task = Task(model=model, example_inputs=x[:2], train_loader=calibration, val_loader=[])
    groups = profile_groups(task, model, found).groups
    for i in range(3):
        importance = groups[f"depthwise.convs.{i}"].importance
        # Both halves scored (by the pointwise convs that hold them), none left at zero.
        assert len(importance) == 12 and min(importance) > 0
