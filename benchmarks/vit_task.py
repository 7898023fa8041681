"""A small Vision Transformer written by hand, for ``benchmarks.quality --tasks
benchmarks.vit_task:build``: attention blocks without BatchNorm, as a family outside the
convolutional ones.

Digits at 16x16 (no download) cut into 16 patches of 4x4 by a strided conv, a learned class
token concatenated before them and a learned positional embedding added, then pre-norm blocks:
LayerNorm, fused ``qkv`` chunked in three and viewed as heads, ``scaled_dot_product_attention``,
a projection, and a GELU MLP, each added to the residual stream; the class token's final
LayerNorm feeds the classifier. Nothing in prunesearch knows this module: its groups are the
stream, each block's ``qkv`` (cut per head) and each MLP's hidden layer. No BatchNorm: the
screen's proxy is the post-prune loss after its short finetune (``steps: auto``). The base
model trains once per options and is cached (``workers.load_or_train``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.mixed_task import cached_digits_task
from workers import Task

DEFAULTS = {"seed": 0, "width": 48, "heads": 4, "depth": 2, "base_epochs": 20, "base_lr": 0.02}
PATCH = 4


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        # -1, not width // heads: the head width shrinks with the pruned qkv.
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        x = x + self.proj(attended)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, width: int, heads: int, depth: int, size: int = 16, classes: int = 10):
        super().__init__()
        tokens = (size // PATCH) ** 2
        self.patch = nn.Conv2d(1, width, PATCH, stride=PATCH)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, width))
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), patches], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def build(options: Mapping[str, Any]) -> Task:
    return cached_digits_task(
        options,
        DEFAULTS,
        lambda opts: TinyViT(int(opts["width"]), int(opts["heads"]), int(opts["depth"])),
        ("vit", 1),
    )
