"""Splits by sizes a module stores (timm's MixedConv2d: ``torch.split(x, self.splits, 1)``):
the pieces are pruned where they go, and the stored sizes follow the cut."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from search_space import PruningPlan, discover, split_size_attributes, uniform_plan
from tests.nets import MixBlock, MixedConv, SeparateViT, SplitAttention
from workers import apply_plan, load_pruned, save_pruned

X = torch.randn(2, 3, 8, 8)


def _model(**kw) -> MixBlock:
    torch.manual_seed(0)
    model = MixBlock(**kw).eval()
    with torch.no_grad():  # BatchNorm statistics of its own: pruned channels differ visibly
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return model


def _mixed(model: nn.Module) -> list[MixedConv]:
    return [m for m in model.modules() if isinstance(m, MixedConv)]


def test_the_attributes_a_module_splits_by_are_read_off_its_code():
    assert split_size_attributes(MixedConv(4, 4, [1, 3])) == {"splits"}
    assert split_size_attributes(nn.Conv2d(4, 4, 3)) == frozenset()
    assert split_size_attributes(MixBlock()) == frozenset()


@pytest.mark.parametrize(
    "options",
    [{"se": True, "mixed_pointwise": True}, {"se": False, "mixed_pointwise": False}],
    ids=["squeeze-excite, mixed pointwise", "pieces as groups"],
)
def test_stored_split_sizes_follow_the_cut(options):
    """With squeeze-and-excitation the 36 channels are one group (its gate multiplies them
    all); without, each piece's depthwise conv roots a group of its own. Before, every such
    group was left out: the pruned model split by the old sizes ("split_with_sizes expects
    split_sizes to sum exactly"), and where the pieces were groups of their own, Torch-Pruning
    cut the first piece's channels from the last piece's producer."""
    model = _model(**options)
    found = discover(model, X, warn=False)
    pieces = {f"depthwise.convs.{i}" for i in range(3)}
    grouped = {m for g in found.groups for m in g.members}
    assert pieces <= grouped, found.excluded
    assert not [e for e in found.excluded if e.name in pieces]
    pruned = apply_plan(model, X, uniform_plan(found, 0.5), discovery=found)
    for mixed in _mixed(pruned):
        assert mixed.splits == [c.in_channels for c in mixed.convs]
        assert isinstance(mixed.splits, list)  # the container the module holds
    assert sum(pruned.depthwise.splits) < 36
    assert pruned(X).shape == (2, 10) and pruned.train()(X).shape == (2, 10)


def test_pieces_cut_as_groups_of_their_own_are_cut_where_they_are():
    """Each piece's depthwise conv keeps channels of its own piece: the pruned model is the base
    model with the removed channels' contributions taken out (the projection reads none of them),
    exactly; a map that put a piece's cut elsewhere fails this or breaks the model."""
    model = _model(se=False, mixed_pointwise=False)
    found = discover(model, X, warn=False)
    pieces = [g for g in found.names if g.startswith("depthwise.")]
    assert len(pieces) == 3
    plan = PruningPlan(ratios={g: 0.5 for g in pieces}, units={g: (g,) for g in pieces})
    pruned = apply_plan(model, X, plan, discovery=found)
    removed, offset = [], 0
    for base_conv, conv in zip(model.depthwise.convs, pruned.depthwise.convs, strict=True):
        kept = [_row(base_conv.weight, w) for w in conv.weight]
        removed += [offset + i for i in range(base_conv.out_channels) if i not in kept]
        offset += base_conv.out_channels
    assert removed and pruned.depthwise.splits != model.depthwise.splits
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.project.weight[:, removed] = 0
        torch.testing.assert_close(pruned(X), reference(X))


def _row(weights: torch.Tensor, row: torch.Tensor) -> int:
    return next(i for i, w in enumerate(weights) if torch.equal(w, row))


def test_a_pruned_file_brings_the_stored_sizes_back(tmp_path):
    model = _model()
    found = discover(model, X, warn=False)
    plan = uniform_plan(found, 0.5)
    pruned = apply_plan(model, X, plan, discovery=found)
    path = save_pruned(pruned, plan, tmp_path / "m.safetensors", base_model=model)
    loaded, _ = load_pruned(path, copy.deepcopy(model))
    assert [m.splits for m in _mixed(loaded)] == [m.splits for m in _mixed(pruned)]
    with torch.no_grad():
        assert torch.equal(loaded(X), pruned(X))


def test_a_part_size_stored_as_an_int_follows_the_cut_per_head(tmp_path):
    """GPT-2's ``c_attn(x).split(self.split_size, dim=2)``: before, no cut fitted the size the
    code still split by, and its attention was left out (saying to write chunk()). The layer is
    cut per head of each part, the stored part size and head width follow, and the model is
    exactly the base without those channels (and survives its file)."""
    torch.manual_seed(0)
    model, x = SeparateViT(SplitAttention).eval(), torch.randn(2, 6, 8)
    found = discover(model, x, warn=False)
    group = found.group("attn.c_attn")
    assert (group.channels, group.split) == (96, 12)  # q, k and v of 4 heads each
    plan = PruningPlan(ratios={"attn.c_attn": 0.5}, units={"attn.c_attn": ("attn.c_attn",)})
    pruned = apply_plan(model, x, plan, discovery=found)
    assert (pruned.attn.split_size, pruned.attn.head_dim) == (16, 4)
    base, cut = model.attn.c_attn.weight, pruned.attn.c_attn.weight
    kept = [int((base - row).abs().sum(1).argmin()) for row in cut]
    assert sorted(k // 8 for k in kept) == [h for h in range(12) for _ in range(4)]
    reference = copy.deepcopy(model)
    removed = [i for i in range(96) if i not in kept]
    with torch.no_grad():
        reference.attn.c_attn.weight[removed] = 0
        reference.attn.c_attn.bias[removed] = 0
        torch.testing.assert_close(pruned(x), reference(x))
    path = save_pruned(pruned, plan, tmp_path / "m.safetensors", base_model=model)
    loaded, _ = load_pruned(path, copy.deepcopy(model))
    assert loaded.attn.split_size == 16
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
