"""Dense layers of a type Torch-Pruning has no pruner for (GPT-2's ``Conv1D``), recognised by
what they compute and pruned as a Linear is: GPT-2 had no prunable group at all."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from search_space import DensePruner, PruningPlan, discover, uniform_plan
from search_space import dense_layout as layout_of
from workers import apply_plan

from ..nets import Conv1D, GPTBlock, TinyGPT


class OutIn(nn.Module):
    """A dense layer written by hand with its weight stored out by in, as nn.Linear's is."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() + self.bias


class Scaled(Conv1D):
    """Computes more than a dense layer: its output scaled by a factor of its own."""

    def __init__(self, nf: int, nx: int, factor: float) -> None:
        super().__init__(nf, nx)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.factor


class Masked(Conv1D):
    """A dense layer whose weight is masked by a buffer: state beyond weight and bias."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__(nf, nx)
        self.register_buffer("mask", (torch.rand(nx, nf) > 0.5).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight * self.mask)


def test_a_dense_layer_is_recognised_by_what_it_computes_with_the_widths_it_stores():
    wide, square, hand = layout_of(Conv1D(24, 8)), layout_of(Conv1D(8, 8)), layout_of(OutIn(6, 5))
    assert (wide.stored, wide.out_attrs, wide.in_attrs) == ("in_out", ("nf",), ("nx",))
    # Both widths 8: nf is the one the forward sizes its output by, so it follows the outputs.
    assert (square.stored, square.out_attrs, square.in_attrs) == ("in_out", ("nf",), ("nx",))
    assert (hand.stored, hand.out_attrs, hand.in_attrs) == ("out_in", (), ())
    assert layout_of(Scaled(8, 4, 2.0)) is None and layout_of(Masked(8, 4)) is None
    assert layout_of(Scaled(8, 4, 1.0)) is not None  # what it computes, not its type
    assert layout_of(nn.Linear(4, 8)) is None  # Torch-Pruning's own


def test_its_pruner_cuts_the_channels_and_the_widths_it_stores():
    torch.manual_seed(0)
    layer, x = Conv1D(6, 4), torch.randn(3, 4)
    pruner = DensePruner(layout_of(layer))
    pruned = pruner.prune_in_channels(pruner.prune_out_channels(copy.deepcopy(layer), [1, 4]), [0])
    assert (pruned.nf, pruned.nx, tuple(pruned.weight.shape)) == (4, 3, (3, 4))
    expected = layer(torch.cat([torch.zeros(3, 1), x[:, 1:]], 1))[:, [0, 2, 3, 5]]
    torch.testing.assert_close(pruned(x[:, 1:]), expected)


def _hidden_zeroed(model: TinyGPT, kept: dict[str, list[int]]) -> TinyGPT:
    """``model`` with the MLP hidden units not in ``kept`` (block -> units) silenced."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for i, block in enumerate(out.blocks):
            gone = [u for u in range(block.c_fc.nf) if u not in kept[str(i)]]
            block.c_fc.weight[:, gone] = 0
            block.c_fc.bias[gone] = 0  # gelu(0) = 0: the unit adds nothing
    return out


def test_gpt2_blocks_have_their_mlps_and_residual_stream_searched():
    torch.manual_seed(0)
    model, x = TinyGPT().eval(), torch.randn(2, 8, 8)
    found = discover(model, x, warn=False)
    stream = next(g for g in found.groups if "embed" in g.members)
    assert {"blocks.0.c_fc", "blocks.1.c_fc"} <= set(found.names)
    assert found.group("blocks.0.c_fc").members == ("blocks.0.c_fc", "blocks.0.c_proj")
    assert {"blocks.0.c_attn", "blocks.1.attn_proj", "ln_f", "head"} <= set(stream.members)
    # q, k and v split off by a width the block stored (``split(self.d, dim=2)``): before, no
    # cut fitted and the attention was left out; now cut per head of each part, the stored
    # width following (test_stored_splits checks such a model exactly).
    assert found.group("blocks.0.c_attn").split == 6
    attn = PruningPlan(ratios={"qkv": 0.5}, units={"qkv": ("blocks.0.c_attn",)})
    cut = apply_plan(model, x, attn, discovery=found)
    assert (cut.blocks[0].d, cut.blocks[0].c_attn.nf) == (16, 48)
    assert cut(x).shape == model(x).shape
    # Half of each MLP's hidden units: the model computes what the original does with the
    # units it dropped silenced.
    plan = PruningPlan(ratios={"mlp": 0.5}, units={"mlp": ("blocks.0.c_fc", "blocks.1.c_fc")})
    pruned = apply_plan(model, x, plan)
    kept = {}
    for i, (before, after) in enumerate(zip(model.blocks, pruned.blocks, strict=True)):
        assert after.c_fc.nf == after.c_proj.nx == 32 and after.c_proj.nf == 32
        cols = before.c_fc.weight.t()
        kept[str(i)] = [int((cols == c).all(1).nonzero()) for c in after.c_fc.weight.t()]
    torch.testing.assert_close(pruned(x), _hidden_zeroed(model, kept)(x))


class _ChunkedBlock(GPTBlock):
    """GPT-2's block with q, k and v taken by ``chunk``: parts that shrink with the layer."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q, k, v = self.c_attn(self.ln_1(h)).chunk(3, dim=2)
        q, k, v = (p.view(b, t, self.heads, -1).transpose(1, 2) for p in (q, k, v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return h + self.attn_proj(a.transpose(1, 2).reshape(b, t, -1))


def test_attention_of_such_layers_is_cut_per_head_where_its_parts_shrink():
    # Its split and its view by heads are read as a Linear's output's are: 3 parts of 2
    # heads, each keeping the same channels.
    torch.manual_seed(0)
    model, x = nn.Sequential(Conv1D(16, 8), _ChunkedBlock(16)).eval(), torch.randn(2, 5, 8)
    found = discover(model, x, warn=False)
    group = found.group("1.c_attn")
    assert (group.members, group.split) == (("1.attn_proj", "1.c_attn"), 6)
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert pruned[1].c_attn.nf == 24 and pruned[1].attn_proj.nx == 8
    assert pruned(x).shape == (2, 5, 16)  # the stream is the output: whole


class _Mixed(nn.Module):
    """Two instances of one type, one a dense layer and one not: Torch-Pruning hooks every
    instance of a type with one pruner, so neither is pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Scaled(16, 8, 1.0), Scaled(16, 16, 3.0)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.filterwarnings("ignore:discover")
def test_a_type_not_every_instance_of_which_is_dense_is_left_out_with_why():
    found = discover(_Mixed().eval(), torch.randn(4, 8), warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    assert not found.groups
    assert reasons["a"].startswith("Scaled: multiplies its inputs by its own weight")
    assert reasons["b"].startswith("Scaled: multiplies its inputs by its own weight")
