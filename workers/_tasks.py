"""Tasks: the seam users plug into. A task gives the model, example inputs and data.

A config names a task either as a built-in (``digits``) or as ``my_module:build``, a function
that takes the config's ``task_options`` dict and returns a :class:`Task`.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass
class Task:
    model: nn.Module  # the trained base model
    example_inputs: (
        Any  # one batch the model accepts (batch dim first); used for tracing and latency
    )
    train_loader: DataLoader
    val_loader: DataLoader
    # evaluate(model, loader) -> score in [0, 1], higher is better. Default: top-1 accuracy.
    evaluate: Callable[[nn.Module, DataLoader], float] | None = None
    loss_fn: Callable[..., torch.Tensor] = nn.functional.cross_entropy


def _builtin_tasks() -> dict[str, Callable[[Mapping[str, Any]], Task]]:
    from ._colour_shapes import build_colour_shapes
    from ._digits import build_digits
    from ._shifted_digits import build_shifted_digits

    return {
        "digits": build_digits,
        "shifted_digits": build_shifted_digits,
        "colour_shapes": build_colour_shapes,
    }


def resolve_task(ref: str) -> Callable[[Mapping[str, Any]], Task]:
    """Turn a task reference into its build function, or raise naming the fix."""
    builtins = _builtin_tasks()
    if ref in builtins:
        return builtins[ref]
    if ":" not in ref:
        close = difflib.get_close_matches(ref, builtins, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"task: {ref!r} is neither a built-in task {sorted(builtins)} nor 'module:function'.{hint}"
        )
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"task: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?"
        ) from exc
    build = getattr(module, attr, None)
    if not callable(build):
        raise ValueError(f"task: {module_name!r} has no function {attr!r}")
    return build


def build_task(ref: str, options: Mapping[str, Any] | None = None) -> Task:
    task = resolve_task(ref)(dict(options or {}))
    if not isinstance(task, Task):
        raise ValueError(f"task: {ref} returned {type(task).__name__}, expected workers.Task")
    check_task(task, ref)
    return task


def check_task(task: Task, ref: str) -> None:
    """Refuse, naming the fix, a task no trial could run: empty data, or example inputs that are
    not a batch of the training data. Reads lengths and the first sample only: no loader is
    iterated (that would move a shuffling loader's random state)."""
    for name in ("train_loader", "val_loader"):
        loader = getattr(task, name)
        try:
            batches = len(loader)
        except TypeError:  # an iterable dataset: its length is unknown until it is read
            continue
        if batches == 0:
            raise ValueError(
                f"task: {ref} gave an empty {name} (0 batches); give it data (check the "
                "dataset's path and filters, and batch_size with drop_last=True)"
            )
    x, sample = task.example_inputs, _first_sample(task.train_loader)
    if (
        isinstance(x, torch.Tensor)
        and sample is not None
        and tuple(x.shape[1:]) != tuple(sample.shape)
    ):
        batch = ", ".join(["N", *(str(d) for d in sample.shape)])
        raise ValueError(
            f"task: {ref} gave example_inputs of shape {tuple(x.shape)}, but a batch of its training samples "
            f"has shape ({batch}); make example_inputs one batch of them, batch dimension first "
            "(e.g. train_dataset[0][0].unsqueeze(0))"
        )


def _first_sample(loader: Any) -> torch.Tensor | None:
    """The input tensor of a map-style dataset's first sample, when the loader batches it as is."""
    from torch.utils.data import default_collate

    dataset = getattr(loader, "dataset", None)
    if getattr(loader, "collate_fn", None) is not default_collate or not hasattr(
        dataset, "__getitem__"
    ):
        return None  # a custom collate may reshape samples into batches
    try:
        if len(dataset) == 0:
            return None
        item = dataset[0]
    except Exception:  # an iterable or lazily failing dataset: the trial will say what is wrong
        return None
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    return item if isinstance(item, torch.Tensor) else None
