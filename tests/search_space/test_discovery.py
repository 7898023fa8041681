from __future__ import annotations

import copy
import re

import pytest
import torch
import torch_pruning as tp
from torch import nn

from search_space import (
    DiscoveryError,
    PruningPlan,
    Setup,
    architecture_signature,
    discover,
    uniform_plan,
)
from workers import apply_plan

from ..nets import GainedDense


def test_digits_groups_are_named_and_the_head_is_left_out(digits_task, digits_discovery):
    names = set(digits_discovery.names)
    assert "stem.0" in names and "layer1.0.conv1" in names
    assert "fc" not in names
    assert digits_discovery.output_layers == ("fc",)
    assert any(e.name == "fc" and "output layer" in e.reason for e in digits_discovery.excluded)
    # Channels are the root layer's outputs.
    assert digits_discovery.group("stem.0").channels == digits_task.model.stem[0].out_channels


def test_discovery_is_deterministic(digits_task, digits_discovery):
    again = discover(digits_task.model, digits_task.example_inputs)
    assert again == digits_discovery


def test_exclude_patterns_leave_layers_out(digits_task):
    d = discover(digits_task.model, digits_task.example_inputs, exclude=["layer1.*"])
    assert not any(n.startswith("layer1.") for n in d.names)
    assert any(e.reason == "excluded by pattern" for e in d.excluded)


def test_a_pattern_matching_nothing_is_an_error(digits_task):
    with pytest.raises(ValueError, match="'nope.*' matches no layer"):
        discover(digits_task.model, digits_task.example_inputs, exclude=["nope.*"])


def test_wrong_example_inputs_name_the_model(digits_task):
    with pytest.raises(DiscoveryError, match="DigitsNet"):
        discover(digits_task.model, torch.randn(1, 3, 32, 32))


def test_output_layer_found_when_it_is_not_called_fc():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    model(torch.randn(1, 3, 8, 8))
    d = discover(model, torch.randn(1, 3, 8, 8))
    assert d.output_layers == ("3",)
    assert d.names == ("0",)


def test_signature_depends_on_shapes_not_weights(digits_task):
    import copy

    other = copy.deepcopy(digits_task.model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    assert architecture_signature(other) == architecture_signature(digits_task.model)
    other.fc = nn.Linear(other.fc.in_features, 11)
    assert architecture_signature(other) != architecture_signature(digits_task.model)


class _Recurrent(nn.Module):
    """Token ids through an embedding and an LSTM, then two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.fc2(torch.relu(self.fc1(out[:, -1])))


def test_a_recurrent_layer_and_an_embedding_are_groups():
    found = discover(_Recurrent(), torch.randint(0, 50, (2, 7)), verify=False, warn=False)
    # The LSTM's hidden units (see test_recurrent); the embedding's width, with the LSTM's
    # inputs (see test_embedding).
    assert set(found.names) == {"embed", "fc1", "lstm"}
    assert found.group("embed").members == ("embed", "lstm")
    assert {e.name for e in found.excluded} == {"fc2"}


class _UNet(nn.Module):
    """An encoder, a transposed convolution that upsamples, and a skip concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.deep = nn.Sequential(
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.fuse = nn.Conv2d(32, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down(x)
        return self.out(torch.relu(self.fuse(torch.cat([self.up(self.deep(skip)), skip], 1))))


def test_a_transposed_convolution_roots_a_group_pruned_exactly():
    """A decoder's upsampling ConvTranspose2d is pruned by its output channels like a Conv2d:
    the pruned model computes what the model computes when its consumer reads nothing of the
    removed channels."""
    torch.manual_seed(0)
    model, x = _UNet().eval(), torch.randn(2, 3, 8, 8)
    found = discover(model, x, verify=False, warn=False)
    assert {"up": ("fuse", "up")}.items() <= {g.name: g.members for g in found.groups}.items()
    removed = [0, 3, 5]
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.fuse.weight[:, removed] = 0  # the upsampled half of the concatenation comes first
    setup = Setup.of(model)
    graph = setup.build_graph(x)
    graph.get_pruning_group(model.up, tp.prune_conv_out_channels, idxs=removed).prune()
    assert model.up.out_channels == 13 and model.fuse.in_channels == 29
    torch.testing.assert_close(model(x), masked(x))


class _GroupedUpsampling(nn.Module):
    """A grouped ConvTranspose2d, which Torch-Pruning cannot rank (its importance indexes past
    the weight), between a conv before it and a plain conv after it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(32, 32, 2, stride=2, groups=4)
        self.c2 = nn.Conv2d(32, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.c2(torch.relu(self.up(torch.relu(self.c1(x)))))))


def test_a_group_that_breaks_the_model_is_left_out_alone():
    # The dry run of one group used to rank every other group too, so the grouped
    # ConvTranspose's failure was charged to the plain conv after it, which prunes cleanly.
    found = discover(_GroupedUpsampling().eval(), torch.randn(2, 3, 8, 8), warn=False)
    assert found.names == ("c2",)
    reasons = {e.name: e.reason for e in found.excluded}
    assert reasons["up"].startswith("pruning it breaks the model")
    assert reasons["c1"].startswith("pruning it breaks the model")  # its group holds up's input


class _Bilinear(nn.Module):
    """nn.Bilinear reads two Linear layers' outputs; Torch-Pruning takes it for an elementwise
    op and ties the two into one group, which cannot be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(16, 24)
        self.bil, self.fc = nn.Bilinear(32, 24, 20), nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bil(torch.relu(self.a(x)), torch.relu(self.b(x)))))


def test_every_layer_of_a_group_left_out_is_listed_with_why():
    # Only the group's root was listed; its other layer was in no group and no list.
    with pytest.warns(UserWarning, match="no prunable groups"):
        found = discover(_Bilinear().eval(), torch.randn(2, 16), warn=False)
    assert found.names == ()
    reasons = {e.name: e.reason for e in found.excluded}
    (root,) = {"a", "b"} - {n for n, r in reasons.items() if r.startswith("pruned only with")}
    # The bilinear product mixes every channel of both into each output: the route check says so.
    assert reasons[root].startswith("its channels reach 'fc' elsewhere than Torch-Pruning maps")
    assert (
        reasons[({"a", "b"} - {root}).pop()]
        == f"pruned only with {root!r}, which is left out (see it)"
    )


class _Movers(nn.Module):
    """Two ops that move channels, a ChannelShuffle and a pixel_shuffle (functional), then an
    nn.GLU, which only ties its input's halves."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 1)
        self.shuffle = nn.ChannelShuffle(4)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(16, 32, 3, padding=1)
        self.glu = nn.GLU(dim=1)
        self.c4 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pixel_shuffle(self.c2(self.shuffle(torch.relu(self.c1(x)))), 2)
        return self.fc(torch.relu(self.c4(self.glu(self.c3(x)))).mean((2, 3)))


def test_a_group_through_an_op_that_moves_channels_is_left_out_with_the_op_named():
    # Torch-Pruning maps such an op's channel i to channel i: the ChannelShuffle's group was
    # pruned into a model that ran and read the wrong channels; pixel_shuffle's broke in the dry
    # run, and so did nn.GLU's, now traced as the chunk and product it computes: two slices.
    found = discover(_Movers().eval(), torch.randn(2, 3, 8, 8), warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    assert "channel_shuffle" in reasons["c1"]
    assert "pixel_shuffle" in reasons["c2"]
    assert {g.name: g.split for g in found.groups} == {"c3": 2, "c4": 1}


class _Multiplier(nn.Module):
    """A depthwise conv with a channel multiplier (each input channel read into 2 outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.b, self.fc = nn.Conv2d(16, 16, 1), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(torch.relu(self.bn(self.a(x))))
        return self.fc(torch.relu(self.b(x)).mean((2, 3)))


def test_the_layer_before_a_depthwise_conv_with_a_channel_multiplier_is_left_out_saying_so():
    # Torch-Pruning maps the depthwise conv's input channel i to output i, not to the two it
    # makes: the pruned model failed with a bare IndexError, which was all the reason said.
    found = discover(_Multiplier().eval(), torch.randn(2, 3, 8, 8), warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    assert "'dw', a depthwise conv with a channel multiplier (2 outputs" in reasons["a"]
    assert {g.name for g in found.groups} == {"dw", "b"}  # its own outputs still are


class _CBAM(nn.Module):
    """CBAM's spatial attention, a one-channel map from the channels' mean and max (written as
    its reference code writes it), then a gate per sample from a Linear on the pooled map."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.att, self.gate = nn.Conv2d(2, 1, 7, padding=3), nn.Linear(16, 1)
        self.b, self.fc = nn.Conv2d(16, 24, 3, padding=1), nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.a(x)))
        pooled = torch.cat([torch.mean(x, dim=1, keepdim=True), torch.max(x, 1, True)[0]], 1)
        x = x * torch.sigmoid(self.att(pooled))
        x = torch.sigmoid(self.gate(x.mean((2, 3))))[:, :, None, None] * x
        return self.fc(torch.relu(self.b(x)).mean((2, 3)))


def test_a_layer_scaled_by_a_one_channel_map_is_pruned_and_the_map_is_left_whole():
    # Torch-Pruning took the pooling over channels and the products for element-wise ops and
    # tied the 16 channels of "a" to the one channel of "att" and "gate": "a" was left out
    # ("pruned only with 'att'"). One channel made from, or broadcast over, sixteen has no
    # channel to keep in step: the trace does not link them, and the gate's Linear, which
    # reads a's pooled channels, is cut with "a".
    model, x = _CBAM().eval(), torch.randn(2, 3, 8, 8)
    found = discover(model, x, warn=False)
    assert {g.name for g in found.groups} == {"a", "b"}
    assert set(found.group("a").members) == {"a", "bn", "b", "gate"}
    reasons = {e.name: e.reason for e in found.excluded}
    assert reasons["att"] == reasons["gate"] == "only 1 output channel(s)"
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert (pruned.a.out_channels, pruned.b.in_channels, pruned.gate.in_features) == (8, 8, 8)
    assert (pruned.att.in_channels, pruned.att.out_channels) == (2, 1)
    assert pruned(x).shape == (2, 4)


# A feature map divided by, or scaled by, a one-channel pooling of itself.
POOLED_SCALES = {
    "norm": lambda x: x / x.norm(dim=1, keepdim=True),
    "softmax-weighted": lambda x: x * x.softmax(1),
    "sum": lambda x: x / (x.sum(1, keepdim=True) + 1),
    # Poolings search_space does not list: Torch-Pruning ties their one channel to x's.
    "quantile": lambda x: x / (x.quantile(0.5, dim=1, keepdim=True).abs() + 1),
    "einsum": lambda x: x * torch.einsum("bchw->bhw", x).unsqueeze(1).sigmoid(),
}


class _PooledScale(nn.Module):
    def __init__(self, scale) -> None:
        super().__init__()
        self.scale = scale
        self.a, self.b, self.fc = (
            nn.Conv2d(3, 16, 3, padding=1),
            nn.Conv2d(16, 24, 3),
            nn.Linear(24, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.b(self.scale(torch.relu(self.a(x))))).mean((2, 3)))


@pytest.mark.parametrize("kind", sorted(POOLED_SCALES))
def test_a_layer_scaled_by_a_pooling_of_itself_is_pruned(kind):
    # The one-channel map is cut from the trace, and kept as a 0-d output so that what made it
    # is traced: as a one-channel output it made Torch-Pruning leave the conv's group whole,
    # silently, where the pooling was one this module does not list (quantile, einsum).
    model, x = _PooledScale(POOLED_SCALES[kind]).eval(), torch.randn(2, 3, 8, 8)
    found = discover(model, x, warn=False)
    assert {g.name for g in found.groups} == {"a", "b"}
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert (pruned.a.out_channels, pruned.b.in_channels) == (8, 8)
    assert pruned(x).shape == (2, 4)


class _NormedAcross(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.a, self.norm = nn.Conv2d(3, 16, 3, padding=1), norm
        self.b, self.fc = nn.Conv2d(16, 24, 3, padding=1), nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.b(torch.relu(self.norm(self.a(x))))).mean((2, 3)))


class _TokensNormed(nn.Module):
    """A LayerNorm over (tokens, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.fc = nn.Linear(8, 32), nn.LayerNorm([6, 32]), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.a(x))).mean(1))


def test_a_layer_normalised_with_other_dims_by_a_layernorm_is_left_out_saying_so():
    # Torch-Pruning prunes a LayerNorm over one dim only: over (C, H, W) the dry run failed
    # with "Index tensor must have the same number of dimensions as src tensor", over
    # (tokens, features) with "IndexError: index 6 is out of bounds", all the reason said.
    x = torch.randn(2, 3, 8, 8)
    found = discover(_NormedAcross(nn.LayerNorm([16, 8, 8])).eval(), x, warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    assert "'norm', a LayerNorm over (16, 8, 8): Torch-Pruning prunes" in reasons["a"]
    with pytest.warns(UserWarning, match="no prunable groups"):
        found = discover(_TokensNormed().eval(), torch.randn(2, 6, 8), warn=False)
    assert "a LayerNorm over (6, 32)" in {e.name: e.reason for e in found.excluded}["a"]
    # The way out the reason names is pruned.
    found = discover(_NormedAcross(nn.GroupNorm(1, 16)).eval(), x, warn=False)
    assert {g.name for g in found.groups} == {"a", "b"}


def _space_to_depth(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape  # written by hand, as detection models do: view, permute, reshape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


# Ops Torch-Pruning takes for element-wise (or maps by shape alone) that move channel i elsewhere.
MOVED = {
    "roll": (lambda x: torch.roll(x, 1, dims=1), 1),
    "flip": (lambda x: torch.flip(x, dims=(1,)), 1),
    "index": (lambda x: x[:, torch.arange(x.shape[1] - 1, -1, -1)], 1),
}


class _Moved(nn.Module):
    def __init__(self, move, widen: int) -> None:
        super().__init__()
        self.move = move
        self.a, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.b, self.fc = nn.Conv2d(16 * widen, 24, 3, padding=1), nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.move(torch.relu(self.bn(self.a(x))))
        return self.fc(torch.relu(self.b(x)).mean((2, 3)))


@pytest.mark.parametrize("op", sorted(MOVED))
def test_a_group_whose_channels_an_op_moves_is_left_out_naming_the_reader(op):
    # With a roll or a flip the group was pruned into a model that ran, with the right shapes,
    # and read the wrong channels; the others broke in the dry run with an IndexError. Found by
    # where a perturbed channel arrives, whatever the op, not by a list of ops.
    move, widen = MOVED[op]
    found = discover(_Moved(move, widen).eval(), torch.randn(2, 3, 8, 8), warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    assert reasons["a"].startswith("its channels reach 'b' elsewhere than Torch-Pruning maps")
    assert found.names == ("b",)


def test_a_hand_written_space_to_depth_is_pruned_four_inputs_a_channel():
    # Channel i lands on the reader's inputs 4i..4i+3. Torch-Pruning gave both reshapes a
    # flatten map by 4 (the view to 6-D keeps the channels in dim 1), so channel i was mapped
    # to 16i.. and the group was left out as misrouted; mapped only where the sizes the trace
    # saw fold dims into dim 1 by that stride (the second reshape), it is right.
    torch.manual_seed(0)
    model, x = _Moved(_space_to_depth, 4).eval(), torch.randn(2, 3, 8, 8)
    found = discover(model, x, warn=False)
    assert found.names == ("b", "a") and found.group("a").members == ("a", "b", "bn")
    pruned = apply_plan(model, x, PruningPlan(ratios={"a": 0.5}, units={"a": ("a",)}))
    rows, kept_rows = model.a.weight.flatten(1), pruned.a.weight.flatten(1)
    kept = [i for i in range(16) if any(torch.equal(rows[i], r) for r in kept_rows)]
    assert len(kept) == 8 and pruned.b.in_channels == 32
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for i in set(range(16)) - set(kept):
            reference.b.weight[:, 4 * i : 4 * i + 4] = 0
    torch.testing.assert_close(pruned(x), reference(x))


class _RoutedRight(nn.Module):
    """Channels that reach their readers where Torch-Pruning maps them: through a concat, a
    residual sum whose BatchNorm starts at zero (nothing arrives there: no verdict), a
    sequence-first transformer layer (its rows are not the batch: no verdict)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.c, self.bn = nn.Conv2d(14, 14, 3, padding=1), nn.BatchNorm2d(14)
        nn.init.zeros_(self.bn.weight)
        self.enc = nn.TransformerEncoderLayer(14, 2, 16, dropout=0.0)
        self.fc = nn.Linear(14, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        y = y + self.bn(self.c(y))
        return self.fc(self.enc(y.flatten(2).permute(2, 0, 1)).mean(0))


class _Flattened(nn.Module):
    """A flatten into a Linear: each channel arrives at its 16 features, as mapped."""

    def __init__(self) -> None:
        super().__init__()
        self.d, self.flat = nn.Conv2d(3, 5, 3, padding=1), nn.Linear(5 * 16, 12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.flat(torch.relu(self.d(x)).flatten(1))))


def test_channels_that_arrive_where_they_are_mapped_keep_their_groups():
    found = discover(_RoutedRight().eval(), torch.randn(2, 3, 4, 4), warn=False)
    flat = discover(_Flattened().eval(), torch.randn(2, 3, 4, 4), warn=False)
    reasons = {e.name: e.reason for e in (*found.excluded, *flat.excluded)}
    assert not [r for r in reasons.values() if "elsewhere than Torch-Pruning" in r], reasons
    assert {"enc.linear1"} <= set(found.names), reasons
    assert {"a", "b", "c"} <= {m for g in found.groups for m in g.members}, reasons
    assert set(flat.names) == {"d", "flat"}, reasons


class _C2f(nn.Module):
    """YOLOv8's C2f: a conv's output chunked in two, the second chunk read by a residual
    bottleneck and by the concatenation, with the bottleneck's output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.cv1 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.m1, self.m2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.cv2, self.fc = nn.Conv2d(24, 16, 1), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.cv1(torch.relu(self.stem(x)))).chunk(2, 1)
        c = b + self.m2(torch.relu(self.m1(b)))
        return self.fc(torch.relu(self.cv2(torch.cat([a, b, c], 1))).mean((2, 3)))


def test_a_chunk_read_twice_traces_and_its_misrouted_groups_are_left_out():
    # The chunks' real sizes, given to Torch-Pruning per reader, failed the whole trace with an
    # IndexError where a chunk has two readers; its own guess stands there, and the route check
    # leaves out what the guess gets wrong.
    found = discover(_C2f().eval(), torch.randn(2, 3, 8, 8), warn=False)
    assert {"stem", "m1", "cv2"} <= set(found.names)
    reasons = {e.name: e.reason for e in found.excluded}
    assert all(
        r.startswith(("its channels reach", "pruned only with", "output layer"))
        or r.startswith("pruning it breaks")
        for r in reasons.values()
    ), reasons


class _OneChannelSum(nn.Module):
    """Two one-channel convs added: one group, too narrow to prune, of two root layers."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 1, 3, padding=1), nn.Conv2d(3, 1, 3, padding=1)
        self.bn, self.fc = nn.BatchNorm2d(1), nn.Linear(1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.c1(x) + self.c2(x))).mean((2, 3)))


def test_the_layers_of_a_group_too_narrow_to_prune_are_listed_too():
    with pytest.warns(UserWarning, match="no prunable groups"):
        found = discover(_OneChannelSum().eval(), torch.randn(2, 3, 8, 8), warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    root = next(n for n, r in reasons.items() if r == "only 1 output channel(s)")
    other = ({"c1", "c2"} - {root}).pop()
    assert reasons[other] == f"pruned only with {root!r}, which is left out (see it)"
    assert "bn" not in reasons  # only layers a group is rooted at are listed


def test_a_group_cut_in_slices_of_one_channel_is_left_out_saying_so():
    # GroupNorm(16, 16) (wav2vec's first norm) cuts its conv in 16 slices of one channel, each
    # keeping one: the group was listed, searched, and never pruned.
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.GroupNorm(16, 16), nn.Conv2d(16, 8, 3), nn.GroupNorm(4, 8)
    )
    model = nn.Sequential(model, nn.Flatten(), nn.LazyLinear(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    model(x)
    found = discover(model, x, warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    assert reasons["0.0"].startswith("its 16 channels are cut in 16 equal slices")
    assert found.group("0.2").split == 4


class _MaxOut(nn.Module):
    """A maxout: the conv's channels in neighbouring pairs, each pair's larger kept."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c2, self.c3 = nn.Conv2d(16, 24, 3, padding=1), nn.Conv2d(24, 24, 3, padding=1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.c1(x))
        b, c, height, width = h.shape
        h = h.view(b, c // 2, 2, height, width).amax(2)
        return self.fc(torch.relu(self.c3(torch.relu(self.c2(h)))).mean((2, 3)))


def test_a_group_torch_pruning_cuts_otherwise_than_planned_is_left_out_saying_so():
    # Torch-Pruning cuts a maxout conv's channels with their pair partners: the listed group's
    # 0.25 plan kept 20 of 32 (and set the reader's in_channels to 8 with 10 inputs in its
    # weight), its 0.5 plan kept all 32. Discovery's dry run now checks what each group kept.
    model, x = _MaxOut().eval(), torch.randn(2, 3, 8, 8)
    found = discover(model, x, warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    assert re.match(
        # The dry run's ratio (0.25, or another where groups are as wide), what it keeps, and
        # what Torch-Pruning kept: as the pairs fall in the ranking.
        r"Torch-Pruning does not cut it as planned: a 0\.\d+ plan keeps (\d+) of its 32 "
        r"channels, Torch-Pruning kept (?!\1)\d+",
        reasons["c1"],
    )
    assert "(it cuts channel 0 with channel(s) [1] of the same layer: " in reasons["c1"]
    assert sorted(found.names) == ["c2", "c3"]
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert (pruned.c1.out_channels, pruned.c2.in_channels) == (32, 16)
    assert (pruned.c2.out_channels, pruned.c3.out_channels) == (12, 12)
    assert pruned(x).shape == (2, 10)


class _MixerBlock(nn.Module):
    """An MLP-Mixer block: a token-mixing MLP (over the tokens, through a transpose) and a
    channel MLP, each added to the stream."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.t1, self.t2 = nn.Linear(tokens, 2 * tokens), nn.Linear(2 * tokens, tokens)
        self.c1, self.c2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.t2(torch.nn.functional.gelu(self.t1(self.n1(x).transpose(1, 2))))
        x = x + mixed.transpose(1, 2)
        return x + self.c2(torch.nn.functional.gelu(self.c1(self.n2(x))))


def test_a_stream_tied_to_layers_of_another_width_is_left_out_saying_so():
    # Torch-Pruning ties the token-mixing output (16 tokens) to the stream (32 channels): the
    # dry run failed with a bare "IndexError: index 16 is out of bounds".
    patch = nn.Conv2d(3, 32, 4, 4)
    blocks = nn.Sequential(_MixerBlock(16, 32), _MixerBlock(16, 32))
    model = nn.Sequential(
        patch, nn.Flatten(2), _Transposed(), blocks, _MeanTokens(), nn.Linear(32, 5)
    )
    x = torch.randn(2, 3, 16, 16)
    found = discover(model.eval(), x, warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    (stream,) = [r for r in reasons.values() if r.startswith("pruning it breaks the model")]
    assert "Torch-Pruning ties layers of different widths into it" in stream
    assert "token-mixing MLP's transpose" in stream
    assert {"3.0.t1", "3.1.t1", "3.0.c1", "3.1.c1"} <= set(found.names)  # the MLPs' widths
    assert apply_plan(model, x, uniform_plan(found, 0.5))(x).shape == (2, 5)


class _Transposed(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class _MeanTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


class _Segmenter(nn.Module):
    """As torchvision's FCN: a backbone, a head and an auxiliary head, each upsampled to the
    input's size and returned in a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 24, 3, 2, 1)
        )
        self.head = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 5, 1))
        self.aux = nn.Sequential(nn.Conv2d(24, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone(x)
        up = {"size": x.shape[-2:], "mode": "bilinear", "align_corners": False}
        out = nn.functional.interpolate(self.head(f), **up)
        return {"out": out, "aux": nn.functional.interpolate(self.aux(f), **up)}


def test_every_output_layer_is_found_through_what_follows_it():
    # Both heads' logits are upsampled: only the layer run last was taken for the output layer,
    # and the main head's was searched as a group that the dry run then left out ("pruning it
    # changes the output shapes").
    model, x = _Segmenter().eval(), torch.randn(1, 3, 16, 16)
    found = discover(model, x, warn=False)
    assert set(found.output_layers) == {"head.2", "aux.2"}
    reasons = {e.name: e.reason for e in found.excluded}
    assert (
        reasons["head.2"]
        == reasons["aux.2"]
        == "output layer: its channels are the model's outputs"
    )
    assert {"backbone.0", "backbone.2", "head.0", "aux.0"} <= set(found.names)


class _GatedBlock(nn.Module):
    """WaveNet's: a dilated conv gated in halves, a residual and a skip output."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dil = nn.Conv1d(width, 2 * width, 2, padding=1)
        self.res, self.skip = nn.Conv1d(width, width, 1), nn.Conv1d(width, width, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.dil(x)[:, :, : x.shape[-1]].chunk(2, 1)
        z = torch.tanh(a) * torch.sigmoid(b)
        return x + self.res(z), self.skip(z)


class _WaveNet(nn.Module):
    """The last block's residual output is read by nothing, as in WaveNet's code."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Conv1d(1, 16, 1), nn.Conv1d(16, 8, 1)
        self.blocks = nn.ModuleList([_GatedBlock(16), _GatedBlock(16)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, skips = self.inp(x), 0
        for block in self.blocks:
            h, skip = block(h)
            skips = skips + skip
        return self.out(torch.relu(skips)).mean(-1)


def test_a_layer_whose_output_nothing_reads_has_its_inputs_cut_with_its_group():
    # Torch-Pruning traces back from the outputs and never saw the last block's residual conv:
    # the gated conv feeding it was cut with that conv's inputs left whole, and the dry run
    # left it out ("expected input[2, 12, 30] to have 16 channels, but got 12").
    model, x = _WaveNet().eval(), torch.randn(2, 1, 30)
    found = discover(model, x, warn=False)
    assert found.group("blocks.1.dil").split == 2
    assert "blocks.1.res" in found.group("blocks.1.dil").members
    assert {"inp", "blocks.0.dil"} <= set(found.names)
    # The residual sum nothing reads ties the last res conv's outputs to the stream: it was a
    # group of its own, and a plan cutting it unlike the stream failed ("size of tensor a (8)
    # must match ... (16)"); the dry run cut both alike and missed it.
    assert "blocks.1.res" in found.group("inp").members
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert pruned.blocks[1].dil.out_channels == 16 and pruned.blocks[1].res.in_channels == 8
    assert pruned(x).shape == (2, 8)


class _Cache:
    """A language model's key/value cache: no tensor, no container Torch-Pruning knows, but
    iterable, yielding a (key, value) pair per layer."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.pairs = pairs

    def __iter__(self):  # noqa: ANN204
        return iter(self.pairs)


class _CachingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k, self.v = nn.Linear(8, 16), nn.Linear(8, 16)
        self.mix, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> dict:
        k, v = self.k(x), self.v(x)
        logits = self.head(torch.relu(self.mix(k * v)))
        return {"logits": logits, "cache": _Cache([(k, v)]), "hidden": (None, (logits,))}


def test_an_output_holding_a_cache_object_is_traced_through_its_tensors():
    # Torch-Pruning took the cache for a list of tensors and failed on its pairs: "'tuple'
    # object has no attribute 'grad_fn'" (GPT-2 with use_cache on): no search at all.
    model, x = _CachingNet().eval(), torch.randn(4, 8)
    found = discover(model, x, warn=False)
    assert {"k", "mix"} <= set(found.names)
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert pruned.mix.out_features == 8 and pruned(x)["logits"].shape == (4, 3)


class _HandDense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.head = nn.Linear(8, 16), GainedDense(16, 24), nn.Linear(24, 3)
        self.scale = nn.Parameter(torch.ones(16))  # no product: pruned with inp's group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(torch.relu(self.inp(x)) * self.scale)))


def test_a_hand_written_dense_layer_is_listed_with_why_it_is_not_searched():
    # Torch-Pruning has no pruner for it, so its width roots no group; discovery named none
    # of GPT-2's twelve such layers (plain dense layers, now pruned), only "no prunable
    # groups".
    found = discover(_HandDense().eval(), torch.randn(4, 8), warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    assert reasons["mid"].startswith(
        "GainedDense: multiplies its inputs by its own weight 'weight'"
    )
    assert "nn.Linear" in reasons["mid"]
    assert not any(n.startswith("scale") or n == "" for n in reasons)


class _OffWhereItEnters(nn.Module):
    """A residual block whose last ReLU is off at each probed channel (1, 3, 5) while its convs
    carry that channel to a neighbour (0, 2, 4): at one position (1x1, as a ResNet's last stage
    at 16 px) a probe arrives there and never at its own channel."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.conv1 = nn.Conv2d(6, 6, 1, bias=False)
        self.conv2 = nn.Conv2d(6, 6, 1, bias=False)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():
            self.stem.weight.zero_()
            self.stem.bias.fill_(1.0)
            self.conv1.weight.copy_(torch.eye(6).view(6, 6, 1, 1))
            mix = torch.zeros(6, 6)
            for k in (1, 3, 5):
                mix[k, k] = -100.0  # off at k, however far k is pushed
                mix[k - 1, k - 1] = mix[k - 1, k] = 1.0  # k carried to k - 1
            self.conv2.weight.copy_(mix.view(6, 6, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = torch.relu(s + self.conv2(torch.relu(self.conv1(s))))
        return self.head(y.mean((2, 3)))


def test_a_channel_carried_elsewhere_by_a_block_s_convs_is_not_taken_for_a_misroute():
    """The route check perturbs a channel and sees where it arrives: through a residual block
    it arrived at the channels the block's convs mix it into, and nowhere at its own where the
    block's ReLU was off there, so the group was left out as misrouted (ResNet-18 at 16 px lost
    its last stage now and then, by the weights it was trained to). Readers that mix channels
    now pass the reference on: a probe reaches readers only along paths free of layers."""
    found = discover(_OffWhereItEnters().eval(), torch.randn(1, 3, 1, 1), warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    assert not [r for r in reasons.values() if "elsewhere than Torch-Pruning" in r], reasons
    assert "stem" in found.names
