"""Depth: which modules are residual blocks a plan may drop, and how a drop is written down."""

from __future__ import annotations

import copy

import optuna
import pytest
import torch
import torchvision
from torch import nn

from search_space import (
    KNOWN_RESIDUALS,
    DroppableBlock,
    GroupProfile,
    LayerCost,
    Profile,
    PruningPlan,
    SearchSpace,
    anchor_params,
    discover,
    drop_blocks,
    dropped_modules,
    find_branches,
    fit_costs,
    residual_blocks,
    suggest_plan,
)

from ..nets import Encoder


def _blocks(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[str, ...]]:
    model.eval()
    return {b.name: b.groups for b in residual_blocks(model, x, discover(model, x))}


def test_torchvision_resnets_offer_their_identity_blocks_not_projections_nor_stages():
    found = _blocks(torchvision.models.resnet18(weights=None), torch.randn(1, 3, 64, 64))
    # The first block of stages 2-4 has a projection shortcut: x is not added back as it is.
    assert list(found) == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert found["layer2.1"] == ("layer2.1.conv1",)  # the one group wholly inside it


def test_mobilenet_v2_offers_the_inverted_residuals_that_add_their_input():
    model = torchvision.models.mobilenet_v2(weights=None)
    found = _blocks(model, torch.randn(1, 3, 64, 64))
    residual = [
        f"features.{i}"
        for i, m in enumerate(model.features)
        if getattr(m, "use_res_connect", False)
    ]
    assert list(found) == residual and len(residual) == 10
    assert all(len(groups) == 1 for groups in found.values())  # the expansion, with its depthwise


def test_a_vision_transformer_offers_each_encoder_block_not_the_stack_of_them():
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    found = _blocks(model, torch.randn(1, 3, 32, 32))
    # The stack is x + (every block's branches) too; dropping it would drop them all at once.
    assert list(found) == [f"encoder.layers.encoder_layer_{i}" for i in range(3)]


def test_torch_nn_pre_norm_encoder_layers_are_offered_and_drop_to_their_input():
    x = torch.randn(2, 5, 8)
    assert _blocks(Encoder(norm_first=False), x) == {}  # norm(x + f(x)): not a residual
    model = Encoder(norm_first=True).eval()
    found = _blocks(model, x)
    # Not the first: nn.TransformerEncoder reads ``layers[0].self_attn`` on every call, so a
    # plan dropping it broke every candidate (AttributeError in the screen).
    assert list(found) == ["encoder.layers.1", "encoder.layers.2"]
    with pytest.raises(AttributeError, match="self_attn"):
        drop_blocks(copy.deepcopy(model), ["encoder.layers.0"])(x)
    assert found["encoder.layers.1"] == ("encoder.layers.1.linear1",)
    layers = model.encoder.layers
    with torch.no_grad():
        skipped = model.head(layers[2](layers[0](model.embed(x))).mean(1))
        dropped = drop_blocks(copy.deepcopy(model), ["encoder.layers.1"])
        assert torch.allclose(dropped(x), skipped, atol=1e-5)
    torch.export.export(dropped, (x,))  # what MLflow logs: the dropped model exports
    assert KNOWN_RESIDUALS[nn.TransformerEncoderLayer](layers[0])  # a registry users extend


class _PreNorm(nn.Module):
    """A transformer-style block: two residual additions in a row, the second adding the first."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm, self.mix, self.mlp = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm(x))
        return x + torch.relu(self.mlp(x))


class _Branchy(nn.Module):
    """Residual, but only provably so by running it: its control flow depends on the data."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.f = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x) if x.sum() > -1e9 else x


def test_a_block_is_offered_only_when_tracing_proves_it_adds_its_input_back():
    model = nn.Sequential(
        nn.Linear(8, 16),
        _PreNorm(),
        nn.Sequential(nn.Linear(16, 16), nn.ReLU()),  # same shape, not residual
        _Branchy(),
        nn.Linear(16, 4),
    )
    assert list(_blocks(model, torch.randn(2, 8))) == ["1"]


def test_dropping_blocks_replaces_them_by_the_identity_outermost_first():
    model = nn.Sequential(nn.Linear(8, 16), nn.Sequential(_PreNorm(), _PreNorm()))
    drop_blocks(model, ["1.0", "1"])  # "1.0" lies inside "1", dropped already
    assert isinstance(model[1], nn.Identity)
    x = torch.randn(2, 8)
    assert torch.equal(model(x), model[0](x))


def test_a_plan_carries_its_dropped_blocks_and_a_plan_without_reads_as_before():
    plain = PruningPlan(ratios={"a": 0.3, "b": 0.3}, units={"a": ("a",), "b": ("b",)})
    assert "drop" not in plain.to_dict()  # digests of existing plans are unchanged
    dropped = PruningPlan(ratios=dict(plain.ratios), units=dict(plain.units), drop={"blk": ["b"]})
    assert PruningPlan.from_json(dropped.to_json()) == dropped != plain
    assert dropped.to_dict()["drop"] == {"blk": ["b"]}
    # A cost model sees the dropped block and its groups gone, the rest at their ratios.
    assert dropped.cost_ratios() == {"a": 0.3, "b": 1.0, "block:blk": 1.0}
    assert plain.cost_ratios() == {"a": 0.3, "b": 0.3}


def test_a_cost_model_counts_every_layer_of_a_dropped_block_gone_not_only_its_groups():
    # "blk.conv2" writes the residual stream (group "a"), so no group of its own says it is gone.
    groups = {g: GroupProfile(4, (1.0, 2.0, 3.0, 4.0)) for g in ("a", "b")}
    layers = (
        LayerCost("stem", 10.0, "a", None),
        LayerCost("blk.conv1", 10.0, "b", "a"),
        LayerCost("blk.conv2", 10.0, "a", "b"),
        LayerCost("blk.conv2:outputs", 1.0, "a", None),
    )
    block = DroppableBlock("blk", ("b",), 0.1)
    profile = Profile(groups, layers, blocks=(block,))
    plan = PruningPlan(ratios={"u": 0.5}, units={"u": ("a", "b")}, drop={"blk": ("b",)})
    assert profile.predict(plan.cost_ratios()) == pytest.approx(5.0)  # the stem at half width
    assert Profile(groups, layers).predict(plan.cost_ratios()) == pytest.approx(5.0 + 0.5)
    assert profile.predict({}) == Profile(groups, layers).predict({}) == pytest.approx(31.0)


def test_a_refitted_cost_model_learns_what_dropping_a_block_saves_beyond_its_layers():
    """Two blocks whose ops beyond their convs (norms, activations, dispatch) cost 0.8 and 0.3
    ms: timings of plans that drop them now and then are fitted to within a few per cent, and
    a block no three plans drop gets no overhead of its own (too little data)."""
    groups = {g: GroupProfile(8, tuple(range(1, 9))) for g in ("a", "b", "c")}
    layers = (
        LayerCost("stem", 100.0, "a", None),
        LayerCost("p.conv", 100.0, "b", "a"),
        LayerCost("q.conv", 100.0, "c", "a"),
    )
    blocks = (DroppableBlock("p", ("b",)), DroppableBlock("q", ("c",)), DroppableBlock("r", ()))
    profile = Profile(groups, layers, blocks=blocks)
    overhead = {"p": 0.8, "q": 0.3}

    def timing(ratios: dict[str, float], drop: set[str]) -> float:
        keep = {g: 1 - ratios[g] for g in groups}
        ms = 0.2 + 0.01 * 100 * keep["a"]
        for name, group in (("p", "b"), ("q", "c")):
            if name not in drop:
                ms += 0.01 * 100 * keep[group] * keep["a"] + overhead[name]
        return ms

    plans, ms = [], []
    for i in range(24):
        drop = {n for n, k in (("p", 2), ("q", 3)) if i % k == 0} | ({"r"} if i == 0 else set())
        r = {g: (i * (3 + j)) % 7 / 10 for j, g in enumerate(groups)}
        plans.append(
            {
                **r,
                **{g: 1.0 for n in drop for g in dict(blocks_of(blocks))[n]},
                **{f"block:{n}": 1.0 for n in drop},
            }
        )
        ms.append(timing(r, drop))
    fitted = fit_costs(profile, plans, ms)
    extra = {x.name: x.cost for x in fitted.layers if x.name.endswith(":overhead")}
    assert set(extra) == {"p:overhead", "q:overhead"}  # "r": dropped once only
    assert extra["p:overhead"] == pytest.approx(0.8, abs=0.15)
    assert extra["q:overhead"] == pytest.approx(0.3, abs=0.15)
    for plan, want in zip(plans, ms, strict=True):
        assert fitted.predict(plan) == pytest.approx(want, rel=0.05)
    # Refitting a fitted profile fits its overheads anew, not on top of the old ones.
    again = fit_costs(fitted, plans, ms)
    assert sum(x.name.endswith(":overhead") for x in again.layers) == 2
    assert Profile.from_dict(again.to_dict()).predict(plans[1]) == pytest.approx(ms[1], rel=0.05)


def blocks_of(blocks: tuple[DroppableBlock, ...]) -> list[tuple[str, tuple[str, ...]]]:
    return [(b.name, b.groups) for b in blocks]


def _profile(blocks: tuple[DroppableBlock, ...]) -> Profile:
    groups = {g: GroupProfile(4, (1.0, 2.0, 3.0, 4.0)) for g in ("a", "b", "c")}
    layers = tuple(LayerCost(g, 10.0, g, None) for g in groups)
    return Profile(groups, layers, blocks=blocks)


class _Discovery:
    names = ("a", "b", "c")


BLOCKS = (
    DroppableBlock("x", ("b",), 0.01),
    DroppableBlock("y", ("c",), 0.2),
    DroppableBlock("z", (), 0.5),
)


@pytest.mark.parametrize("cap", [0, 2, None])
def test_the_space_samples_how_many_of_the_least_damaging_blocks_go(cap):
    space = SearchSpace(depth=cap, ratio=(0.0, 0.5))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        plan = suggest_plan(trial, space, _Discovery(), _profile(BLOCKS))
        seen.add(tuple(plan.drop))
        assert ("alloc/depth" in trial.params) == (cap != 0)
    # The cap holds (None: every block), and blocks go in the profile's order: least damage first.
    orders = [(), ("x",), ("x", "y"), ("x", "y", "z")]
    assert seen == set(orders[: 4 if cap is None else cap + 1])
    if cap:
        study.enqueue_trial({"alloc/depth": 1})
        plan = suggest_plan(study.ask(), space, _Discovery(), _profile(BLOCKS))
        assert plan.drop == {"x": ("b",)}
        assert all(p["alloc/depth"] == 0 for p in anchor_params(space, _Discovery(), 3))


def test_a_profile_keeps_its_blocks_through_json_and_a_cost_fit():
    profile = _profile(BLOCKS)
    again = Profile.from_dict(profile.to_dict())
    assert again.blocks == BLOCKS and "blocks" not in _profile(()).to_dict()
    fitted = fit_costs(profile, [{"a": 0.0}, {"a": 0.5}, {"b": 0.5}, {}], [4.0, 3.0, 3.0, 4.0])
    assert fitted.unit == "ms" and fitted.blocks == BLOCKS


class _Inline(nn.Module):
    """Residuals written in the parent's own forward, as hand-written models often are: a
    squeeze-and-excitation branch and an attention branch, neither a module of its own."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, d, 3, padding=1)
        self.dw = nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.pw = nn.Conv2d(d, d, 1)
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(d, 4, 1), nn.ReLU(), nn.Conv2d(4, d, 1), nn.Sigmoid()
        )
        self.attn = nn.MultiheadAttention(d, num_heads=2, batch_first=True)
        self.fc = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.pw(self.dw(x))
        x = torch.relu(x + y * self.se(y))
        tokens = x.flatten(2).transpose(1, 2)
        attended, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.fc((tokens + attended).mean(dim=1))


def test_residual_branches_in_a_parents_forward_are_offered_and_drop_to_the_stream():
    model, x = _Inline().eval(), torch.randn(2, 1, 6, 6)
    found = _blocks(model, x)
    assert found == {"branch::dw+pw+se": ("se.1",), "branch::attn": ()}
    dropped = drop_blocks(copy.deepcopy(model), list(found))
    # What is left computes the streams alone, and the branches' tensors are gone.
    with torch.no_grad():
        tokens = torch.relu(model.stem(x)).flatten(2).transpose(1, 2)
        assert torch.allclose(dropped(x), model.fc(tokens.mean(dim=1)))
    assert all(isinstance(getattr(dropped, n), nn.Identity) for n in ("dw", "pw", "se", "attn"))
    assert sum(p.numel() for p in dropped.parameters()) < sum(p.numel() for p in model.parameters())
    # The rewrite is the instance's: the model it was copied from, and copies of it, keep theirs.
    again = copy.deepcopy(dropped)
    with torch.no_grad():
        assert torch.equal(again(x), dropped(x)) and model(x).shape == dropped(x).shape
    assert dropped_modules(found) == {"dw", "pw", "se", "attn"}


class _NotBranches(nn.Module):
    """Additions that are not droppable branches: a broadcast one, one whose branch is read
    elsewhere, one reading a second input, and one whose module is called twice."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a, self.b, self.c, self.e = (nn.Linear(d, d) for _ in range(4))
        self.g = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = x + self.g(x)  # (n, 1) broadcast onto (n, d): not a residual of the same shape
        u = self.a(x)
        x = x + u + u.sum()  # u is read twice; the first addition's branch escapes
        x = x + self.b(x + z)  # reads z, another input
        x = x + self.c(x)
        return x + self.c(x) + self.e(z)  # c is called twice


def test_additions_that_are_not_clean_branches_are_not_offered():
    model = nn.Sequential()  # a container: its own forward holds nothing of the user's
    inner = _NotBranches().eval()
    x, z = torch.randn(2, 8), torch.randn(2, 8)
    assert find_branches(inner, (x, z)) == []
    assert find_branches(model.append(nn.Linear(8, 8)), x) == []


class _Chained(nn.Module):
    """Two branches in a row in one forward, the second adding onto the first's sum: one with a
    layer scale (a parameter of the parent), one written in place."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 3)
        self.gamma = nn.Parameter(torch.full((16,), 0.1))
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.f = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = x + self.gamma * self.mlp(x)
        x += self.f(x)
        return self.out(x)


def test_chained_branches_of_one_forward_drop_alone_or_together_in_any_order():
    model, x = _Chained().eval(), torch.randn(2, 8)
    names = list(_blocks(model, x))
    assert names == ["branch::mlp", "branch::f"]
    with torch.no_grad():
        h = model.inp(x)
        after_mlp = h + model.gamma * model.mlp(h)
        expected = {
            ("branch::mlp",): model.out(h + model.f(h)),
            ("branch::f",): model.out(after_mlp),
            ("branch::f", "branch::mlp"): model.out(h),
        }
        for drop, want in expected.items():
            assert torch.allclose(drop_blocks(copy.deepcopy(model), drop)(x), want, atol=1e-6)
