"""Architecture signatures: two models with the same shapes share one, whatever their weights."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


def architecture_signature(model: nn.Module) -> str:
    """Hash of every parameter's and buffer's name and shape.

    Latency depends only on the architecture, so this keys the latency cache: two plans that
    round to the same channel counts are measured once.
    """
    shapes = [(name, list(t.shape)) for name, t in _tensors(model)]
    # Grouped convolutions keep shapes but change cost; include their group counts.
    groups = [
        (n, m.groups) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)
    ]
    blob = json.dumps({"shapes": shapes, "groups": groups}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    items = list(model.state_dict(keep_vars=True).items())
    return [(n, t) for n, t in items if isinstance(t, torch.Tensor)]
