"""Small models shared by the test packages: architectures the product must handle generally."""

from __future__ import annotations

import torch
from torch import nn


class Encoder(nn.Module):
    """A transformer from torch.nn's own layers: fx cannot trace a TransformerEncoderLayer alone
    (its forward takes masks and branches on them), and nn.TransformerEncoder calls each layer
    with masks as keywords."""

    def __init__(self, norm_first: bool = True) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(8, 32), nn.Linear(32, 4)
        layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))
