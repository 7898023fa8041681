"""A Llama-style model (RMSNorm, rotary embeddings, SwiGLU) is searched: the attention that
rotary embeddings reorder is left out with why, its MLPs and residual stream are pruned."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from search_space import discover, uniform_plan
from workers import apply_plan

from .token_models import RMSNorm

WIDTH, HEADS, HEAD_DIM, HIDDEN, VOCAB = 32, 4, 8, 64, 100


def _rotate_half(u: torch.Tensor) -> torch.Tensor:
    u1, u2 = u.chunk(2, -1)
    return torch.cat([-u2, u1], -1)


class _Block(nn.Module):
    """As Llama's code writes one: head_dim a constant, the inverse frequencies a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.n1, self.n2 = RMSNorm(WIDTH), RMSNorm(WIDTH)
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(4))
        self.gate, self.up = (
            nn.Linear(WIDTH, HIDDEN, bias=False),
            nn.Linear(WIDTH, HIDDEN, bias=False),
        )
        self.down = nn.Linear(HIDDEN, WIDTH, bias=False)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        freqs = torch.outer(torch.arange(t, dtype=torch.float32), self.inv_freq)
        angles = torch.cat([freqs, freqs], -1)
        cos, sin = angles.cos(), angles.sin()
        y = self.n1(x)
        q, k, v = (
            p(y).view(b, t, HEADS, HEAD_DIM).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class _Llama(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.blocks = nn.Embedding(VOCAB, WIDTH), nn.ModuleList([_Block(), _Block()])
        self.norm, self.head = RMSNorm(WIDTH), nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def test_a_llama_style_model_is_searched_around_its_rotary_attention():
    # Torch-Pruning could not size rotate_half's negated chunk: the whole model failed to trace
    # ("unsupported operand type(s) for +: 'int' and 'NoneType'"), so nothing was searched.
    model, x = _Llama().eval(), torch.randint(0, VOCAB, (2, 10))
    found = discover(model, x, warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    for i in range(2):
        attention = [reasons.get(f"blocks.{i}.{p}", "") for p in "qkv"]
        assert any(
            r.startswith("its channels pass through a concatenation of one tensor's chunks")
            for r in attention
        )
        assert all(r for r in attention), attention  # each listed, with why
        (mlp,) = [g for g in found.groups if g.name in (f"blocks.{i}.up", f"blocks.{i}.gate")]
        assert {f"blocks.{i}.gate", f"blocks.{i}.up"} <= set(mlp.members)
        assert mlp.channels == HIDDEN
    (stream,) = [g for g in found.groups if "emb" in g.members]
    assert {"blocks.0.o", "blocks.1.down"} <= set(stream.members)
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert (
        pruned.emb.embedding_dim == WIDTH // 2 and pruned.blocks[0].up.out_features == HIDDEN // 2
    )
    assert pruned.blocks[0].q.out_features == WIDTH  # the rotated heads stay whole
    assert pruned(x).shape == (2, 10, VOCAB)
