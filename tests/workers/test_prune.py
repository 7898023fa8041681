"""apply_plan on the digits network: ratios become channel counts, monotonically."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from search_space import (
    PruningPlan,
    discover,
    kept_channels,
    kept_ratio_cap,
    uniform_plan,
)
from workers import (
    DigitsNet,
    apply_plan,
    build_task,
    channel_counts,
    count_macs_params,
    get_criterion,
    load_pruned,
    save_pruned,
)

from . import odd_models

X = torch.randn(2, 1, 8, 8)


def _plan(ratios: dict[str, float], round_to: int = 1) -> PruningPlan:
    return PruningPlan(ratios=ratios, units={n: (n,) for n in ratios}, round_to=round_to)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DigitsNet().eval()


def test_a_ratio_removes_that_share_of_a_group_and_leaves_the_rest_alone(model):
    names = discover(model, X).names
    target = names[0]
    pruned = apply_plan(model, X, _plan({target: 0.5}))
    before, after = channel_counts(model), channel_counts(pruned)
    assert after[target] == before[target] // 2
    assert pruned(X).shape == model(X).shape
    untouched = [n for n in names if n != target and n in before]
    assert untouched and all(after[n] == before[n] for n in untouched)


@pytest.mark.parametrize("ratio, kept", [(0.5, 16), (0.7, 8), (0.8, 8), (0.95, 8)])
def test_round_to_never_lets_a_high_ratio_skip_the_group(model, ratio, kept):
    # 32 channels at 0.8 leave 6.4, which round_to=8 rounds to 0: Torch-Pruning would then
    # skip the group and prune nothing. The plan must instead keep one block of 8.
    name = "stem.0"
    assert channel_counts(model)[name] == 32
    pruned = apply_plan(model, X, _plan({name: ratio}, round_to=8))
    assert channel_counts(pruned)[name] == kept


def test_a_group_no_larger_than_round_to_is_left_whole():
    torch.manual_seed(0)
    narrow = DigitsNet(width=8).eval()
    pruned = apply_plan(narrow, X, _plan({"stem.0": 0.9}, round_to=8))
    assert channel_counts(pruned)["stem.0"] == 8


def test_a_plan_for_another_model_is_refused_by_name(model):
    with pytest.raises(ValueError, match="groups this model does not have"):
        apply_plan(model, X, _plan({"encoder.7": 0.5}))


@pytest.mark.parametrize("round_to", [1, 4, 8])
def test_applied_ratios_predict_the_channels_the_pruner_removes(model, round_to):
    # The cost model reads a plan through applied_ratios: they must be what pruning does, group
    # by group, rounding and the keep-one-block cap included, or a plan's latency is mispredicted.
    names = discover(model, X).names
    before = channel_counts(model)
    gen = torch.Generator().manual_seed(round_to)
    for _ in range(4):
        ratios = {n: round(float(torch.rand(1, generator=gen)) * 0.9, 3) for n in names}
        plan = _plan(ratios, round_to=round_to)
        after = channel_counts(apply_plan(model, X, plan))
        applied = plan.applied_ratios({n: before[n] for n in names})
        assert applied == pytest.approx({n: 1 - after[n] / before[n] for n in names})
    if round_to > 1:  # a low ratio rounds to a whole block removed: the plan's own ratio is off
        low = _plan({"stem.0": 0.1}, round_to=round_to)
        assert low.applied_ratios({"stem.0": 32})["stem.0"] == round_to / 32 != 0.1


class _TiedLM(torch.nn.Module):
    """Token ids through an embedding, a residual MLP, and an output layer sharing the
    embedding's weight (weight tying, as GPT-2 does)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(30, 16)
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.out = torch.nn.Linear(16, 30, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.down(torch.relu(self.up(h)))
        return self.out(h).mean(1)


def test_pruning_and_reloading_keep_tied_weights_one_parameter(tmp_path):
    """The residual stream's channels are the embedding's and the tied output layer's: pruned,
    they stay one parameter (a finetune trains one tensor, as the base model did), and so they
    load."""
    torch.manual_seed(0)
    model, tokens = _TiedLM().eval(), torch.randint(0, 30, (2, 7))
    found = discover(model, tokens, verify=False, warn=False)
    plan = uniform_plan(found, 0.5)
    pruned = apply_plan(model, tokens, plan, discovery=found)
    assert pruned.embed.weight.shape == (30, 8) and pruned.out.weight is pruned.embed.weight
    loaded, _ = load_pruned(
        save_pruned(pruned, plan, tmp_path / "m.safetensors", base_model=model),
        copy.deepcopy(model),
    )
    assert loaded.out.weight is loaded.embed.weight
    torch.testing.assert_close(loaded(tokens), pruned(tokens))


def _sliced_net(kind: str) -> torch.nn.Module:
    """Two 32-channel groups: the first through a GroupNorm of 8 groups (or a conv of 4 groups
    reads it), the second plain."""
    norm = nn.GroupNorm(8, 32) if kind == "groupnorm" else nn.BatchNorm2d(32)
    groups = 4 if kind == "grouped_conv" else 1
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        norm,
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=groups),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


@pytest.mark.parametrize("kind, splits", [("groupnorm", (8, 1)), ("grouped_conv", (4, 4))])
@pytest.mark.parametrize("round_to, steps", [(1, 1), (8, 1), (8, 3)])
def test_a_group_cut_in_slices_keeps_exactly_what_the_plan_says(kind, splits, round_to, steps):
    # Torch-Pruning's own rounding of such a group pruned a GroupNorm(8, 32) at 0.1 to 24
    # channels, kept all 32 at 0.9, and pruned nothing at round_to 8, in one step or in three
    # (an iterative recovery's). Each group must keep what kept_channels says (the allocator and
    # the cost model read plans through it), the model must still run, and more ratio never
    # keeps more channels.
    torch.manual_seed(0)
    model, x = _sliced_net(kind), torch.randn(2, 3, 8, 8)
    discovery = discover(model, x)
    assert {g.name: g.split for g in discovery.groups} == {"0": splits[0], "3": splits[1]}
    channels = {g.name: g.channels for g in discovery.groups}
    split = {g.name: g.split for g in discovery.groups}
    last = dict(channels)
    for ratio in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9):
        plan = replace(
            _plan(dict.fromkeys(channels, ratio), round_to=round_to), iterative_steps=steps
        )
        pruned = apply_plan(model, x, plan)
        after = {"0": pruned[0].out_channels, "3": pruned[3].out_channels}
        expected = {g: kept_channels(ratio, c, round_to, split[g]) for g, c in channels.items()}
        assert after == expected, (ratio, after, expected)
        assert all(k % split[g] == 0 and k % round_to == 0 for g, k in after.items())
        assert plan.applied_ratios(channels, split) == {g: 1 - k / 32 for g, k in after.items()}
        assert all(after[g] <= last[g] for g in after)
        assert pruned(x).shape == (2, 10)
        last = after
    assert last["0"] < 32  # a high ratio prunes the sliced group too


@pytest.mark.parametrize("kind", ["groupnorm", "grouped_conv"])
@pytest.mark.parametrize("round_to, steps", [(1, 1), (8, 1), (8, 3)])
def test_a_global_plan_cuts_a_sliced_group_in_whole_steps(kind, round_to, steps):
    # Torch-Pruning's global ranking rounded a sliced group's per-slice count as the group's
    # (a GroupNorm's conv kept all 32 at round_to 8, at every ratio) and skipped a group whose
    # slices it would empty (all 32 kept at 0.8 with round_to 1).
    torch.manual_seed(0)
    model, x = _sliced_net(kind), torch.randn(2, 3, 8, 8)
    discovery = discover(model, x)
    split = {g.name: g.split for g in discovery.groups}
    pruned_sliced = []
    for ratio in (0.1, 0.3, 0.5, 0.8, 0.9):
        plan = PruningPlan(
            ratios={"all": ratio},
            units={"all": tuple(split)},  # one unit: ranked across both groups
            round_to=round_to,
            global_pruning=True,
            iterative_steps=steps,
        )
        pruned = apply_plan(model, x, plan, calibration=[(x, torch.tensor([0, 1]))])
        kept = {"0": pruned[0].out_channels, "3": pruned[3].out_channels}
        for g, k in kept.items():
            step = math.lcm(round_to, split[g])
            assert k % step == 0 and k >= max(step, 32 * (1 - plan.max_ratio)), (ratio, kept)
        assert pruned(x).shape == (2, 10)
        pruned_sliced.append(kept["0"] < 32 if kind == "groupnorm" else kept["3"] < 32)
    assert pruned_sliced[-2:] == [True, True]  # high ratios cut the sliced group too


@pytest.mark.parametrize("isomorphic", [False, True])
def test_a_global_plan_on_groups_of_one_slice_prunes_as_torch_pruning_does(
    isomorphic, digits_task, digits_discovery
):
    # Rounding a global plan outside Torch-Pruning keeps its choices where it rounds right. An
    # isomorphic plan changed nothing at all: Torch-Pruning ranks in isomorphic scopes only the
    # groups that have no ratio of their own, and apply_plan gave every group one.
    model, x = digits_task.model, digits_task.example_inputs
    counts = []
    for round_to, ratio in [(1, 0.3), (8, 0.3), (8, 0.6)]:
        plan = replace(
            uniform_plan(digits_discovery, ratio),
            global_pruning=not isomorphic,
            isomorphic=isomorphic,
            round_to=round_to,
        )
        ours = apply_plan(model, x, plan)
        theirs = copy.deepcopy(model)
        modules = dict(theirs.named_modules())
        roots = tuple(modules[g] for g in digits_discovery.names)
        # apply_plan's cap: no group rounds to nothing
        capped = kept_ratio_cap(ratio, min(g.channels for g in digits_discovery.groups), round_to)
        tp.pruner.BasePruner(
            theirs,
            x,
            importance=get_criterion(plan.criterion).make(),
            global_pruning=True,
            isomorphic=isomorphic,
            pruning_ratio=capped if isomorphic else 0.0,
            pruning_ratio_dict={} if isomorphic else {roots: capped},
            max_pruning_ratio=plan.max_ratio,
            ignored_layers=[modules[n] for n in digits_discovery.output_layers],
            round_to=round_to if round_to > 1 else None,
        ).step()
        assert channel_counts(ours) == channel_counts(theirs), (round_to, ratio)
        counts.append(channel_counts(ours))
    if isomorphic:  # not the global plan's
        plain = apply_plan(
            model, x, replace(uniform_plan(digits_discovery, 0.3), global_pruning=True)
        )
        assert channel_counts(plain) != counts[0]


def test_an_isomorphic_plan_needs_one_ratio(digits_task, digits_discovery):
    names = digits_discovery.names
    plan = PruningPlan(
        ratios={n: 0.2 + 0.05 * i for i, n in enumerate(names)},
        units={n: (n,) for n in names},
        isomorphic=True,
    )
    with pytest.raises(ValueError, match="an isomorphic plan gives every group one ratio"):
        apply_plan(digits_task.model, digits_task.example_inputs, plan)


def test_a_plan_never_prunes_a_slice_away():
    # A group whose slices hold one channel each (GroupNorm with as many groups as channels)
    # cannot lose a channel without emptying a slice: the pruner leaves it whole.
    assert kept_channels(0.5, 32, 1, 32) == 32
    assert kept_channels(0.99, 32, 1, 8) == 8 and kept_channels(0.99, 5, 1, 1) == 1
    assert kept_channels(0.3, 48, 8, 4) == 32  # multiples of both: lcm(8, 4) = 8
    assert kept_channels(0.3, 48, 6, 4) == 24  # lcm(6, 4) = 12


class _Gated(torch.nn.Module):
    """Channels tied by the model's own ops: a conv's output chunked and the halves multiplied
    (a gated conv, GLU-style), then a fused gate-and-up projection chunked in two."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Conv2d(3, 64, 3, padding=1)
        self.conv = nn.Conv2d(32, 24, 3, padding=1)
        self.gate_up = nn.Linear(24, 2 * 40)
        self.down = nn.Linear(40, 24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.gate(x).chunk(2, dim=1)
        h = torch.relu(self.conv(a * torch.sigmoid(b))).mean((2, 3))
        g, u = self.gate_up(h).chunk(2, dim=-1)
        return self.fc(h + self.down(torch.nn.functional.silu(g) * u))


@pytest.mark.parametrize("round_to", [1, 8])
def test_channels_tied_by_the_models_own_ops_are_cut_in_pairs_exactly_as_planned(round_to):
    # Torch-Pruning removes a tied channel's partner too: a plan took twice its channels (the
    # gated conv at 0.1 kept 50 of 64, not 57) and, from 0.5 up, every channel, so it skipped
    # the group. Discovery finds the tie as slices; each group keeps what kept_channels says,
    # and a kept channel's partner is kept with it.
    torch.manual_seed(0)
    model, x = _Gated().eval(), torch.randn(2, 3, 8, 8)
    discovery = discover(model, x)
    split = {g.name: g.split for g in discovery.groups}
    assert split == {"gate": 2, "down": 1, "gate_up": 2}  # down: the residual stream
    channels = {g.name: g.channels for g in discovery.groups}
    for ratio in (0.05, 0.1, 0.3, 0.5, 0.7, 0.9):
        plan = _plan(dict.fromkeys(channels, ratio), round_to=round_to)
        pruned = apply_plan(model, x, plan)
        counts = channel_counts(pruned)
        expected = {g: kept_channels(ratio, c, round_to, split[g]) for g, c in channels.items()}
        assert {g: counts[g] for g in channels} == expected, ratio
        assert pruned(x).shape == (2, 10)
        rows = model.gate.weight.flatten(1)
        kept = [int((rows - w).abs().sum(1).argmin()) for w in pruned.gate.weight.flatten(1)]
        assert sorted(kept) == sorted({i % 32 for i in kept} | {i % 32 + 32 for i in kept})


def test_an_nn_glu_ties_the_halves_of_the_layer_before_it():
    # Torch-Pruning took nn.GLU for an elementwise op, and the dry run left the conv before it
    # out; traced as the chunk and product it computes, the conv is cut in two slices.
    model = nn.Sequential(
        nn.Conv1d(4, 48, 3, padding=1),
        nn.GLU(dim=1),
        nn.Conv1d(24, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).eval()
    x = torch.randn(2, 4, 20)
    discovery = discover(model, x)
    assert {g.name: g.split for g in discovery.groups} == {"0": 2, "2": 1}
    for ratio in (0.1, 0.5, 0.9):
        pruned = apply_plan(model, x, _plan({"0": ratio}))
        assert pruned[0].out_channels == kept_channels(ratio, 48, 1, 2) == 2 * pruned[2].in_channels
        assert pruned(x).shape == (2, 3)


class _FrozenStem(nn.Module):
    """A frozen first layer, as a transfer-learning backbone is."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3)
        self.fc = nn.Linear(16, 3)
        self.stem.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.body(torch.relu(self.stem(x)))).mean((2, 3)))


def test_a_frozen_layer_is_pruned_and_stays_frozen():
    # Torch-Pruning traces through autograd: the frozen layer left no node and was left out as
    # "never run"; and a pruned weight came back a new, trainable Parameter.
    model, x = _FrozenStem().eval(), torch.randn(2, 3, 8, 8)
    found = discover(model, x, warn=False)
    assert set(found.names) == {"stem", "body"}
    pruned = apply_plan(model, x, uniform_plan(found, 0.5), discovery=found)
    assert pruned.stem.out_channels == 8
    assert {n: p.requires_grad for n, p in pruned.named_parameters()} == {
        "stem.weight": False,
        "stem.bias": False,
        "body.weight": True,
        "body.bias": True,
        "fc.weight": True,
        "fc.bias": True,
    }


def test_a_model_pruned_unstructured_before_is_made_permanent_then_pruned():
    # torch.nn.utils.prune's weight_orig and mask, recombined by a hook, hid every layer from
    # Torch-Pruning, and pruning failed with a bare "min() arg is an empty sequence".
    masked = odd_models.masked_digits({})  # as the task's own code leaves it
    with pytest.warns(UserWarning, match="masks made permanent"):
        task = build_task("tests.workers.odd_models:masked_digits")
    assert not [n for n, _ in task.model.named_parameters() if n.endswith("_orig")]
    x = task.example_inputs
    with torch.no_grad():
        assert torch.equal(task.model.eval()(x), masked.model.eval()(x))  # the same function
    found = discover(task.model, x, warn=False)
    pruned = apply_plan(task.model, x, uniform_plan(found, 0.5), discovery=found)
    assert pruned(x).shape == masked.model(x).shape
    assert sum(p.numel() for p in pruned.parameters()) < sum(
        p.numel() for p in task.model.parameters()
    )


def _kept_outputs(before: nn.Conv2d, after: nn.Conv2d) -> list[int]:
    """Which output channels of ``before`` ``after`` kept, by their weights."""
    return [
        i
        for i in range(before.out_channels)
        if any(torch.equal(w, before.weight[i]) for w in after.weight)
    ]


def _check_unread_and_saved(
    model: nn.Module,
    pruned: nn.Module,
    plan: PruningPlan,
    x: torch.Tensor,
    kept: list[int],
    tmp_path: Path,
) -> None:
    """Channel by channel, eval mode: the pruned model is the base with the cut channels of
    ``c1`` unread by ``c2``; and it saves and loads as it is."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.c2.weight[:, [i for i in range(model.c1.out_channels) if i not in kept]] = 0
    torch.testing.assert_close(pruned(x), reference(x))
    loaded, _ = load_pruned(
        save_pruned(pruned, plan, tmp_path / "m.safetensors", base_model=model),
        copy.deepcopy(model),
    )
    torch.testing.assert_close(loaded(x), pruned(x))


class _InstanceNormNet(nn.Module):
    """A conv whose InstanceNorm keeps running statistics (``track_running_stats``)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3), nn.InstanceNorm2d(16, track_running_stats=True)
        self.c2, self.fc = nn.Conv2d(16, 8, 3), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.n1(self.c1(x))))).mean((2, 3)))


def test_an_instancenorm_with_running_statistics_is_pruned_with_them(tmp_path):
    """Torch-Pruning cut its weights, not its statistics, and the model failed on its first
    call, so discovery had left the conv before it out."""
    torch.manual_seed(0)
    model, x = _InstanceNormNet(), torch.randn(4, 3, 12, 12)
    model.train()(x)  # running statistics of its own, not the initial 0 and 1
    model.eval()
    found = discover(model, x, warn=False)
    assert "c1" in found.names, found.excluded
    plan = _plan({"c1": 0.5})
    pruned = apply_plan(model, x, plan)
    assert pruned.n1.num_features == 8 and pruned.n1.running_mean.shape == (8,)
    kept = _kept_outputs(model.c1, pruned.c1)
    torch.testing.assert_close(pruned.n1.running_var, model.n1.running_var[kept])
    _check_unread_and_saved(model, pruned, plan, x, kept, tmp_path)
    pruned.train()(x)  # and it trains


class _OwnFrozenNorm(nn.Module):
    """A frozen batch norm of another library than torchvision's: its own class, the same
    buffers (detectron2's and timm's hold these, and detectron2's a num_features)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.num_features = n
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((n,), value))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class _FrozenNormNet(nn.Module):
    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3), norm(16)
        self.c2, self.fc = nn.Conv2d(16, 8, 3), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.n1(self.c1(x))))).mean((2, 3)))


@pytest.mark.parametrize("norm", [FrozenBatchNorm2d, _OwnFrozenNorm], ids=["torchvision", "own"])
def test_a_frozen_batchnorm_is_pruned_with_its_buffers(norm, tmp_path):
    """Its state is buffers, which Torch-Pruning does not see: they kept their width, the
    pruned model failed, and discovery left the conv before it out (a detection backbone had
    no groups at all). Now they are cut as every per-value buffer is (search_space/_buffers)."""
    torch.manual_seed(0)
    model, x = _FrozenNormNet(norm).eval(), torch.randn(4, 3, 12, 12)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(model.n1, name).uniform_(0.5, 1.5)  # a trained norm's state, channel by channel
    found = discover(model, x, warn=False)
    assert "c1" in found.names, found.excluded
    plan = _plan({"c1": 0.5})
    pruned = apply_plan(model, x, plan)
    kept = _kept_outputs(model.c1, pruned.c1)
    assert len(kept) == 8
    for name in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(pruned.n1, name), getattr(model.n1, name)[kept])
    _check_unread_and_saved(model, pruned, plan, x, kept, tmp_path)


class _Tagger(nn.Module):
    """A batch-first LSTM over embedded tokens and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.rnn = nn.LSTM(32, 64, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(128, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0][:, -1])


def test_a_recurrent_layer_counts_its_macs_per_sample_step_by_step():
    """Torch-Pruning took a batch-first input's time x features for batch x time: this model's
    MACs came out 32x the LSTM's."""
    torch.manual_seed(0)
    model = _Tagger().train()
    weights = sum(p.numel() for n, p in model.rnn.named_parameters() if n.startswith("weight"))
    want = 24 * weights + 128 * 5 + 5  # every weight matrix once a step; the head (its bias too)
    macs, params = count_macs_params(model, torch.randint(0, 50, (1, 24)))
    assert macs == want and params == sum(p.numel() for p in model.parameters())
    # Per sample, whatever the example's batch (Torch-Pruning counts a bias once a batch).
    macs, _ = count_macs_params(model, torch.randint(0, 50, (4, 24)))
    assert abs(macs - want) <= 5
    assert model.training and model.rnn.training  # the caller's model keeps its mode
