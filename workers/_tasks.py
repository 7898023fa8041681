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
    example_inputs: Any  # one batch the model accepts (batch dim first); used for tracing and latency
    train_loader: DataLoader
    val_loader: DataLoader
    # evaluate(model, loader) -> score in [0, 1], higher is better. Default: top-1 accuracy.
    evaluate: Callable[[nn.Module, DataLoader], float] | None = None
    loss_fn: Callable[..., torch.Tensor] = nn.functional.cross_entropy


def _builtin_tasks() -> dict[str, Callable[[Mapping[str, Any]], Task]]:
    from ._digits import build_digits

    return {"digits": build_digits}


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
        raise ValueError(f"task: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from exc
    build = getattr(module, attr, None)
    if not callable(build):
        raise ValueError(f"task: {module_name!r} has no function {attr!r}")
    return build


def build_task(ref: str, options: Mapping[str, Any] | None = None) -> Task:
    task = resolve_task(ref)(dict(options or {}))
    if not isinstance(task, Task):
        raise ValueError(f"task: {ref} returned {type(task).__name__}, expected workers.Task")
    return task
