"""Buffers that hold a value per channel (a sinusoidal positional encoding, a fixed scale) are
cut with the channels they meet, and stay buffers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from search_space import PruningPlan, discover, uniform_plan
from workers import apply_plan, load_pruned, save_pruned


class _PositionalEncoding(nn.Module):
    """As "Attention Is All You Need" and PyTorch's own tutorial write it: a buffer."""

    def __init__(self, d: int, max_len: int = 64, persistent: bool = True) -> None:
        super().__init__()
        pos = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
        pe = torch.zeros(max_len, d)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe.unsqueeze(0), persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.size(1)]


class _TextTransformer(nn.Module):
    def __init__(self, persistent: bool = True) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(100, 32), _PositionalEncoding(32, persistent=persistent)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.pos(self.emb(x))).mean(1))


def _kept_columns(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which columns of ``before`` (dim 1) ``after`` kept, by value."""
    return [i for i in range(before.shape[1]) if any(torch.equal(before[:, i], c) for c in after.T)]


def test_a_positional_encoding_buffer_is_cut_with_the_residual_stream(tmp_path):
    # Torch-Pruning did not see the buffer: the stream's group failed the dry run ("The size
    # of tensor a (24) must match the size of tensor b (32)") and its layers were left out.
    torch.manual_seed(0)
    model, x = _TextTransformer().eval(), torch.randint(0, 100, (2, 10))
    found = discover(model, x, warn=False)
    (stream,) = [g for g in found.groups if "emb" in g.members]
    assert {e.name for e in found.excluded} == {"head"}
    plan = PruningPlan(ratios={stream.name: 0.5}, units={stream.name: (stream.name,)})
    pruned = apply_plan(model, x, plan)
    kept = _kept_columns(model.emb.weight, pruned.emb.weight)
    assert len(kept) == 16
    assert "pos.pe" in dict(pruned.named_buffers()) and "pos.pe" not in dict(
        pruned.named_parameters()
    )
    torch.testing.assert_close(pruned.pos.pe, model.pos.pe[:, :, kept])
    assert not pruned.pos.pe.requires_grad
    loaded, _ = load_pruned(
        save_pruned(pruned, plan, tmp_path / "m.safetensors", base_model=model),
        copy.deepcopy(model),
    )
    torch.testing.assert_close(loaded(x), pruned(x))


def test_a_transient_buffer_stays_transient_and_a_traced_model_keeps_its_very_buffers():
    model, x = _TextTransformer(persistent=False).eval(), torch.randint(0, 100, (2, 10))
    pe = model.pos.pe
    found = discover(model, x, warn=False)
    assert model.pos.pe is pe and "pos.pe" not in model.state_dict()  # tracing changed nothing
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert (
        pruned.pos.pe.shape == (1, 64, pruned.emb.embedding_dim) and pruned.emb.embedding_dim < 32
    )
    assert "pos.pe" not in pruned.state_dict()


class _FixedScale(nn.Module):
    """A conv whose channels a fixed per-channel buffer scales."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 16, 3), nn.Linear(16, 4)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.conv(x) * self.scale.view(1, -1, 1, 1)).mean((2, 3)))


def test_a_fixed_per_channel_scale_is_cut_with_its_conv():
    torch.manual_seed(0)
    model, x = _FixedScale().eval(), torch.randn(2, 3, 8, 8)
    assert discover(model, x, warn=False).names == ("conv",)
    pruned = apply_plan(model, x, PruningPlan(ratios={"conv": 0.5}, units={"conv": ("conv",)}))
    flat = model.conv.weight.flatten(1)
    kept = [
        i for i in range(16) if any(torch.equal(flat[i], w) for w in pruned.conv.weight.flatten(1))
    ]
    torch.testing.assert_close(pruned.scale, model.scale[kept])
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.fc.weight[:, [i for i in range(16) if i not in kept]] = 0
    torch.testing.assert_close(pruned(x), reference(x))


class _CausalAttention(nn.Module):
    """A float causal mask as a buffer: it is added to the scores, which hold no channels."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.qkv, self.out = nn.Linear(8, 32), nn.Linear(32, 96), nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)
        self.register_buffer("mask", torch.triu(torch.full((16, 16), float("-inf")), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, t = self.emb(x), x.shape[1]
        q, k, v = self.qkv(h).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / 4 + self.mask[:t, :t], -1)
        return self.head((h + self.out(a @ v)).mean(1))


def test_a_mask_buffer_over_positions_is_left_whole():
    # A 0.25 or 0.375 plan of qkv cut the mask to (16, 12) or (16, 10), and the model ran,
    # attending where the mask had forbidden it; a 0.5 plan was skipped by Torch-Pruning (the
    # mask would have lost all 16 columns), and this test passed on that skip.
    model, x = _CausalAttention().eval(), torch.randn(2, 10, 8)
    found = discover(model, x, warn=False)
    assert set(found.names) == {"emb", "qkv"}
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert pruned.mask.shape == (16, 16) and "mask" in dict(pruned.named_buffers())
    assert pruned(x).shape == (2, 5)


def test_a_buffer_is_not_trained_between_the_steps_of_an_iterative_pruning():
    # While Torch-Pruning works, buffers are parameters: the training an iterative recovery
    # runs between its steps trained them (a frozen norm's statistics, an encoding moved).
    torch.manual_seed(0)
    model, x = _FixedScale().eval(), torch.randn(4, 3, 8, 8)
    plan = PruningPlan(ratios={"conv": 0.5}, units={"conv": ("conv",)}, iterative_steps=2)

    def train(m: nn.Module, step: int) -> None:
        trainable = [p for p in m.parameters() if p.requires_grad]
        optimiser = torch.optim.SGD(trainable, lr=0.5)
        m(x).square().sum().backward()
        optimiser.step()
        optimiser.zero_grad()

    pruned = apply_plan(model, x, plan, between_steps=train)
    flat = model.conv.weight.flatten(1)
    assert not torch.equal(pruned.conv.weight.flatten(1)[0], flat[0])  # the conv was trained
    kept = sorted(
        torch.isclose(model.scale[:, None], pruned.scale[None]).any(1).nonzero().flatten().tolist()
    )
    assert len(kept) == pruned.conv.out_channels == 8  # every value kept is one it had
    assert not pruned.scale.requires_grad


class _HeadsMasked(nn.Module):
    """Scores of every head (B, H, T, T) plus a causal mask buffer (T, T), broadcast."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.qkv = nn.Linear(8, 32), nn.Linear(32, 96)
        self.out, self.head = nn.Linear(32, 32), nn.Linear(32, 5)
        self.register_buffer("mask", torch.triu(torch.full((16, 16), float("-inf")), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, _ = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, 4, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.softmax(q @ k.transpose(-1, -2) / 4 + self.mask[:t, :t], -1)
        return self.head((h + self.out((a @ v).transpose(1, 2).flatten(2))).mean(1))


@pytest.mark.parametrize(
    "build, split, ratio",
    [(_CausalAttention, 3, 0.25), (_CausalAttention, 3, 0.5), (_HeadsMasked, 3 * 4, 0.5)],
)
def test_a_causal_mask_is_left_whole_and_the_attention_cut_exactly(build, split, ratio):
    # Torch-Pruning takes the matmul making the scores for an element-wise op and tied the
    # mask's columns to the query's and key's channels. Scores contracted over a layer's
    # channels hold none (one head's), and a (T, T) mask over every head's scores, broadcast as
    # (1, 1, T, T), is one map over the heads: either way the mask meets no channels.
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(2, 10, 8)
    found = discover(model, x, warn=False)
    assert found.group("qkv").split == split
    plan = PruningPlan(ratios={"qkv": ratio}, units={"qkv": ("qkv",)}, criterion="l1")
    pruned = apply_plan(model, x, plan)
    assert pruned.qkv.out_features == 96 - int(96 * ratio)
    assert torch.equal(pruned.mask, model.mask)
    # The pruned attention is the base's with the cut query, key and value channels zeroed.
    reference = copy.deepcopy(model)
    kept = [
        i for i in range(96) if any(torch.equal(model.qkv.weight[i], r) for r in pruned.qkv.weight)
    ]
    cut = [i for i in range(96) if i not in kept]
    with torch.no_grad():
        reference.qkv.weight[cut] = 0
        reference.qkv.bias[cut] = 0
    torch.testing.assert_close(pruned(x), reference(x))


class _Untold(_CausalAttention):
    """As ``_CausalAttention``, but the query is moved and moved back before the product: the
    trace no longer knows where its channels are, so nor that the scores hold none."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, t = self.emb(x), x.shape[1]
        q, k, v = self.qkv(h).chunk(3, -1)
        q = q.transpose(1, 2).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / 4 + self.mask[:t, :t], -1)
        return self.head((h + self.out(a @ v)).mean(1))


def test_a_group_cutting_a_mask_the_trace_cannot_tell_apart_is_left_out_saying_so():
    model, x = _Untold().eval(), torch.randn(2, 10, 8)
    found = discover(model, x, warn=False)
    assert set(found.names) == {"emb"}
    reason = {e.name: e.reason for e in found.excluded}["qkv"]
    assert "buffer 'mask' (16, 16) at dim 1" in reason or "a buffer tied to the group" in reason
    assert torch.equal(apply_plan(model, x, uniform_plan(found, 0.5)).mask, model.mask)
