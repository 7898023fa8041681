"""Tasks: the seam users plug into. A task gives the model, example inputs and data.

A config names a task either as a built-in (``digits``) or as ``my_module:build``, a function
that takes the config's ``task_options`` dict and returns a :class:`Task`.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader

from ._inputs import batch_size_of
from ._io import unwrap_model
from ._task_roots import (
    ENTRY_POINT_GROUP,
    entry_point_tasks,
    guarded,
    import_trusted,
    trusted_file,
)

CACHE_VAR = "PRUNESEARCH_CACHE"  # overrides cache_dir()
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def cache_dir() -> Path:
    """Where base models and sensitivity scans are cached: ``$PRUNESEARCH_CACHE``, else the user's
    cache directory (``~/.cache/prunesearch`` on Linux), so a run from any directory finds what
    an earlier one trained instead of silently training again."""
    override = os.environ.get(CACHE_VAR)
    return Path(override) if override else Path(platformdirs.user_cache_dir("prunesearch"))


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
    """Turn a task reference into its build function, or raise naming the fix.

    A config names code, so a reference resolves only to trusted code: a built-in task, an
    entry point of the installed group ``prunesearch.tasks``, or ``module:function`` whose
    module lies under a task root (the config's directory, the current directory, PYTHONPATH
    entries) and not in the standard library or site-packages. Nothing is imported until the
    module's file is found there, so ``subprocess:run`` or ``os:system`` never run."""
    builtins = _builtin_tasks()
    if ref in builtins:
        return builtins[ref]
    entry = entry_point_tasks().get(ref)
    if entry is not None:
        return guarded(ref, "loading its entry point", entry.load)
    if ":" not in ref:
        names = [*builtins, *entry_point_tasks()]
        close = difflib.get_close_matches(ref, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"task: {ref!r} is neither a built-in task {sorted(builtins)}, an installed "
            f"{ENTRY_POINT_GROUP} entry point, nor 'module:function'.{hint}"
        )
    module_name, _, attr = ref.partition(":")
    if not _MODULE.fullmatch(module_name) or not attr.isidentifier():
        raise ValueError(
            f"task: {ref!r} is not 'module:function' (a dotted module name, a colon, a function "
            "name); write e.g. my_task:build"
        )
    module = import_trusted(ref, module_name)
    build = getattr(module, attr, None)
    if not callable(build):
        raise ValueError(f"task: {module_name!r} has no function {attr!r}")
    origin = sys.modules.get(getattr(build, "__module__", None) or "")
    if origin is None or trusted_file(getattr(origin, "__file__", None)) is None:
        raise ValueError(
            f"task: {ref!r} is not defined in your project (it comes from "
            f"{getattr(build, '__module__', '?')!r}); point task at a function your module defines"
        )
    return build


def build_task(ref: str, options: Mapping[str, Any] | None = None) -> Task:
    factory = resolve_task(ref)
    if ref in _builtin_tasks():  # our own code: its progress goes straight to the terminal
        task = factory(dict(options or {}))
    else:
        task = guarded(ref, "building the task", lambda: factory(dict(options or {})))
    if not isinstance(task, Task):
        raise ValueError(f"task: {ref} returned {type(task).__name__}, expected workers.Task")
    check_task(task, ref)
    model = unwrap_model(task.model)
    if model is not task.model:
        warnings.warn(
            f"task: {ref}: the model is a {type(task.model).__name__} wrapper; prunesearch "
            f"searches the {type(model).__name__} it wraps, and its pruned files load onto "
            "either (compile or wrap the chosen model again after load_pruned)",
            stacklevel=2,
        )
        task.model = model
    bake_pruning_masks(task.model, ref)
    return task


def bake_pruning_masks(model: nn.Module, ref: str) -> list[str]:
    """Make ``torch.nn.utils.prune``'s masks on ``model`` permanent (``prune.remove``: the
    weight becomes ``weight_orig * weight_mask``, the model computes what it did), warning which.

    Why: a model pruned unstructured before (the weight recomputed from ``weight_orig`` and a
    mask by a forward pre-hook) had no groups Torch-Pruning could see, and pruning it failed
    with a bare ``min() arg is an empty sequence``."""
    baked = []
    for name, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
                baked.append(f"{name}.{hook._tensor_name}" if name else hook._tensor_name)
    if baked:
        warnings.warn(
            f"task: {ref}: torch.nn.utils.prune masks made permanent on {baked[:5]}"
            f"{' ...' if len(baked) > 5 else ''} (weight = weight_orig * weight_mask), so "
            "the layers can be pruned structurally; the model computes what it did",
            stacklevel=2,
        )
    return baked


def check_task(task: Task, ref: str) -> None:
    """Refuse, naming the fix, a task no trial could run: empty data, or example inputs that are
    not a batch of the training data. Reads lengths and the first sample only: no loader is
    iterated (that would move a shuffling loader's random state)."""
    if not isinstance(task.model, nn.Module):
        raise ValueError(
            f"task: {ref} gave model {type(task.model).__name__}; give the trained torch.nn.Module"
        )
    if isinstance(task.model, torch.jit.ScriptModule):
        raise ValueError(
            f"task: {ref} gave a TorchScript module ({type(task.model).__name__}), which "
            "Torch-Pruning can neither trace nor prune; give the nn.Module before "
            "torch.jit.script / torch.jit.trace (script the chosen model after load_pruned)"
        )
    if not any(p.requires_grad for p in task.model.parameters()):
        raise ValueError(
            f"task: {ref} gave a model whose parameters are all frozen (requires_grad=False), so "
            "finetuning cannot recover a pruned model; unfreeze them (model.requires_grad_(True))"
        )
    for name in ("train_loader", "val_loader"):
        loader = getattr(task, name)
        if loader is None or not hasattr(loader, "__iter__"):
            raise ValueError(
                f"task: {ref} gave {name} {type(loader).__name__}; give a torch DataLoader "
                "(an iterable of (inputs, targets) batches)"
            )
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
    try:
        batch_size_of(x)
    except TypeError as exc:
        raise ValueError(f"task: {ref} gave {exc}") from exc
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
