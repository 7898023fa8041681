"""Depth: residual blocks a plan may drop whole (replaced by the identity), beside channel ratios.

Why: on small nets at small batches a layer's time is mostly per-op overhead, which no channel
ratio removes (colour_shapes' ResNet-20: uniform 0.75 removes 93 % of the MACs and still runs at
about half the base latency). A residual block ``y = x + f(x)`` can be dropped outright: the
network then computes ``y = x`` there, its ops gone. Found generally, not by class name: a module
is a residual block when tracing it alone (torch.fx) shows its output is an addition (through
trailing element-wise activations) one of whose operands is, through further additions only,
the module's own input, and its output has its input's shape. A stage of several blocks is not
one (its last addition adds the previous block's output, not the stage's input); a block with a
projection shortcut is not either (its addition adds the projection).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ._discovery import Discovery

_ADDS = {operator.add, operator.iadd, torch.add}
# Element-wise functions and modules that may follow a block's addition (post-activation).
_ACTIVATIONS = {torch.relu, nn.functional.relu, nn.functional.gelu, nn.functional.silu}
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Identity, nn.Dropout)


@dataclass(frozen=True)
class DroppableBlock:
    """A residual block: its qualified name, the prunable groups wholly inside it (gone with
    it), and the measured damage of dropping it alone (the task's loss rise after adaptive
    BatchNorm; 0.0 until measured)."""

    name: str
    groups: tuple[str, ...]
    damage: float = 0.0

    def to_list(self) -> list[Any]:
        return [self.name, list(self.groups), self.damage]

    @classmethod
    def from_list(cls, data: Iterable[Any]) -> DroppableBlock:
        name, groups, damage = data
        return cls(str(name), tuple(groups), float(damage))


def residual_blocks(
    model: nn.Module, example_inputs: Any, discovery: Discovery
) -> tuple[DroppableBlock, ...]:
    """Every innermost residual block of ``model`` (see the module's docstring), in module
    order, with the groups of ``discovery`` whose every member lies inside it. A module that fx
    cannot trace alone (data-dependent control flow) is not offered: nothing is dropped that is
    not proven to be ``x + f(x)``."""
    shapes = _shapes(model, example_inputs)
    names = [
        name
        for name, module in model.named_modules()
        if name and shapes.get(name) and _is_residual(module)
    ]
    # Innermost only: a stack of pre-norm blocks is itself x + (a sum of branches), but dropping
    # it whole is dropping every block in it; each block is offered, not the stack.
    names = [n for n in names if not any(o != n and _within(o, n) for o in names)]
    return tuple(
        DroppableBlock(
            n, tuple(g.name for g in discovery.groups if all(_within(m, n) for m in g.members))
        )
        for n in names
    )


def drop_blocks(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Replace each named module of ``model`` by the identity, in place; a name inside one
    already dropped is skipped."""
    dropped: list[str] = []
    for name in sorted(names, key=lambda n: n.count(".")):
        if any(_within(name, d) for d in dropped):
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
        dropped.append(name)
    return model


def _within(member: str, block: str) -> bool:
    return member == block or member.startswith(block + ".")


def _shapes(model: nn.Module, example_inputs: Any) -> dict[str, bool | None]:
    """For each module: True where one forward call took one tensor and returned a tensor of
    the same shape; None otherwise (several calls, several inputs, another shape)."""
    seen: dict[str, bool | None] = {}
    hooks = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple, out: Any) -> None:
            same = (
                len(args) == 1
                and isinstance(args[0], torch.Tensor)
                and isinstance(out, torch.Tensor)
                and out.shape == args[0].shape
            )
            seen[name] = None if name in seen or not same else True

        return record

    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            model(*args)
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _is_residual(module: nn.Module) -> bool:
    if not any(isinstance(m, nn.Conv2d | nn.Conv1d | nn.Linear) for m in module.modules()):
        return False
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - untraceable alone: not proven residual, not offered
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    outputs = [n for n in graph.nodes if n.op == "output"]
    if len(inputs) != 1 or len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
        return False
    node = outputs[0].args[0]
    modules = dict(module.named_modules())
    while _is_activation(node, modules):
        node = node.args[0]
    return _is_add(node) and any(_reaches(a, inputs[0]) for a in node.args)


def _is_activation(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_function" and node.target in _ACTIVATIONS:
        return isinstance(node.args[0], fx.Node)
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _ACTIVATION_MODULES)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node: Any) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in _ADDS)
        or (node.op == "call_method" and node.target in ("add", "add_", "__add__"))
    )


def _reaches(node: Any, source: fx.Node) -> bool:
    """``node`` is ``source``, or an addition one of whose operands reaches it."""
    if node is source:
        return True
    return _is_add(node) and any(_reaches(a, source) for a in node.args)
