"""Sizes a module keeps in attributes and reshapes by, refitted after a prune.

timm's attention reshapes its fused projection by sizes it stored when it was built
(``qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)``, and ``reshape(B, N,
self.attn_dim)`` after), so a pruned width no longer fits ("shape '[2, 6, 3, 4, 8]' is invalid
for input of size 1008") and the dry run left such projections out. The search cuts a layer
viewed as heads per head (each head keeps as many channels as the others, at the same places),
so the innermost stored size of such a reshape is what shrinks: the head's width.

Which attributes a reshape reads is told by the module's own code (``self.<name>`` passed to a
``view`` or ``reshape`` at that call, or in a shape the function built before it); which call
is running is told by the caller's line. A stored size is changed only where the reshape no
longer fits and one integer makes it fit, and only a width (every dim after it one the prune
left alone); a ``-1`` keeps what it resolved to where it counts dims the prune left alone (the
tokens) or heads of a stored width.

Separate layers viewed by one stored size (BERT's query, key and value, each by
``self.attention_head_size``) must keep one width: they are tied into one group as the graph
is built (``viewed_layers_tied``), and a refitted model runs again to check that each view
reading the size still views as before (else ``UnfitSize`` names the attribute and the line).

Heads of a literal width counted by a ``-1`` (``reshape(B, T, -1, 8)``) have nothing to refit:
a per-head cut ran as fewer, wider heads mixing the old ones, silently another model. Every view
of that form is recorded before a prune and ``FitViews.mixed`` names the ones whose count the
prune changed (the dry run then leaves the layer out).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import itertools
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from ._stored_splits import code_site, own_nodes, self_attribute, source_calls

_VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape}
_VIEW_NAMES = {"view", "reshape"}


class Stored(NamedTuple):
    """A size a view reads from its module: ``self.<attr>``, or ``self.<attr> // self.<per>``
    through a local (DistilBERT's ``dim_per_head = self.dim // self.n_heads``)."""

    attr: str
    per: str = ""

    def read(self, module: nn.Module) -> Any:
        value = getattr(module, self.attr, None)
        divisor = getattr(module, self.per, None) if self.per else 1
        ints = isinstance(value, int) and isinstance(divisor, int) and divisor > 0
        return value // divisor if ints else None

    def write(self, module: nn.Module, value: int) -> None:
        setattr(module, self.attr, value * getattr(module, self.per) if self.per else value)

    def __str__(self) -> str:
        return f"{self.attr} // {self.per}" if self.per else self.attr


def view_size_attributes(module: nn.Module) -> frozenset[str]:
    """The attributes ``module``'s own code passes as sizes to a ``view`` or ``reshape``: the
    sizes a pruned model may hold smaller."""
    return frozenset(s.attr for sites in _sites(type(module)).values() for s in sites.values())


@functools.cache
def _sites(cls: type) -> dict[tuple[str, int, int], dict[int, Stored]]:
    """(file, first line, last line) of each ``view``/``reshape`` call in ``cls``'s code that
    passes stored sizes -> the size at each shape position (counted from the end, < 0, after
    sizes of a length the code does not say: ``view(*x.shape[:-1], -1, self.head_dim)``)."""
    found: dict[tuple[str, int, int], dict[int, Stored]] = {}
    for span, call, scopes in source_calls(cls, _VIEW_NAMES):
        stored = _positions(_shape_args(call, scopes), call, scopes)
        if stored and span[0]:
            found[span] = stored
    return found


def _shape_args(call: ast.Call, scopes: tuple[ast.AST, ...]) -> list[ast.expr]:
    """The shape a ``view``/``reshape`` call passes: its arguments, or the one tuple it passes
    (``torch.reshape(x, shape)``: the second), read through a name the function assigned it to
    (Hugging Face: ``hidden_shape = (*input_shape, -1, self.head_dim)``, then
    ``view(hidden_shape)``; ``x.size()[:-2] + (self.all_head_size,)``)."""
    args = list(call.args)
    if isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", "") == "torch":
        args = args[1:]
    if len(args) != 1:
        return args
    one = args[0].value if isinstance(args[0], ast.Starred) else args[0]  # view(*shape)
    shape = _assigned(one, call, scopes)
    if isinstance(shape, (ast.Tuple, ast.List)):
        return list(shape.elts)
    if isinstance(shape, ast.BinOp) and isinstance(shape.op, ast.Add):
        right = _assigned(shape.right, call, scopes)
        if isinstance(right, (ast.Tuple, ast.List)):  # a prefix of unknown length, then these
            return [ast.Starred(value=shape.left), *right.elts]
    return args


def _assigned(node: ast.expr, call: ast.Call, scopes: tuple[ast.AST, ...]) -> ast.expr:
    """What a plain name was last assigned before ``call`` in the function it is made in, or
    else in one that function is defined in (the node itself where it is no name, or where it
    is assigned otherwise)."""
    if not isinstance(node, ast.Name):
        return node
    for scope in scopes:
        value, line = None, 0
        for stmt in own_nodes(scope):
            names = [getattr(t, "id", None) for t in getattr(stmt, "targets", ())]
            if (
                isinstance(stmt, ast.Assign)
                and names == [node.id]
                and line < stmt.lineno < call.lineno
            ):
                value, line = stmt.value, stmt.lineno
        if value is not None:
            return value
    return node


def _positions(
    args: list[ast.expr], call: ast.Call, scopes: tuple[ast.AST, ...]
) -> dict[int, Stored]:
    """Shape position -> the stored size passed there, among ``args``: counted from the start
    before any ``*sizes``, from the end (< 0) after the last one."""
    starred = [i for i, a in enumerate(args) if isinstance(a, ast.Starred)]
    out: dict[int, Stored] = {}
    for i, arg in enumerate(args):
        if starred and starred[0] < i and i < starred[-1]:
            continue  # between two *sizes: no position the code fixes
        position = i - len(args) if starred and i > starred[-1] else i
        if size := _stored(_assigned(arg, call, scopes)):
            out[position] = size
    return out


def _stored(node: ast.expr) -> Stored | None:
    """``self.a`` or ``self.a // self.b`` as a stored size; None for anything else."""
    if attr := self_attribute(node):
        return Stored(attr)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.FloorDiv):
        attr, per = self_attribute(node.left), self_attribute(node.right)
        return Stored(attr, per) if attr and per else None
    return None


class _Views(TorchFunctionMode):
    """Runs ``on_view(tensor, shape, caller)`` for each ``view``/``reshape`` a module of
    ``model`` calls with stored sizes (``caller``: the module, the call with its turn, its
    stored sizes by position); what it returns, if anything, replaces the call's shape. Views
    of heads of a literal width go to ``on_literal`` (``call``: the model's line, its turn)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._modules = {id(m) for m in model.modules()}
        self._calls: dict[Any, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VIEWS and not kwargs and isinstance(args[0], torch.Tensor):
            shape = args[1:]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
                shape = tuple(shape[0])
            ints = all(isinstance(s, int) for s in shape)
            caller = _caller(self._modules, len(shape)) if ints else None
            if caller is not None:
                module, span, stored = caller
                new = self.on_view(args[0], tuple(shape), (module, self._turn(span), stored))
                if new is not None:
                    args = (args[0], new) if func is torch.reshape else (args[0], *new)
            elif ints and _literal_head_view(tuple(shape)):
                self.on_literal(args[0], tuple(shape), self._turn(_user_line()))
        return func(*args, **kwargs)

    def _turn(self, where: Any) -> tuple[Any, int]:
        """``where`` with how many times it was called before in this run."""
        turn = self._calls[where] = self._calls.get(where, -1) + 1
        return where, turn

    def on_view(self, tensor: torch.Tensor, shape: tuple[int, ...], caller: Any) -> Any:
        return None

    def on_literal(self, tensor: torch.Tensor, shape: tuple[int, ...], call: Any) -> None:
        """A view of heads of a literal width (``reshape(B, T, -1, 8)``), at ``call``."""


class RecordViews(_Views):
    """Before a prune: the shape each such call resolved to (its ``-1`` included), by call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.resolved: dict[Any, Resolved] = {}

    def on_view(self, tensor: torch.Tensor, shape: tuple[int, ...], caller: Any) -> None:
        self.on_literal(tensor, shape, caller[1])

    def on_literal(self, tensor: torch.Tensor, shape: tuple[int, ...], call: Any) -> None:
        known = _product([s for s in shape if s != -1])
        if shape.count(-1) <= 1 and known and tensor.numel() % known == 0:
            out = tuple(tensor.numel() // known if s == -1 else s for s in shape)
            self.resolved[call] = Resolved(tuple(tensor.shape), out)


class FitViews(_Views):
    """While a pruned model runs: a call that no longer fits, or whose ``-1`` no longer
    resolves as it did before the prune (``resolved``, from ``RecordViews``: a head count
    inferred from a stored head width would change, and heads would mix), gets its innermost
    stored attribute set to the one smaller value that fits with the ``-1`` as before."""

    def __init__(self, model: nn.Module, resolved: Mapping[Any, Resolved]):
        super().__init__(model)
        self._resolved = resolved
        # Views of heads of a literal width whose count the prune changed: (where, before, now)
        self.mixed: list[tuple[Any, int, int]] = []
        # Stored sizes set, and calls no stored size could be set for: (module, attr, call)
        self.refitted: list[tuple[nn.Module, Stored, Any]] = []
        self.unfit: list[tuple[nn.Module, Stored, Any]] = []

    def on_literal(self, tensor: torch.Tensor, shape: tuple[int, ...], call: Any) -> None:
        seen = self._resolved.get(call)
        known = _product([s for s in shape if s != -1])
        if seen is None or len(seen.output) != len(shape) or not known:
            return
        before = seen.output
        now = tensor.numel() // known
        if tensor.numel() % known == 0 and now != before[-2]:
            self.mixed.append((call[0], before[-2], now))

    def on_view(self, tensor: torch.Tensor, shape: tuple[int, ...], caller: Any) -> Any:
        module, call, stored = caller
        seen = self._resolved.get(call)
        fixed: set[int] = set()  # the dims the prune cannot have changed
        if seen is not None and len(seen.output) == len(shape):
            fixed = _fixed_dims(seen, tuple(tensor.shape), _head_view(shape, stored))
            shape = tuple(b if s == -1 and i in fixed else s for i, (s, b) in _paired(shape, seen))
        if _fits(tensor.numel(), shape):
            return None
        new = _refit(tensor.numel(), shape, module, stored, fixed)
        (self.unfit if new is None else self.refitted).append((module, stored[max(stored)], call))
        return new


class ViewedBy(_Views):
    """While a model is traced: the outputs each module views by one stored width (the last
    size of the call: what a refit sets), by their autograd node, keyed (module, attribute).
    A stored count before a -1 (``view(B, T, self.kv_heads, -1)``) is never refitted, so the
    layers it views need no tie (a tie of k to v there would leave v out with a rotary k)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.seen: dict[tuple[nn.Module, Stored], list[Any]] = {}

    def on_view(self, tensor: torch.Tensor, shape: tuple[int, ...], caller: Any) -> None:
        module, _, stored = caller
        if tensor.grad_fn is not None and len(shape) - 1 in stored:
            self.seen.setdefault((module, stored[len(shape) - 1]), []).append(tensor.grad_fn)


@contextlib.contextmanager
def viewed_layers_tied(model: nn.Module, roots: tuple[type, ...]) -> Iterator[None]:
    """While a graph is traced: the layers ``tie_viewed`` names are tied in it as it is built
    (before a pruner counts its groups)."""
    original = tp.DependencyGraph._build_dependency
    with ViewedBy(model) as views:

        def build(dg: tp.DependencyGraph, module2node: Any) -> None:
            original(dg, module2node)
            tie_viewed(dg, views.seen, roots)

        tp.DependencyGraph._build_dependency = build
        try:
            yield
        finally:
            tp.DependencyGraph._build_dependency = original


def tie_viewed(
    dg: tp.DependencyGraph, seen: Mapping[Any, list[Any]], roots: tuple[type, ...]
) -> None:
    """Cut as one group the layers of one width whose outputs a module views by the same stored
    size (BERT's query, key and value, each viewed by ``self.attention_head_size``): the size
    is one attribute, refitted once, so a cut must leave their widths equal. The same channels
    go: Torch-Pruning's own tie of a query to its key (they meet in the scores) cuts so."""
    made_by = {n.grad_fn: n for n in dg.module2node.values() if isinstance(n.module, roots)}
    for fns in seen.values():
        nodes = list(dict.fromkeys(made_by[f] for f in fns if f in made_by))
        by_width: dict[int, list[Any]] = {}
        for node in nodes:
            by_width.setdefault(dg.get_out_channels(node.module) or 0, []).append(node)
        for width, same in by_width.items():
            for a, b in itertools.pairwise(same) if width else ():
                _tie(dg, a, b)
                _tie(dg, b, a)


def _tie(dg: tp.DependencyGraph, source: Any, target: Any) -> None:
    cut = dg.get_pruner_of_module(source.module).prune_out_channels
    follow = dg.get_pruner_of_module(target.module).prune_out_channels
    source.dependencies.append(tp.dependency.Dependency(cut, follow, source, target))


class Resolved(NamedTuple):
    """How a view ran before the prune: the shape of what it viewed, and the shape it gave."""

    input: tuple[int, ...]
    output: tuple[int, ...]


def _fixed_dims(seen: Resolved, now: tuple[int, ...], heads: bool) -> set[int]:
    """The dims of a view's output the prune cannot have changed: those made of input dims it
    left alone (the tokens of ``view(B, -1, self.heads, self.head_width)``, BERT's), and the
    count of ``heads`` of a stored width (``view(B, T, -1, self.head_dim)``: a wider head would
    mix the old ones). A ``-1`` there stands for what it resolved to before."""
    fixed = set(_unchanged_dims(seen.input, seen.output, now))
    if heads:
        fixed.add(len(seen.output) - 2)
    return fixed


def _paired(shape: tuple[int, ...], seen: Resolved) -> Iterator[tuple[int, tuple[int, int]]]:
    return enumerate(zip(shape, seen.output, strict=True))


def _unchanged_dims(
    before: tuple[int, ...], out: tuple[int, ...], now: tuple[int, ...]
) -> list[int]:
    """The dims of a view's output made only of input dims whose size the prune left as they
    were (``before`` -> ``now``): runs of input and output dims are matched where their products
    meet, as a view regroups them."""
    if len(before) != len(now):
        return []
    fixed: list[int] = []
    i = j = 0
    while i < len(before) and j < len(out):
        ins, outs = [i], [j]
        a, b = before[i], out[j]
        while a != b:
            if a < b and i + 1 < len(before):
                i += 1
                ins.append(i)
                a *= before[i]
            elif b < a and j + 1 < len(out):
                j += 1
                outs.append(j)
                b *= out[j]
            else:
                return fixed
        if all(before[k] == now[k] for k in ins):
            fixed += outs
        i, j = i + 1, j + 1
    return fixed


class ModelCodeError(RuntimeError):
    """A pruned model breaks for a reason in the model's code that the message names, with
    its line and what to write instead: no other guess is added to it."""


class UnfitSize(ModelCodeError):
    """A view by a stored size no longer views as it did before the prune, and no one value of
    the size fits it: the size is one attribute and sizes several views (of layers the cut
    left at different widths), or the view's other sizes are fixed too."""

    def __init__(self, module: nn.Module, attr: Stored, call: Any):
        (path, line, _), _ = call
        super().__init__(
            f"{type(module).__name__}.{attr} sizes a view the prune left no one value of it to "
            f"fit ({path}:{line}): it is one attribute, read by views of layers the cut leaves "
            "at different widths, or the view's other sizes are fixed too; give each view its "
            "own size, or leave the head width to a -1 (view(B, T, heads, -1))"
        )


class MixedHeads(ModelCodeError):
    """A prune changed the count of heads the model's code views by a literal width."""

    def __init__(self, where: tuple[str, int], before: int, now: int):
        path, line = where
        super().__init__(
            f"the model's code views a pruned layer's output as heads of a fixed width (a view "
            f"with -1 for the head count): pruned, it ran as {now} heads instead of {before}, "
            "each mixing channels of several; hold the width in an attribute "
            "(view(B, T, -1, self.head_dim)) or give the head count (view(B, T, heads, -1)); "
            f"the view is at {path}:{line}"
        )


def _head_view(shape: tuple[int, ...], stored: Mapping[int, Stored]) -> bool:
    """Whether ``shape`` views tokens as heads of a stored width with their count left to the
    ``-1`` (``view(B, T, -1, self.head_dim)``): a pruned width would keep that view running with
    fewer, wider heads, each mixing channels of several. Only this form: a ``-1`` before other
    stored sizes is as often the channels of an unflatten (``view(B, -1, self.h, self.w)``),
    which pruning is right to change."""
    n = len(shape)
    return n >= 4 and shape[n - 2] == -1 and max(stored) == n - 1 and n - 2 not in stored


def _literal_head_view(shape: tuple[int, ...]) -> bool:
    """``view(B, T, -1, 8)``: tokens as heads of a literal width, their count left to the -1."""
    n = len(shape)
    return n >= 4 and shape[n - 2] == -1 and shape[n - 1] > 1


_TORCH_DIR = os.path.dirname(torch.__file__)


def _user_line() -> tuple[str, int]:
    """(file, line) of the model's code that made the running call: the first frame outside
    torch and this module."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_TORCH_DIR) and path != __file__:
            return path, frame.f_lineno
        frame = frame.f_back
    return "", 0


def _refit(
    numel: int,
    shape: tuple[int, ...],
    module: nn.Module,
    stored: Mapping[int, Stored],
    fixed: set[int],
) -> Any:
    """``shape`` with its innermost stored size (and the attribute holding it) set to the one
    smaller value that fits ``numel``; None where none does. Only a width: every dim after it
    is one the prune cannot have changed (``fixed``), else it counts what those dims are
    (``view(B, -1, self.heads, x.shape[-1] // self.heads)``: fewer heads, mixed)."""
    position, attr = max(stored.items())  # the innermost stored size
    if position >= len(shape) or any(i not in fixed for i in range(position + 1, len(shape))):
        return None
    rest = [s for i, s in enumerate(shape) if i != position]
    if -1 in rest or 0 in rest or numel % _product(rest):
        return None
    value = numel // _product(rest)
    if not 0 < value < shape[position]:  # only ever smaller, as pruning makes it
        return None
    held = attr.read(module)
    # Equal: set by an earlier view of this run, after the code read it for this one (ViT's
    # ``new_shape = (b, -1, self.heads, self.head_size)``, then three views).
    if held != value:
        if held != shape[position]:
            return None
        attr.write(module, value)
    return tuple(value if i == position else s for i, s in enumerate(shape))


def _fits(numel: int, shape: tuple[int, ...]) -> bool:
    known = _product([s for s in shape if s != -1])
    if shape.count(-1) > 1 or known == 0:
        return True  # not ours to judge: torch says what is wrong
    return numel == known if -1 not in shape else numel % known == 0


def _product(sizes: list[int]) -> int:
    out = 1
    for s in sizes:
        out *= s
    return out


def _caller(
    modules: set[int], n: int
) -> tuple[nn.Module, tuple[str, int, int], Mapping[int, Stored]] | None:
    """The module whose code made the running call (of an ``n``-long shape), the call's span
    and the attribute at each of its shape positions; None where no module of the model made
    it with stored sizes."""
    found = code_site(modules, _sites)
    if found is None:
        return None
    owner, span, stored = found
    at = {p % n: a for p, a in stored.items() if -n <= p < n}
    return (owner, span, at) if at else None
