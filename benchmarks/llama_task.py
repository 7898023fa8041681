"""A small Llama-style decoder written by hand, for ``benchmarks.quality --tasks
benchmarks.llama_task:build``: the attention of today's language models on a classification
task, a family outside the repository's others.

Digits at 16x16 (no download) read as a sequence of 16 rows of 16 pixels, each row a token
embedded by a Linear layer; pre-norm decoder layers: RMSNorm written out, grouped-query
attention (4 query heads, 2 key and value heads repeated as Llama's ``repeat_kv`` does) with a
rotary position embedding (``rotate_half``) and a causal mask, then a SwiGLU MLP
(``down(silu(gate(x)) * up(x))``); the last token's final norm feeds the classifier. No
BatchNorm. Nothing in prunesearch knows this module: the rotary embedding leaves q and k whole,
and the search has the residual stream, each layer's v and output projection (cut per key
head) and each MLP's hidden width. The base model trains once per options and is cached
(``workers.load_or_train``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.mixed_task import cached_digits_task
from workers import Task

DEFAULTS = {
    "seed": 0,
    "width": 64,
    "heads": 4,
    "kv_heads": 2,
    "depth": 2,
    "base_epochs": 20,
    "base_lr": 0.02,
}
ROWS = 16  # tokens: the image's rows


class RMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, head = heads, kv_heads, width // heads
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, kv_heads * head, bias=False)
        self.v = nn.Linear(width, kv_heads * head, bias=False)
        self.o = nn.Linear(width, width, bias=False)
        freqs = 1.0 / 10000 ** (torch.arange(0, head, 2).float() / head)
        angles = torch.outer(torch.arange(ROWS).float(), freqs).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def _repeat_kv(self, z: torch.Tensor) -> torch.Tensor:
        b, kv, t, d = z.shape
        r = self.heads // kv
        return z[:, :, None, :, :].expand(b, kv, r, t, d).reshape(b, kv * r, t, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, -1).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, -1).transpose(1, 2)
        q = q * self.cos + rotate_half(q) * self.sin
        k = k * self.cos + rotate_half(k) * self.sin
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class Layer(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(width), RMSNorm(width)
        self.attn = Attention(width, heads, kv_heads)
        self.gate = nn.Linear(width, 2 * width, bias=False)
        self.up = nn.Linear(width, 2 * width, bias=False)
        self.down = nn.Linear(2 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, depth: int, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(ROWS, width)
        self.layers = nn.Sequential(*[Layer(width, heads, kv_heads) for _ in range(depth)])
        self.norm, self.head = RMSNorm(width), nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.flatten(1, 2))  # (batch, 1, rows, cols) -> (batch, rows, cols)
        return self.head(self.norm(self.layers(tokens))[:, -1])


def build(options: Mapping[str, Any]) -> Task:
    def model(opts: Mapping[str, Any]) -> nn.Module:
        sizes = ("width", "heads", "kv_heads", "depth")
        return TinyLlama(*(int(opts[k]) for k in sizes))

    return cached_digits_task(options, DEFAULTS, model, ("llama", 1))
