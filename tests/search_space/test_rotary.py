"""A Llama-style model (RMSNorm, rotary embeddings, SwiGLU) is searched: the attention that
rotary embeddings reorder is left out with why, its MLPs and residual stream are pruned."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
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


def _halves_sliced(u: torch.Tensor) -> torch.Tensor:
    """Hugging Face's ``rotate_half``: halves by slicing, not by chunk."""
    h = u.shape[-1] // 2
    return torch.cat((-u[..., h:], u[..., :h]), dim=-1)


def _halves_gathered(u: torch.Tensor) -> torch.Tensor:
    """The same rotation written with ``index_select``, which the trace reads as moving no
    channel: what Torch-Pruning's walk is left with when nothing names the reordering."""
    h = u.shape[-1] // 2
    back, front = torch.arange(h, 2 * h), torch.arange(h)
    return torch.cat((-u.index_select(-1, back), u.index_select(-1, front)), -1)


class _SharedTableBlock(_Block):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        y = self.n1(x)
        q, k, v = (p(y).view(b, t, -1, HEAD_DIM).transpose(1, 2) for p in (self.q, self.k, self.v))
        q, k = q * cos + self.rotate(q) * sin, k * cos + self.rotate(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class _SharedTableLlama(nn.Module):
    """As Hugging Face's Llama: one cos/sin table, ``cat((freqs, freqs))``, made by the model
    and read by every layer's q and k."""

    def __init__(self, rotate: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.emb, self.blocks = nn.Embedding(VOCAB, WIDTH), nn.ModuleList()
        for _ in range(2):
            block = _SharedTableBlock()
            block.rotate = rotate
            self.blocks.append(block)
        self.norm, self.head = RMSNorm(WIDTH), nn.Linear(WIDTH, VOCAB, bias=False)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        freqs = torch.outer(torch.arange(x.shape[1], dtype=torch.float32), self.inv_freq)
        angles = torch.cat([freqs, freqs], -1)
        cos, sin = angles.cos(), angles.sin()
        h = self.emb(x)
        for block in self.blocks:
            h = block(h, cos, sin)
        return self.head(self.norm(h))


def _discover_within(model: nn.Module, x: torch.Tensor, seconds: float) -> Any:
    """discover, or a failure if it has not ended in ``seconds`` (the walk that ran without
    end would otherwise hang the suite, not fail it)."""
    found: list = []
    worker = threading.Thread(target=lambda: found.append(discover(model, x, warn=False)))
    worker.daemon = True
    worker.start()
    worker.join(seconds)
    assert found, f"discover did not end within {seconds} s"
    return found[0]


@pytest.mark.parametrize("rotate", [_halves_sliced, _halves_gathered], ids=["sliced", "gathered"])
def test_a_rotary_table_every_layer_reads_ends_the_walk(rotate):
    # A two-layer Hugging Face Llama's discovery ran without end: every layer's q and k read
    # one table, so Torch-Pruning's walk went round it, the indices shifted by the table's
    # concatenation each time. Sliced halves are now read as chunks put back in another order
    # (left out with why); an index past a piece's width is dropped, so the walk ends for any
    # writing of the rotation (the gathered one: left out by the dry run).
    model, x = _SharedTableLlama(rotate).eval(), torch.randint(0, VOCAB, (2, 10))
    found = _discover_within(model, x, seconds=300)
    reasons = {e.name: e.reason for e in found.excluded}
    for i in range(2):
        assert reasons.get(f"blocks.{i}.k") and reasons.get(f"blocks.{i}.q")
        assert any(g.name in (f"blocks.{i}.up", f"blocks.{i}.gate") for g in found.groups)
    if rotate is _halves_sliced:
        assert "rotate_half" in reasons["blocks.0.k"]
    assert [g for g in found.groups if "emb" in g.members]  # the residual stream
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert pruned.emb.embedding_dim == WIDTH // 2 and pruned(x).shape == (2, 10, VOCAB)


class _NeoXAttention(nn.Module):
    """GPT-NeoX's attention: q, k and v fused per head, a rotary embedding on part of each."""

    def __init__(self, rotary: int = HEAD_DIM // 2) -> None:
        super().__init__()
        self.qkv, self.dense = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.rotary = rotary

    def _embed(self, u: torch.Tensor) -> torch.Tensor:
        r = self.rotary
        cos = torch.ones(u.shape[-2], r)
        turned, kept = u[..., :r], u[..., r:]
        return torch.cat((turned * cos + _halves_sliced(turned) * cos, kept), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, -1, 3 * HEAD_DIM).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(self._embed(q), self._embed(k), v, is_causal=True)
        return self.dense(a.transpose(1, 2).reshape(b, t, -1))


class _NeoX(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.attn = nn.Embedding(VOCAB, WIDTH), _NeoXAttention()
        self.up, self.down = nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.attn(h)
        return self.head(h + self.down(F.gelu(self.up(h))))


def test_a_layer_whose_channels_torch_pruning_cannot_walk_is_left_out_alone():
    # Torch-Pruning's walk from the fused qkv failed inside a split's map ("list index out of
    # range"), and the error ended the whole discovery: nothing of the model was searched.
    model, x = _NeoX().eval(), torch.randint(0, VOCAB, (2, 10))
    found = discover(model, x, warn=False)
    reason = {e.name: e.reason for e in found.excluded}["attn.qkv"]
    assert reason.startswith("Torch-Pruning could not follow its channels") and "Error" in reason
    assert found.group("up").channels == HIDDEN and "emb" in found.group("down").members
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert pruned.up.out_features == HIDDEN // 2 and pruned(x).shape == (2, 10, VOCAB)
