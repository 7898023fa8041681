"""The allocator's profile of a model: each group's per-channel importance, and a cost model
of its layers.

``profile_groups`` gives the allocator what it needs of each group: per-channel importance
(first-order Taylor, averaged over training batches, unnormalised so that groups compare) and a
cost model of the layers (each Conv, Linear and recurrent layer's MACs and the groups that
prune its two sides: the prior of the latency model, refitted to measured latencies by the
orchestrator). ``block_damage`` scores each residual block dropped alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from search_space import (
    DensePruner,
    Discovery,
    DroppableBlock,
    GroupProfile,
    LayerCost,
    Profile,
    PruningPlan,
    call_model,
    copy_model,
    dense_layout,
    drop_blocks,
    flatten,
    residual_blocks,
)

from ._criteria import OwnMagnitude, calibrate, graded
from ._proxy import proxy_measures
from ._prune import apply_plan
from ._screen import Batches, adapt_batchnorm, proxy_batches
from ._trial import _base_model as base_model
from ._trial import _cached_task as cached_task
from ._trial import _reseed_loaders as reseed_loaders


def profile_job(
    job: Mapping[str, Any], base_state: Mapping[str, torch.Tensor] | None, discovery: Discovery
) -> Profile:
    """``profile_groups`` from plain values (the task by reference), as a Ray task runs it."""
    torch.manual_seed(int(job.get("seed", 0)))
    torch.set_num_threads(int(job.get("threads", 1)))
    task = cached_task(job["task"], json.dumps(job.get("task_options", {}), sort_keys=True))
    base = base_model(task, base_state)
    seed = int(job.get("seed", 0))
    profile = profile_groups(task, base, discovery, seed=seed)
    if not job.get("depth"):
        return profile
    slices = (int(job.get("bn_batches", 2)), int(job.get("score_batches", 4)))
    return replace(profile, blocks=block_damage(task, base, discovery, seed, *slices))


def profile_groups(
    task, base: nn.Module, discovery: Discovery, *, batches: int = 8, seed: int = 0
) -> Profile:
    """What the allocator needs (search_space.allocate): each group's channel importances, and
    each Conv/Linear layer's MACs with the groups that prune its output and input channels."""
    reseed_loaders(task, seed)
    data = [b for _, b in zip(range(batches), task.train_loader, strict=False)]
    found: dict[str, Any] = {}

    def read(model: nn.Module, pruner: tp.pruner.BasePruner) -> None:
        found["importance"] = _taylor(model, pruner, discovery, data, task.loss_fn)
        found["sides"] = _sides(model, pruner, discovery)
        raise _Collected

    names = discovery.names
    plan = PruningPlan(ratios=dict.fromkeys(names, 0.5), units={g: (g,) for g in names})
    with contextlib.suppress(_Collected), _quiet():
        apply_plan(base, task.example_inputs, plan, before_steps=read)
    groups = {}
    for g in discovery.groups:
        imp = found["importance"].get(g.name)
        if imp is None or len(imp) != g.channels:  # TP ranked it another way (heads): no preference
            imp = [1.0] * g.channels
        groups[g.name] = GroupProfile(g.channels, _by_slice(imp, g.split), g.split)
    layers = []
    for name, (macs, outputs) in _layer_work(base, task.example_inputs).items():
        layer, _, term = name.partition(":")
        out_group, in_group = found["sides"].get(layer, (None, None))
        if term == RECURRENT:  # hidden units read hidden units: both sides are its own group
            layers.append(LayerCost(name, macs, out_group, out_group))
            continue
        layers.append(LayerCost(name, macs, out_group, in_group))
        # What touches the layer's outputs alone (normalisation, activation, pooling, copies)
        # costs time too, memory-bound on a CPU: one more term, scaled by the outputs kept.
        layers.append(LayerCost(f"{name}:outputs", outputs, out_group, None))
    return Profile(groups, tuple(layers))


@torch.no_grad()
def block_damage(
    task, base: nn.Module, discovery: Discovery, seed: int, bn_batches: int, score_batches: int
) -> tuple[DroppableBlock, ...]:
    """Each residual block of ``base`` dropped alone, scored like a screened candidate (adaptive
    BatchNorm, the proxy's training slice): the loss rise over the base's, least first. Which
    blocks go matters: on colour_shapes (one seed, one finetune epoch) the two cheapest of seven
    dropped kept 0.919 accuracy, the four cheapest 0.596."""
    blocks = residual_blocks(base, task.example_inputs, discovery)
    if not blocks:
        return ()
    bn, score = proxy_batches(task, seed, bn_batches, score_batches)

    def loss(model: nn.Module) -> float:
        adapt_batchnorm(model, bn)
        return -proxy_measures(model, task, score)[0]

    ref = loss(copy_model(base))
    measured = [
        replace(b, damage=loss(drop_blocks(copy_model(base), [b.name])) - ref) for b in blocks
    ]
    return tuple(sorted(measured, key=lambda b: b.damage))


def _taylor(
    model: nn.Module,
    pruner: tp.pruner.BasePruner,
    discovery: Discovery,
    data: Batches,
    loss_fn: Callable[..., torch.Tensor],
) -> dict[str, list[float]]:
    """Per-channel |weight x gradient| summed over a group's layers, averaged over training
    batches. Per batch rather than on summed gradients: at a trained optimum the mean gradient
    is near zero, its per-batch spread is what says how much the loss leans on a channel."""
    imp = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    own = OwnMagnitude(taylor=True)  # groups TP's criteria read nothing of (embedding -> LSTM)
    names, sums = set(discovery.names), {}
    groups = [(n, grp) for n, grp in _named_groups(model, pruner) if n in names]
    for batch in data:
        calibrate(model, [], {"batch"}, [batch], loss_fn)
        for name, grp in groups:
            v = graded(imp, grp)
            if v is None and _reached(grp):
                v = own(grp)  # groups TP's criteria read nothing of
            elif v is None:  # out of the loss's reach: cutting it costs the loss nothing
                v = torch.zeros(discovery.group(name).channels)
            if v is None:
                continue
            sums[name] = sums.get(name, 0) + v.detach().abs()
    model.zero_grad(set_to_none=True)
    return {n: (v / max(1, len(data))).tolist() for n, v in sums.items()}


def _reached(group: Any) -> bool:
    """Some layer of ``group`` has a gradient (the task's loss reaches it)."""
    return any(
        isinstance(w := getattr(dep.target.module, "weight", None), nn.Parameter)
        and w.grad is not None
        for dep, _ in group
    )


def _by_slice(importance: list[float], split: int) -> tuple[float, ...]:
    """Per-channel importance as the pruner removes a group cut in ``split`` slices: the same
    index of every slice at once, ranked by their mean (as Torch-Pruning ranks them), so each
    channel carries its index's mean and ``split`` of them sum to what the removal loses."""
    if split <= 1:
        return tuple(importance)
    means = torch.tensor(importance, dtype=torch.float64).view(split, -1).mean(dim=0)
    return tuple(means.repeat(split).tolist())


def _sides(model: nn.Module, pruner: tp.pruner.BasePruner, discovery: Discovery) -> dict[str, list]:
    """Layer name -> [group pruning its outputs, group pruning its inputs]. A depthwise conv's
    input channels are its output channels: its work scales with them once, so no input side."""
    names, modules = set(discovery.names), {m: n for n, m in model.named_modules()}
    sides: dict[str, list] = {}
    for group_name, grp in _named_groups(model, pruner):
        if group_name not in names:
            continue
        for dep, _ in grp:
            layer = dep.target.module
            dense = isinstance(getattr(dep.handler, "__self__", None), DensePruner)
            if not (dense or isinstance(layer, _WORKING)) or layer not in modules:
                continue
            out = pruner.DG.is_out_channel_pruning_fn(dep.handler)
            depthwise = (
                isinstance(layer, nn.modules.conv._ConvNd) and 1 < layer.groups == layer.in_channels
            )
            entry = sides.setdefault(modules[layer], [None, None])
            if out:
                entry[0] = group_name
            elif not depthwise:
                entry[1] = group_name
    return sides


def _named_groups(model: nn.Module, pruner: tp.pruner.BasePruner) -> list[tuple[str | None, Any]]:
    module_names = {m: n for n, m in model.named_modules()}
    return [
        (module_names.get(grp[0].dep.target.module), grp)
        for grp in pruner.DG.get_all_groups(
            ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
        )
    ]


class _Collected(Exception):
    """Ends apply_plan once the profile is read: nothing is to be pruned."""


# The layers whose work the cost model counts; a recurrent layer's is two terms (below).
_WORKING = (nn.modules.conv._ConvNd, nn.Linear, nn.RNNBase, nn.Embedding)
RECURRENT = "recurrent"


@torch.no_grad()
def _layer_work(model: nn.Module, example_inputs: Any) -> dict[str, tuple[float, float]]:
    """MACs and output elements of every Conv, Linear, recurrent, embedding and dense layer (of
    a type Torch-Pruning does not know: ``dense_layout``) on one batch of ``example_inputs``.
    A recurrent layer's MACs that read its input are its own entry; those
    that read its hidden units (the recurrence, and every layer above the first) are
    ``<name>:recurrent``, which scale with its kept units twice."""
    work: dict[str, tuple[float, float]] = {}

    def add(name: str, macs: float, outputs: float) -> None:
        before = work.get(name, (0.0, 0.0))
        work[name] = (before[0] + macs, before[1] + outputs)

    def hook(name: str):
        def record(layer: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(layer, nn.RNNBase):
                _recurrent_work(layer, output, lambda term, m, o: add(name + term, m, o))
                return
            if isinstance(layer, nn.modules.conv._ConvNd):
                per_out = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
            elif isinstance(layer, nn.Embedding):
                per_out = 0  # a lookup: no MACs, its outputs' copy is all it costs
            elif isinstance(layer, nn.Linear):
                per_out = layer.in_features
            else:  # a dense layer of another type (GPT-2's Conv1D)
                per_out = layer.weight.numel() // output.shape[-1]
            add(name, float(output.numel() * per_out), float(output.numel()))

        return record

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, _WORKING) or dense_layout(m) is not None
    ]
    try:
        model.eval()
        call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return work


def _recurrent_work(layer: nn.RNNBase, output: Any, add: Callable[[str, float, float], None]):
    out = flatten(output)[0]  # the output sequence (a PackedSequence's data)
    hidden, dirs = layer.hidden_size, 2 if layer.bidirectional else 1
    gates = layer.weight_ih_l0.shape[0] // hidden
    steps = out.numel() / (hidden * dirs)  # batch x time, each direction
    per_unit = steps * dirs * gates  # MACs per (unit, input feature) pair
    add("", per_unit * hidden * layer.input_size, float(out.numel()))
    above = (layer.num_layers - 1) * hidden * dirs  # inputs of the layers above the first
    add(":" + RECURRENT, per_unit * hidden * (hidden * layer.num_layers + above), 0.0)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
