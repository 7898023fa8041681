"""Hand-written multi-head attention: the heads are read off the view that splits the tokens'
channels, so each head keeps as many channels as the others, at the same places."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search_space import PruningPlan, discover, uniform_plan
from workers import apply_plan

WIDTH, HEADS = 32, 4


class _Attention(nn.Module):
    """As hand-written Transformers write it; ``fixed``: the head width a constant, not -1."""

    def __init__(self, fixed: bool = False) -> None:
        super().__init__()
        self.fixed = fixed
        self.emb = nn.Linear(8, WIDTH)
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.ff, self.ff2, self.fc = (
            nn.Linear(WIDTH, 64),
            nn.Linear(64, WIDTH),
            nn.Linear(WIDTH, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, _ = h.shape
        width = WIDTH // HEADS if self.fixed else -1
        q, k, v = (p(h).view(b, t, HEADS, width).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) * 0.35, -1) @ v
        h = h + self.o(a.transpose(1, 2).reshape(b, t, -1))
        h = h + self.ff2(torch.relu(self.ff(h)))
        return self.fc(h.mean(1))


def _kept_rows(before: nn.Linear, after: nn.Linear) -> list[int]:
    """Which of ``before``'s output rows ``after`` kept (its inputs whole)."""
    rows = []
    for row in after.weight:
        match = [i for i, r in enumerate(before.weight) if torch.equal(r, row)]
        rows.append(match[0] if len(match) == 1 else -1)
    return rows


def test_the_heads_a_layers_tokens_are_viewed_as_are_cut_alike():
    # Cut as one group of 32 channels, the heads of a 0.5 plan kept 16 channels in any spread
    # (5, 3, 4 and 4, say): the view made 4 heads of 4 out of them, mixing heads.
    torch.manual_seed(0)
    model, x = _Attention().eval(), torch.randn(2, 6, 8)
    found = discover(model, x, warn=False)
    (attention,) = [g for g in found.groups if "q" in g.members and "emb" not in g.members]
    assert attention.split == HEADS and set(attention.members) == {"q", "k"}
    # v is cut with the output projection, apart from q and k (the scores' softmax is no tie).
    (values,) = [g for g in found.groups if "v" in g.members and "emb" not in g.members]
    assert values.split == HEADS and set(values.members) == {"v", "o"}
    (stream,) = [g for g in found.groups if "emb" in g.members]
    assert stream.split == 1  # the layers reading the tokens are not cut per head
    both = {g.name: (g.name,) for g in (attention, values)}
    pruned = apply_plan(model, x, PruningPlan(ratios=dict.fromkeys(both, 0.5), units=both))
    assert pruned.q.out_features == pruned.k.out_features == pruned.v.out_features == WIDTH // 2
    width = WIDTH // HEADS
    for layer in ("q", "k", "v"):
        rows = _kept_rows(getattr(model, layer), getattr(pruned, layer))
        assert -1 not in rows
        per_head = [sorted(r % width for r in rows if r // width == h) for h in range(HEADS)]
        assert all(p == per_head[0] for p in per_head) and len(per_head[0]) == width // 2
    assert pruned(x).shape == (2, 10)


def test_attention_with_a_fixed_head_width_is_left_out_saying_why():
    model, x = _Attention(fixed=True).eval(), torch.randn(2, 6, 8)
    found = discover(model, x, warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    root = next(n for n in ("q", "k", "v") if reasons.get(n, "").startswith("pruning it breaks"))
    assert "the model's code reshapes this layer's output to a fixed size" in reasons[root]
    assert "view(B, T, heads, -1)" in reasons[root]
    assert {"ff", "ff2"} <= {m for g in found.groups for m in g.members}


class _Fused(nn.Module):
    """q, k and v from one Linear: split at dim 2, then each viewed as heads (as nanoGPT's
    ``c_attn``, its split size read off the tensor), chunked in three at dim -1 (a ViT's), or
    viewed at once as (B, T, 3, heads, -1) (as timm's ``qkv``); ``pos``: a learned positional
    embedding added to the tokens first."""

    def __init__(self, style: str, pos: bool = False) -> None:
        super().__init__()
        self.style = style
        self.emb, self.qkv = nn.Linear(8, WIDTH), nn.Linear(WIDTH, 3 * WIDTH)
        self.o, self.fc = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 10)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 6, WIDTH)) if pos else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) if self.pos is None else self.emb(x) + self.pos
        b, t, _ = h.shape
        if self.style in ("split", "chunk"):
            qkv = self.qkv(h)
            parts = (
                qkv.split(qkv.shape[-1] // 3, dim=2) if self.style == "split" else qkv.chunk(3, -1)
            )
            q, k, v = (p.view(b, t, HEADS, -1).transpose(1, 2) for p in parts)
        else:
            q, k, v = self.qkv(h).reshape(b, t, 3, HEADS, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.fc((h + self.o(a.transpose(1, 2).flatten(2))).mean(1))


@pytest.mark.parametrize(
    ("style", "pos"), [("split", False), ("reshape", False), ("chunk", True), ("reshape", True)]
)
def test_fused_query_key_value_heads_are_cut_alike(style, pos):
    # Cut as one, a 0.5 plan kept 6, 4, 2 and 4 channels of the four heads of each of q, k and
    # v: the views regrouped them into heads that mixed the old. And a split at dim 2 (not -1)
    # had the group left out: Torch-Pruning mapped its parts' channels as if unsplit, as it did
    # any split after a learned positional embedding (its class-token rule).
    torch.manual_seed(0)
    model, x = _Fused(style, pos).eval(), torch.randn(2, 6, 8)
    found = discover(model, x, warn=False)
    (group,) = [g for g in found.groups if g.name == "qkv"]
    assert group.split == 3 * HEADS
    pruned = apply_plan(model, x, PruningPlan(ratios={"qkv": 0.5}, units={"qkv": ("qkv",)}))
    assert pruned.qkv.out_features == 3 * WIDTH // 2
    rows, width = _kept_rows(model.qkv, pruned.qkv), WIDTH // HEADS
    assert -1 not in rows
    # Every head of q, k and v keeps the same offsets: a query's channels meet the key's.
    slices = [sorted(r % width for r in rows if r // width == s) for s in range(3 * HEADS)]
    assert all(s == slices[0] for s in slices) and len(slices[0]) == width // 2
    assert pruned(x).shape == (2, 10)


class _GatedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 16, 3), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, 1)
        return self.out((a * torch.sigmoid(b)).mean((2, 3)))


def test_a_feature_map_cut_in_parts_is_traced_as_before():
    # Only tokens' parts are recorded; a feature map's chunk failed the trace (a KeyError).
    found = discover(_GatedConv().eval(), torch.randn(2, 3, 8, 8), warn=False)
    assert [(g.name, g.split) for g in found.groups] == [("conv", 2)]


class _StreamSized(_Attention):
    """The head width read off the residual stream (``B, T, C = h.shape``), not the layer's own
    output: two groups' widths tied in the code, not in the graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, c = h.shape
        q, k, v = (
            p(h).view(b, t, HEADS, c // HEADS).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        a = torch.softmax(q @ k.transpose(-1, -2) * 0.35, -1) @ v
        h = h + self.o(a.transpose(1, 2).reshape(b, t, -1))
        h = h + self.ff2(torch.relu(self.ff(h)))
        return self.fc(h.mean(1))


def test_a_layer_viewed_by_another_groups_width_is_left_out_with_that_group():
    # Both groups are 32 wide: dry-run at one ratio, they kept alike and the view fitted, so both
    # were listed, and every plan cutting them unalike failed in its trial.
    model, x = _StreamSized().eval(), torch.randn(2, 6, 8)
    found = discover(model, x, warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    assert {"emb", "q", "k", "v"} <= set(reasons), found.names
    assert any("view(B, T, heads, -1)" in reasons[n] for n in ("q", "k", "v"))
    assert found.names == ("ff",)
    for plan in (uniform_plan(found, 0.25), uniform_plan(found, 0.5)):
        assert apply_plan(model, x, plan)(x).shape == (2, 10)


class _FixedSplit(_Fused):
    """nanoGPT's attention: q, k and v split off by the model's width, a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, _ = h.shape
        parts = self.qkv(h).split(WIDTH, dim=2)
        q, k, v = (p.view(b, t, HEADS, -1).transpose(1, 2) for p in parts)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.fc((h + self.o(a.transpose(1, 2).flatten(2))).mean(1))


def test_a_split_of_a_fixed_size_is_left_out_with_the_fix():
    # PyTorch's words alone: "mat1 and mat2 shapes cannot be multiplied (12x8 and 24x32)".
    model, x = _FixedSplit("split").eval(), torch.randn(2, 6, 8)
    found = discover(model, x, warn=False)
    reason = {e.name: e.reason for e in found.excluded}["qkv"]
    assert "split into parts of 32 channels" in reason and "write chunk(3, dim)" in reason
    # q's channel i meets k's in the scores, rightly: not the maxout's folding it once named.
    assert "maxout" not in reason


class _GroupedQuery(nn.Module):
    """Grouped-query attention: 2 key and value heads, each shared by 2 of the 4 query heads,
    repeated as ``repeat_interleave`` does, as Llama's ``repeat_kv`` does (expand and reshape),
    or by the attention itself (``enable_gqa``)."""

    def __init__(self, repeat: str, kv_heads: int = 2) -> None:
        super().__init__()
        self.repeat, self.kv_heads = repeat, kv_heads
        kv_width = WIDTH // HEADS * kv_heads
        self.emb, self.q, self.o = (
            nn.Linear(8, WIDTH),
            nn.Linear(WIDTH, WIDTH),
            nn.Linear(WIDTH, WIDTH),
        )
        self.k, self.v = nn.Linear(WIDTH, kv_width), nn.Linear(WIDTH, kv_width)
        self.fc = nn.Linear(WIDTH, 10)

    def _shared(self, z: torch.Tensor) -> torch.Tensor:
        r = HEADS // self.kv_heads
        if self.repeat == "interleave":
            return z.repeat_interleave(r, dim=1)
        b, kv, t, d = z.shape
        return z[:, :, None, :, :].expand(b, kv, r, t, d).reshape(b, kv * r, t, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, _ = h.shape
        q = self.q(h).view(b, t, HEADS, -1).transpose(1, 2)
        k, v = (p(h).view(b, t, self.kv_heads, -1).transpose(1, 2) for p in (self.k, self.v))
        if self.repeat == "sdpa":
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            a = nn.functional.scaled_dot_product_attention(
                q, self._shared(k), self._shared(v), is_causal=True
            )
        return self.fc((h + self.o(a.transpose(1, 2).flatten(2))).mean(1))


@pytest.mark.parametrize("repeat", ["interleave", "expand", "sdpa"])
def test_grouped_query_attention_cuts_each_query_head_as_its_key_head(repeat):
    # Torch-Pruning took the repeat for an element-wise op and tied the query's channel i to the
    # key's channel i, of half its width: the dry run failed ("mat1 and mat2 shapes cannot be
    # multiplied") and q, k and v were left out.
    torch.manual_seed(0)
    model, x = _GroupedQuery(repeat).eval(), torch.randn(2, 6, 8)
    found = discover(model, x, warn=False)
    assert not {"q", "k", "v", "o"} & {e.name for e in found.excluded}
    # q and k meet in the scores, v in the attention's output: two groups (see the next test).
    (scores,) = [g for g in found.groups if {"q", "k"} <= set(g.members) and "emb" not in g.members]
    (values,) = [g for g in found.groups if "v" in g.members and "emb" not in g.members]
    plan = PruningPlan(
        ratios={scores.name: 0.5, values.name: 0.5},
        units={scores.name: (scores.name,), values.name: (values.name,)},
    )
    pruned = apply_plan(model, x, plan)
    width = WIDTH // HEADS
    assert pruned.q.out_features == WIDTH // 2 and pruned.k.out_features == width
    assert pruned.v.out_features == width and pruned.o.in_features == WIDTH // 2
    assert pruned(x).shape == (2, 10)
    q_rows, k_rows = _kept_rows(model.q, pruned.q), _kept_rows(model.k, pruned.k)
    assert -1 not in q_rows + k_rows
    # Every query head keeps the offsets its key head keeps (and every head the same).
    offsets = [sorted(r % width for r in q_rows if r // width == h) for h in range(HEADS)]
    offsets += [sorted(r % width for r in k_rows if r // width == g) for g in range(2)]
    assert all(o == offsets[0] for o in offsets) and len(offsets[0]) == width // 2
    # And both value heads the same offsets, which the output projection reads per query head.
    v_rows = _kept_rows(model.v, pruned.v)
    kept = [sorted(r % width for r in v_rows if r // width == g) for g in range(2)]
    assert kept[0] == kept[1] and len(kept[0]) == width // 2


class _Rotary(nn.Module):
    """Llama-style attention: q and k rotated by a rotary embedding (``rotate_half``), which
    Torch-Pruning cannot follow, then ``scaled_dot_product_attention`` or, ``eager``, the
    products it computes written out."""

    def __init__(self, eager: bool = False) -> None:
        super().__init__()
        self.eager = eager
        self.emb, self.q, self.k = (
            nn.Linear(8, WIDTH),
            nn.Linear(WIDTH, WIDTH),
            nn.Linear(WIDTH, WIDTH),
        )
        self.v, self.o, self.fc = (
            nn.Linear(WIDTH, WIDTH),
            nn.Linear(WIDTH, WIDTH),
            nn.Linear(WIDTH, 10),
        )
        angles = torch.outer(torch.arange(6.0), torch.ones(WIDTH // HEADS // 2)).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def _rotated(self, z: torch.Tensor) -> torch.Tensor:
        a, b = z.chunk(2, dim=-1)
        return z * self.cos + torch.cat([-b, a], dim=-1) * self.sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, _ = h.shape
        q, k, v = (p(h).view(b, t, HEADS, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        q, k = self._rotated(q), self._rotated(k)
        if self.eager:
            a = (q @ k.transpose(2, 3) * q.shape[-1] ** -0.5).softmax(-1, dtype=torch.float32) @ v
        else:
            a = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.fc((h + self.o(a.transpose(1, 2).flatten(2))).mean(1))


@pytest.mark.parametrize("eager", [False, True])
def test_values_are_cut_apart_from_queries_and_keys_a_rotary_embedding_leaves_whole(eager):
    # Torch-Pruning took the attention (or the product of the scores' softmax and v) for an
    # element-wise op and tied v's channels to q's and k's: with q and k left out (the rotary
    # embedding), v and o were left out with them.
    model, x = _Rotary(eager).eval(), torch.randn(2, 6, 8)
    found = discover(model, x, warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    assert "rotate_half" in reasons["k"] and "q" in reasons
    (values,) = [g for g in found.groups if "v" in g.members and "emb" not in g.members]
    assert set(values.members) == {"v", "o"} and values.split == HEADS
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert pruned.v.out_features == pruned.o.in_features == WIDTH // 2
    assert pruned.q.out_features == pruned.k.out_features == WIDTH
    assert pruned(x).shape == (2, 10)
