"""Hand-written multi-head attention: the heads are read off the view that splits the tokens'
channels, so each head keeps as many channels as the others, at the same places."""

from __future__ import annotations

import torch
from torch import nn

from search_space import PruningPlan, discover
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
    assert attention.split == HEADS
    (stream,) = [g for g in found.groups if "emb" in g.members]
    assert stream.split == 1  # the layers reading the tokens are not cut per head
    only = {attention.name: (attention.name,)}
    pruned = apply_plan(model, x, PruningPlan(ratios={attention.name: 0.5}, units=only))
    assert pruned.q.out_features == pruned.k.out_features == WIDTH // 2
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
