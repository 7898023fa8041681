"""Layers that token models write by hand, shared by the tests of discovery on them."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """As Llama's code writes it: a pooling over the channels of tokens, and a weight."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
