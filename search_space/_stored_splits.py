"""Split sizes a module keeps in an attribute, written back when pruning changes them.

timm's ``MixedConv2d`` splits its input by sizes it stored when it was built
(``torch.split(x, self.splits, 1)``), one piece per kernel size. Torch-Pruning cuts each piece
and updates its own record of the split's sizes, but the module still splits by the old ones:
the pruned model failed ("split_with_sizes expects split_sizes to sum exactly"), so the dry run
left out every group such a split reads (most of MixNet).

Which attribute a split read is told by identity while the model is traced (the sizes passed
are the very list the module holds), or for one part size (GPT-2's ``c_attn(x).split(
self.split_size, dim=2)``: an int has no identity) by the calling line's ``self.<name>``;
which attributes may be written at all is told by the
module's own code (``split_size_attributes``: ``self.<name>`` passed to a split), which is also
what a pruned file may set (checked where no trace runs: loading a file).
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

_SPLITS = {torch.split, torch.Tensor.split, torch.Tensor.split_with_sizes}
_SPLIT_NAMES = {"split", "split_with_sizes"}

# (module name, attribute): a split read this module's attribute as its sizes.
Link = tuple[str, str]
Span = tuple[str, int, int]  # a call's file, first line and last line


def split_size_attributes(module: nn.Module) -> frozenset[str]:
    """The attributes ``module``'s own code passes to a split (``torch.split(x, self.splits,
    1)``, ``x.split(self.sizes, dim)``): the sizes a pruned model may hold smaller."""
    return _read_as_sizes(type(module))


@functools.cache
def _read_as_sizes(cls: type) -> frozenset[str]:
    found = {
        self_attribute(a)
        for _, call, _ in source_calls(cls, _SPLIT_NAMES)
        for a in [*call.args, *(k.value for k in call.keywords)]
    }
    found.discard("")
    return frozenset(found)


def source_calls(
    cls: type, names: set[str]
) -> Iterator[tuple[tuple[str, int, int], ast.Call, tuple[ast.AST, ...]]]:
    """The calls of a function or method named in ``names`` in the code of ``cls`` and its
    bases (not torch's own), each with (its file, first line, last line) there and the
    function it is made in, then those that one is defined in (where the names it passes were
    assigned: DistilBERT's ``shape(x)`` views by a width its ``forward`` computed)."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue  # torch's own modules store no sizes
        try:
            lines, start = inspect.getsourcelines(klass)
            path = inspect.getsourcefile(klass) or ""
            tree = ast.parse(textwrap.dedent("".join(lines)))
        except (OSError, TypeError, SyntaxError):  # no source (built in C, a REPL): none
            continue
        for scopes in _functions(tree, ()):
            for node in own_nodes(scopes[0]):
                if isinstance(node, ast.Call) and _called(node.func) in names:
                    last = node.end_lineno or node.lineno
                    yield (path, start + node.lineno - 1, start + last - 1), node, scopes


def _functions(node: ast.AST, outer: tuple[ast.AST, ...]) -> Iterator[tuple[ast.AST, ...]]:
    """Each function under ``node``, with the functions it is defined in: innermost first."""
    for child in ast.iter_child_nodes(node):
        inner = outer
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = (child, *outer)
            yield inner
        yield from _functions(child, inner)


def code_site(
    modules: set[int], sites: Callable[[type], Mapping[Span, Any]]
) -> tuple[nn.Module, Span, Any] | None:
    """The module (of ``modules``, by id) whose own code made the running torch call, the
    call's span there and what ``sites`` (by the module's class: span -> what) says of it; None
    where no module of them made it at a site ``sites`` names."""
    frame, depth = sys._getframe(1), 10
    while frame is not None and depth > 0:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in modules:
            here, line = frame.f_code.co_filename, frame.f_lineno
            return next(
                (
                    (owner, span, what)
                    for span, what in sites(type(owner)).items()
                    if span[0] == here and span[1] <= line <= span[2]
                ),
                None,
            )
        frame, depth = frame.f_back, depth - 1
    return None


def own_nodes(scope: ast.AST) -> Iterator[ast.AST]:
    """The nodes of a function's own code, not those of functions defined inside it."""
    for child in ast.iter_child_nodes(scope):
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from own_nodes(child)


def _called(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def self_attribute(node: ast.expr) -> str:
    """``name`` for ``self.name``, else ''."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.attr if node.value.id == "self" else ""
    return ""


class StoredSplits(TorchFunctionMode):
    """While a model is traced: each split whose sizes are a list or tuple a module holds in
    one of its ``split_size_attributes``, by its autograd node (Torch-Pruning's split op is
    made from that node)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._held: dict[int, Link] = {}
        self._names: dict[int, str] = {}  # modules whose code splits by a stored size
        for name, module in model.named_modules():
            for attr in split_size_attributes(module):
                self._names[id(module)] = name
                value = vars(module).get(attr)
                if isinstance(value, (list, tuple)) and len(value) > 1:
                    self._held[id(value)] = (name, attr)
        self.seen: dict[Any, Link] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SPLITS and self._names:
            sizes = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections")
            sizes = kwargs.get("split_sizes", sizes)
            where = self._held.get(id(sizes)) or self._stored_int(sizes)
            first = out[0] if isinstance(out, (list, tuple)) and out else None
            if where is not None and getattr(first, "grad_fn", None) is not None:
                self.seen[first.grad_fn] = where
        return out

    def _stored_int(self, sizes: Any) -> Link | None:
        """A part size passed as ``self.<name>`` (GPT-2's ``split(self.split_size, dim=2)``),
        told by the calling line: an int has no identity to be told by."""
        found = code_site(set(self._names), _int_sites) if isinstance(sizes, int) else None
        if found is None or getattr(found[0], found[2], None) != sizes:
            return None
        return self._names[id(found[0])], found[2]


@functools.cache
def _int_sites(cls: type) -> dict[Span, str]:
    """The split calls in ``cls``'s code passing a stored size, with its attribute."""
    found = {}
    for span, call, _ in source_calls(cls, _SPLIT_NAMES):
        attrs = [
            a for a in map(self_attribute, [*call.args, *(k.value for k in call.keywords)]) if a
        ]
        if attrs and span[0]:
            found[span] = attrs[0]
    return found


def split_links(dg: tp.DependencyGraph, seen: Mapping[Any, Link]) -> list[tuple[Any, Link]]:
    """Torch-Pruning's split ops of ``dg`` whose sizes a module attribute holds (``seen``)."""
    return [
        (node.module, seen[node.grad_fn])
        for node in dg.module2node.values()
        if isinstance(node.module, tp.ops._SplitOp) and node.grad_fn in seen
    ]


def write_back_splits(model: nn.Module, links: list[tuple[Any, Link]]) -> None:
    """Set each linked attribute to its split op's sizes as Torch-Pruning left them (the same
    container type: a list stays a list)."""
    for op, (name, attr) in links:
        module = model.get_submodule(name)
        old = getattr(module, attr)
        sizes = op.split_sizes
        if sizes is None:
            continue
        if isinstance(old, int):  # equal parts: each part's size
            if len(set(sizes)) == 1:
                setattr(module, attr, int(sizes[0]))
        elif len(sizes) == len(old):
            setattr(module, attr, type(old)(int(s) for s in sizes))
