"""Residual branches written in a parent's own forward: ``x = x + f(x)`` where ``f`` is a few
child modules called in place, not one module of its own (hand-written models often read so:
``x = x + self.attn(x, x, x)[0]``, ``x = relu(x + self.pw(self.dw(x)) * self.se(...))``).

Found generally, by reading each module's forward alone with every child a leaf (torch.fx): an
addition ``s + v`` is a branch when ``v`` is computed from ``s`` alone (through any ops, the
module's own parameters allowed), nothing computed for ``v`` is used anywhere else, at least one
child it calls holds a Conv/Linear, each of those children is called nowhere else, and the
addition keeps ``s``'s shape (checked on the module's real inputs). Dropping it rewrites that
forward so the addition gives ``s`` (the branch's ops gone) and replaces the branch's children by
the identity (their tensors gone). The rewrite lives on the module instance: its class and every
other module are untouched, so a plan's drop list rebuilds it on a fresh copy of the base model.

A branch is named ``branch:<parent>:<child>+<child>...`` (the children's qualified names, in
call order): stable across runs of the same code, and readable in MLflow.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

PREFIX = "branch:"
ADDS = {operator.add, operator.iadd, torch.add}
# Element-wise functions and modules that may follow a block's addition (post-activation).
ACTIVATIONS = {torch.relu, nn.functional.relu, nn.functional.gelu, nn.functional.silu}
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Identity, nn.Dropout)
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Branch:
    parent: str  # the module whose forward holds the addition ("" for the model itself)
    modules: tuple[str, ...]  # the branch's children, qualified, in call order

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.parent}:{'+'.join(self.modules)}"


def is_branch(name: str) -> bool:
    return name.startswith(PREFIX)


def parse(name: str) -> tuple[str, tuple[str, ...]]:
    """``(parent, children)`` of a branch's name."""
    parent, _, children = name[len(PREFIX) :].partition(":")
    return parent, tuple(children.split("+"))


class _OwnForward(fx.Tracer):
    """Traces one module's forward only: every child is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def find_branches(model: nn.Module, example_inputs: Any, skip: Iterable[str] = ()) -> list[Branch]:
    """Every residual branch in the forward of a module of ``model`` (torch.nn's own modules
    and containers aside, and any module in ``skip`` or inside one)."""
    skip = tuple(skip)
    was = model.training
    model.eval()  # BatchNorm must not learn from the example inputs, nor dropout fire
    try:
        try:
            calls = _inputs(model, example_inputs)
        except Exception:  # noqa: BLE001 - inputs this reading cannot pass: no branch offered
            return []
        found = []
        for name, module in model.named_modules():
            if name in calls and not _library(module) and not any(within(name, s) for s in skip):
                found += _in_module(name, module, calls[name])
    finally:
        model.train(was)
    return found


def drop_branches(model: nn.Module, names: Iterable[str]) -> None:
    """Rewrite each named branch's parent so the branch is gone (all of one parent at once)."""
    by_parent: dict[str, set[tuple[str, ...]]] = {}
    for name in names:
        parent, children = parse(name)
        by_parent.setdefault(parent, set()).add(children)
    for parent, wanted in by_parent.items():
        module = model.get_submodule(parent) if parent else model
        graph = _OwnForward().trace(module)
        hits = [(a, s, b) for a, s, b in _additions(graph, parent, module) if b.modules in wanted]
        if len(hits) != len(wanted):
            missing = wanted - {b.modules for _, _, b in hits}
            raise ValueError(f"no residual branch {sorted(missing)} in the forward of {parent!r}")
        # Which operand is the stream, fixed before any rewrite: a later branch's stream may be
        # an earlier branch's addition, which the rewrite replaces by that one's stream.
        sides = [(add, 0 if add.args[0] is stream else 1) for add, stream, _ in hits]
        for add, side in sides:
            add.replace_all_uses_with(add.args[side])
            graph.erase_node(add)
        rewritten = fx.GraphModule(module, graph)
        rewritten.graph.eliminate_dead_code()  # the branch's ops, now unread
        # ...and its modules: else the rewritten forward keeps the dropped branch alive (its
        # memory, and what a copy or a pickle of the model carries).
        rewritten.delete_all_unused_submodules()
        rewritten.recompile()
        # The instance's forward, not the class's: other instances keep theirs. The children it
        # calls are the module's own objects, so pruning and loading reach them as before.
        module.forward = rewritten.forward
        for _, _, branch in hits:
            for child in branch.modules:
                holder, _, leaf = child.rpartition(".")
                setattr(model.get_submodule(holder) if holder else model, leaf, nn.Identity())


def _in_module(name: str, module: nn.Module, args: tuple) -> list[Branch]:
    try:
        graph = _OwnForward().trace(module)
        gm = fx.GraphModule(module, graph)
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception:  # noqa: BLE001 - a forward fx cannot read alone offers no branch
        return []
    found = []
    for add, stream, branch in _additions(graph, name, module):
        out = add.args[1] if add.args[0] is stream else add.args[0]
        if _shape(add) is not None and _shape(add) == _shape(stream) == _shape(out):
            found.append(branch)  # not a broadcast: the branch has the stream's shape
    return found


def _additions(
    graph: fx.Graph, parent: str, module: nn.Module
) -> Iterator[tuple[fx.Node, fx.Node, Branch]]:
    """Each addition of ``graph`` that adds a branch to a stream, with both and the branch."""
    called = [n.target for n in graph.nodes if n.op == "call_module"]
    children = dict(module.named_modules())
    for node in graph.nodes:
        if not is_add(node) or len(node.args) != 2 or node.kwargs:
            continue
        for stream, out in (node.args, node.args[::-1]):
            body = _body(out, stream, node)
            if body is None:
                continue
            targets = [str(n.target) for n in graph.nodes if n in body and n.op == "call_module"]
            if any(called.count(t) != 1 for t in targets) or not any(
                isinstance(m, _WEIGHTED) for t in targets for m in children[t].modules()
            ):
                continue
            qualified = tuple(f"{parent}.{t}" if parent else t for t in targets)
            yield node, stream, Branch(parent, qualified)
            break


def _body(out: Any, stream: Any, add: fx.Node) -> set[fx.Node] | None:
    """The nodes computing ``out`` from ``stream`` alone, used by nothing outside them but
    ``add``; None when ``out`` reads anything else (another input, an earlier tensor)."""
    if not isinstance(out, fx.Node) or not isinstance(stream, fx.Node) or out is stream:
        return None
    body: set[fx.Node] = set()
    todo, reached = [out], False
    while todo:
        node = todo.pop()
        if node is stream:
            reached = True
            continue
        if node in body or node.op == "get_attr":
            continue
        if node.op in ("placeholder", "output"):
            return None
        body.add(node)
        todo += node.all_input_nodes
    if not reached:
        return None
    for node in body:
        allowed = {add} if node is out else body
        if any(user not in allowed and not _dead(user) for user in node.users):
            return None
    return body


def _dead(node: fx.Node) -> bool:
    """A value nothing reads (the unused half of ``out, _ = attn(...)``)."""
    return not node.users and node.op in ("call_function", "call_method")


def is_activation(node: fx.Node, children: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_function" and node.target in ACTIVATIONS:
        return isinstance(node.args[0], fx.Node)
    if node.op == "call_module":
        return isinstance(children.get(str(node.target)), ACTIVATION_MODULES)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def is_add(node: Any) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in ADDS)
        or (node.op == "call_method" and node.target in ("add", "add_", "__add__"))
    )


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _library(module: nn.Module) -> bool:
    """torch.nn's own modules (their forwards hold no residual of the user's) and containers."""
    return type(module).__module__.startswith("torch.nn")


def within(name: str, outer: str) -> bool:
    """``name`` is the module ``outer`` or lies inside it."""
    return name == outer or name.startswith(outer + ".")


def _inputs(model: nn.Module, example_inputs: Any) -> dict[str, tuple]:
    """Each module's positional inputs on one forward of ``example_inputs``, for modules called
    exactly once with positional tensors only."""
    seen: dict[str, tuple | None] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            plain = not kwargs and all(isinstance(a, torch.Tensor) for a in args)
            seen[name] = None if name in seen or not plain else tuple(a.detach() for a in args)

        return record

    handles = [
        m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in model.named_modules()
    ]
    try:
        with torch.no_grad():
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return {n: a for n, a in seen.items() if a is not None}
