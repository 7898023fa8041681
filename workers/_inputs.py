"""A model's inputs as a task gives them: one tensor, or a tuple, list or dict of them (a model
that takes an image and a vector of features, or keyword inputs). Every place that moves,
batches or slices inputs goes through these, so a model of several inputs trains, is scored
and is timed like a model of one (``search_space.call_model`` calls it with them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def tree_map(fn: Callable[[torch.Tensor], Any], x: Any) -> Any:
    """``x`` with ``fn`` applied to every tensor in it (tuples, lists and dicts kept as such)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(tree_map(fn, v) for v in x)
    return x


def tensors(x: Any) -> list[torch.Tensor]:
    """Every tensor in ``x``, in order."""
    found: list[torch.Tensor] = []
    tree_map(found.append, x)
    return found


def to_device(x: Any, device: torch.device | str) -> Any:
    return tree_map(lambda t: t.to(device), x)


def take(x: Any, i: int) -> Any:
    """Sample ``i`` of a batch, its batch dimension kept."""
    return tree_map(lambda t: t[i : i + 1], x)


def batch_size_of(x: Any) -> int:
    """The batch dimension shared by the inputs' tensors."""
    found = tensors(x)
    if not found or any(t.dim() == 0 for t in found):
        raise TypeError(
            "example_inputs must be a tensor, or a tuple, list or dict of tensors, each with a "
            "batch dimension first"
        )
    return int(found[0].shape[0])
