"""Layers of a type Torch-Pruning has no pruner for, found by what their weights do.

A module that multiplies its inputs by a weight of its own without being an ``nn.Linear`` or
an ``nn.ConvNd``, nor a plain dense layer ``_dense`` prunes (GPT-2's ``Conv1D`` is one), is no
root of Torch-Pruning's: its output width roots no group, and its weight is held as a loose
parameter (a layer that masks or scales its product, say). GPT-2's discovery once listed none
of its twelve such layers, only "no prunable groups": a user read that nothing was searched,
not where or why. Each such layer is named with why, where no group already holds it.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from typing import Any

import torch_pruning as tp
from torch import nn

# Autograd nodes that multiply by a weight: matrix products and convolutions.
PRODUCTS = frozenset(
    {
        "AddmmBackward0",
        "MmBackward0",
        "BmmBackward0",
        "MvBackward0",
        "AddmvBackward0",
        "ConvolutionBackward0",
        "LinearBackward0",
    }
)
# Ops between a weight and its product that move no value (``x @ self.weight.t()``).
_VIEWS = frozenset(
    {
        "TBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "ViewBackward0",
        "ReshapeAliasBackward0",
        "UnsafeViewBackward0",
        "ExpandBackward0",
        "UnsqueezeBackward0",
        "ToCopyBackward0",
        "CloneBackward0",
    }
)
FOREIGN_REASON = (
    "multiplies its inputs by its own weight {attr!r} but is a layer type Torch-Pruning has no "
    "pruner for, so its output width is not searched (written as an nn.Linear or an nn.ConvNd, "
    "it would be)"
)


def foreign_layers(
    model: nn.Module, dg: tp.DependencyGraph, named: Container[str]
) -> list[tuple[str, str]]:
    """(module name, why) of each layer whose own weight (2-D or more) Torch-Pruning holds as
    a loose parameter feeding a product, unless ``named`` (a group's member, or already left
    out) holds it."""
    params = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, str] = {}
    for node in dg.module2node.values():
        if node.type != tp.ops.OPTYPE.PARAMETER or node.module.dim() < 2:
            continue
        name = params.get(id(node.module), "")
        owner, _, attr = name.rpartition(".")
        if not owner or owner in named or owner in found or not _multiplies(node):
            continue
        kind = type(model.get_submodule(owner)).__name__
        found[owner] = f"{kind}: {FOREIGN_REASON.format(attr=attr)}"
    return list(found.items())


def _multiplies(node: Any) -> bool:
    """Whether the parameter ``node`` feeds a product, through ops that move no value."""
    return any(kind in PRODUCTS for kind in _readers(node, depth=4))


def _readers(node: Any, depth: int) -> Iterator[str]:
    for out in node.outputs:
        kind = type(out.grad_fn).__name__ if out.grad_fn is not None else ""
        yield kind
        if kind in _VIEWS and depth > 1:
            yield from _readers(out, depth - 1)
