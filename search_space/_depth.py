"""Depth: residual blocks a plan may drop whole (replaced by the identity), beside channel ratios.

Why: on small nets at small batches a layer's time is mostly per-op overhead, which no channel
ratio removes (colour_shapes' ResNet-20: uniform 0.75 removes 93 % of the MACs and still runs at
about half the base latency). A residual block ``y = x + f(x)`` can be dropped outright: the
network then computes ``y = x`` there, its ops gone. Found generally, not by class name: a module
is a residual block when tracing it alone (torch.fx) shows its output is an addition (through
trailing element-wise activations) one of whose operands is, through further additions only,
the module's own input, and its output has its input's shape. A stage of several blocks is not
one (its last addition adds the previous block's output, not the stage's input); a block with a
projection shortcut is not either (its addition adds the projection). Residuals written in a
parent's own forward (``x = x + self.attn(x)``), with no module of their own, are found and
dropped by ``_branches``; both kinds are offered side by side.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ._branches import (
    drop_branches,
    find_branches,
    is_activation,
    is_add,
    is_branch,
    parse,
    within,
)
from ._discovery import Discovery
from ._parametrized import copy_model


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
    order, then every residual branch written in a parent's forward (``_branches``), with the
    groups of ``discovery`` whose every member lies inside it. A module that fx cannot trace
    alone (data-dependent control flow) is not offered, and a block or a branch is offered only
    once the model ran without it: nothing is dropped that is not proven to be ``x + f(x)``."""
    shapes = _shapes(model, example_inputs)
    found = [
        name
        for name, module in model.named_modules()
        if name and shapes.get(name) and _is_residual(module)
    ]
    # Innermost only: a stack of pre-norm blocks is itself x + (a sum of branches), but dropping
    # it whole is dropping every block in it; each block is offered, not the stack.
    names = [n for n in found if not any(o != n and within(o, n) for o in found)]
    branches = find_branches(model, example_inputs, skip=found)
    reference = _out_shapes(model, example_inputs) if names or branches else None
    # A block's caller may read it, not only call it: torch.nn's TransformerEncoder reads its
    # first layer's ``self_attn`` on every call, so that layer dropped broke every candidate.
    names = [n for n in names if _runs_without(model, n, example_inputs, reference)]
    for b in branches:
        inner = [*found, *(o.parent for o in branches if o is not b)]
        if not any(within(o, m) for o in inner for m in b.modules) and _drops(
            model, b.name, example_inputs, reference
        ):
            names.append(b.name)
    return tuple(
        DroppableBlock(
            n, tuple(g.name for g in discovery.groups if all(_inside(m, n) for m in g.members))
        )
        for n in names
    )


class Skip(nn.Identity):
    """What a dropped block becomes: its input, whatever else its caller passes (torch.nn's
    TransformerEncoder calls its layers with masks as keywords, which nn.Identity refuses)."""

    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: A002 - nn.Identity's name
        return input


# torch.nn's own layers that compute ``x + f(x)`` but that fx cannot prove it of alone (their
# forward takes masks beside the input and branches on them): each with the condition on its
# settings under which it is a residual. A post-norm TransformerEncoderLayer computes
# norm(x + f(x)): not a residual; dropping it would remove its norms too.
KNOWN_RESIDUALS: dict[type[nn.Module], Any] = {
    nn.TransformerEncoderLayer: lambda m: bool(m.norm_first),  # x + sa(n1(x)) + ff(n2(x + ...))
}


def drop_blocks(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Replace each named module of ``model`` by the identity, in place, and rewrite each named
    branch's parent without it; a name inside a module already dropped is skipped."""
    names = list(names)
    dropped: list[str] = []
    for name in sorted((n for n in names if not is_branch(n)), key=lambda n: n.count(".")):
        if any(within(name, d) for d in dropped):
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, Skip())
        dropped.append(name)
    branches = [
        n for n in names if is_branch(n) and not any(within(parse(n)[0], d) for d in dropped)
    ]
    if branches:
        drop_branches(model, branches)
    return model


def dropped_modules(names: Iterable[str]) -> set[str]:
    """The modules a plan's dropped blocks replace by the identity."""
    return {m for n in names for m in (parse(n)[1] if is_branch(n) else (n,))}


def _inside(member: str, block: str) -> bool:
    """``member`` (a module's name) lies in ``block`` (a module, or a branch's modules)."""
    return any(within(member, m) for m in dropped_modules([block]))


def _drops(model: nn.Module, name: str, example_inputs: Any, reference: Any) -> bool:
    """Dropping ``name`` on a copy of ``model`` gives a model that runs, to ``reference``, the
    model's own output shapes."""
    try:
        dropped = drop_blocks(copy_model(model), [name])
        return _out_shapes(dropped, example_inputs) == reference
    except Exception:  # noqa: BLE001 - a branch that will not drop cleanly is not offered
        return False


def _runs_without(model: nn.Module, name: str, example_inputs: Any, reference: Any) -> bool:
    """``model`` with module ``name`` swapped for the identity runs, to ``reference``, its own
    output shapes (swapped in place and back: no copy of the model per block)."""
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    block = getattr(owner, leaf)
    setattr(owner, leaf, Skip())
    try:
        return _out_shapes(model, example_inputs) == reference
    except Exception:  # noqa: BLE001 - a block its caller cannot do without is not offered
        return False
    finally:
        setattr(owner, leaf, block)


def _out_shapes(model: nn.Module, example_inputs: Any) -> Any:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            out = model(*args)
    finally:
        model.train(was)
    return torch.utils._pytree.tree_map(
        lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else t, out
    )


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
    known = KNOWN_RESIDUALS.get(type(module))
    if known is not None:
        return known(module)
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
    while is_activation(node, modules):
        node = node.args[0]
    return is_add(node) and any(_reaches(a, inputs[0]) for a in node.args)


def _reaches(node: Any, source: fx.Node) -> bool:
    """``node`` is ``source``, or an addition one of whose operands reaches it."""
    if node is source:
        return True
    return is_add(node) and any(_reaches(a, source) for a in node.args)
