"""Attention, as Torch-Pruning can map it: grouped-query heads, and v apart from q and k.

Llama-style attention has fewer key and value heads than query heads, each shared by a group of
query heads: ``k.repeat_interleave(r, dim=1)``, Llama's ``repeat_kv`` (``k[:, :, None]
.expand(B, KV, r, T, d).reshape(B, KV * r, T, d)``), or ``scaled_dot_product_attention(...,
enable_gqa=True)``. Torch-Pruning takes the repeat, and the attention, for element-wise ops, so
it tied channel i of the query projection to channel i of the key projection, a quarter or half
as wide: the dry run failed ("mat1 and mat2 shapes cannot be multiplied") and q, k and v were
left out. While a model is traced, a repeat of key or value heads (B, KV, T, d) viewed from a
layer's tokens (B, T, KV * d) is written as what it computes on those tokens: each query head's
slice of them, concatenated. Torch-Pruning maps slices and concatenations of channels, so the
key projection's channel ``g * d + j`` is tied to the query projection's ``(g * r + i) * d + j``
for each of the group's ``r`` heads, and, every head cut at the same offsets, a query head keeps
what its key head keeps.

``scaled_dot_product_attention`` is traced as the products it computes, and in those products
written out (``softmax(q @ k.transpose(-2, -1)) @ v``) the softmax of the scores is held apart
(``Cut.keep``: detached, and traced as a further output), so that v's channels are a group with
the output projection's inputs, not tied to q's and k's as a fused op taken for an element-wise
one tied them. The model itself is not changed: only its trace.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch.overrides import TorchFunctionMode

from ._broadcast import TensorSet
from ._shapes import signed

_T = torch.Tensor
_REPEATS = frozenset({torch.repeat_interleave, _T.repeat_interleave})
_VIEWS = frozenset({_T.view, _T.reshape, torch.reshape})
_VIEW_NODES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
_MATMULS = frozenset({torch.matmul, _T.matmul, _T.__matmul__})


def _transposed_last(t: Any) -> bool:
    """Whether ``t`` is an activation's last two dims swapped (``k.transpose(-2, -1)``)."""
    fn = getattr(t, "grad_fn", None)
    if type(fn).__name__ != "TransposeBackward0":
        return False
    dims = {signed(fn._saved_dim0), signed(fn._saved_dim1)}
    return dims in ({2, 3}, {-2, -1})


def _heads_of_tokens(x: Any) -> bool:
    """Whether ``x`` (B, H, T, d) is a layer's tokens (B, T, H * d) viewed as heads and
    transposed, as attention writes them; a feature map (B, C, H, W) is not."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.grad_fn is None:
        return False
    return _viewed_heads(x.grad_fn, x.shape)


def _viewed_heads(fn: Any, shape: tuple[int, ...]) -> bool:
    """Whether autograd node ``fn`` transposes tokens viewed as heads of ``shape``."""
    if type(fn).__name__ != "TransposeBackward0" or {fn._saved_dim0, fn._saved_dim1} != {1, 2}:
        return False
    view = fn.next_functions[0][0]
    if type(view).__name__ not in _VIEW_NODES:
        return False
    b, h, t, d = shape
    return tuple(getattr(view, "_saved_self_sym_sizes", ())) == (b, t, h * d)


def _from_heads(t: torch.Tensor, depth: int = 8) -> bool:
    """Whether ``t`` (B, H, T, d) is heads of tokens, or made from them by ops of its shape
    (a rotary embedding's products and sums): then its dim 1 holds heads, not channels a plan
    cuts, and a product over its last dim makes attention scores."""
    if getattr(t, "grad_fn", None) is None:
        return False
    nodes, seen = [t.grad_fn], set()
    for _ in range(depth):
        if any(_viewed_heads(fn, t.shape) for fn in nodes):
            return True
        seen.update(nodes)
        nodes = [n for fn in nodes for n, _ in fn.next_functions if n is not None and n not in seen]
    return False


class SharedHeads(TorchFunctionMode):
    """Writes a repeat of key or value heads as slices and a concatenation (see the module);
    ``sizes`` holds each concatenation's part widths, which Torch-Pruning cannot infer."""

    def __init__(self, keep: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.keep = keep  # a tensor detached, still traced as a further output (``Cut.keep``)
        self.sizes: dict[Any, list[int]] = {}  # a concatenation's autograd node -> part widths
        self.scores = TensorSet()  # 4-D attention scores (``_note_scores``)
        # id of a (B, KV, 1, T, d) or (B, KV, r, T, d) tensor made from heads -> (it, the heads).
        self.spread: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        x = args[0] if args else None
        if func in _REPEATS and _heads_of_tokens(x):
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            dim = args[2] if len(args) > 2 else kwargs.get("dim")
            if isinstance(repeats, int) and dim in (1, -3):
                return self._repeated(x, repeats)
        if func is F.scaled_dot_product_attention:
            return self._attention(args, kwargs)
        if func in _VIEWS:
            repeated = self._view_of_spread(x, args, kwargs)
            if repeated is not None:
                return repeated
        if func in _MATMULS and x in self.scores and len(args) == 2:
            return func(self.keep(x), args[1])  # the softmax of the scores times v
        out = func(*args, **kwargs)
        self._spread(x, out)
        self._note_scores(func, args, out)
        return out

    def _note_scores(self, func: Any, args: tuple, out: Any) -> None:
        """Record ``out`` as attention scores where it is ``q @ k.transpose(-2, -1)`` of heads
        (B, H, T, d), or made from scores in place (scaled, masked, a softmax)."""
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            return
        made = (
            func in _MATMULS
            and len(args) == 2
            and _transposed_last(args[1])
            and _from_heads(args[0])
        )
        if made or any(t in self.scores and t.shape == out.shape for t in args):
            self.scores.add(out)

    def _spread(self, x: Any, out: Any) -> None:
        """Follow ``repeat_kv``: heads given a dim of one at 2, expanded along it, and viewed
        back as heads (the view is then written as ``_repeated``)."""
        if not isinstance(out, torch.Tensor) or out.ndim != 5:
            return
        source = self.spread.get(id(x))
        heads = source[1] if source is not None and source[0]() is x else None
        if heads is None and _heads_of_tokens(x) and out.shape[2] == 1:
            heads = x  # k[:, :, None] or k.unsqueeze(2)
        if (
            heads is not None
            and out.shape[:2] == heads.shape[:2]
            and out.shape[3:] == heads.shape[2:]
        ):
            self.spread[id(out)] = (weakref.ref(out), heads)

    def _repeated(self, heads: torch.Tensor, r: int) -> torch.Tensor:
        """``heads.repeat_interleave(r, dim=1)``, on the tokens the heads were viewed from."""
        b, kv, t, d = heads.shape
        tokens = heads.transpose(1, 2).reshape(b, t, kv * d)
        parts = [tokens[:, :, (h // r) * d : (h // r + 1) * d] for h in range(kv * r)]
        out = torch.cat(parts, -1)
        self.sizes[out.grad_fn] = [d] * (kv * r)
        return out.view(b, t, kv * r, d).transpose(1, 2)

    def _attention(self, args: tuple, kwargs: dict) -> Any:
        """``scaled_dot_product_attention`` as what it computes: the scores of q and k, then
        their softmax (held apart by ``keep``) times v. Torch-Pruning takes the fused op for an
        element-wise one and tied v's channels to q's and k's: a model whose q and k could not
        be cut (a rotary embedding) had its v and output projection left out with them."""
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        given = {**dict(zip(names, args, strict=False)), **kwargs}
        q, k, v = given["query"], given["key"], given["value"]
        if given.get("enable_gqa") and k.shape[-3] != q.shape[-3]:
            if not (_heads_of_tokens(k) and _heads_of_tokens(v)) or q.shape[-3] % k.shape[-3]:
                return F.scaled_dot_product_attention(*args, **kwargs)
            r = q.shape[-3] // k.shape[-3]
            k, v = self._repeated(k, r), self._repeated(v, r)
        scale = given.get("scale") or q.shape[-1] ** -0.5
        scores = q @ k.transpose(-2, -1) * scale
        mask = given.get("attn_mask")
        if given.get("is_causal"):
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
        elif mask is not None:
            scores = scores + mask
        return self.keep(scores.softmax(-1)) @ v

    def _view_of_spread(self, x: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The repeat a view of spread heads, (B, KV, r, T, d) as (B, KV * r, T, d), makes;
        None for any other view."""
        source = self.spread.get(id(x))
        if source is None or source[0]() is not x:
            return None
        shape = args[1:] if len(args) > 2 else args[1] if len(args) > 1 else kwargs.get("shape")
        if isinstance(shape, int) or shape is None:
            return None
        b, kv, r, t, d = x.shape
        want = (b, kv * r, t, d)
        if len(shape) != 4 or any(s not in (w, -1) for s, w in zip(shape, want, strict=True)):
            return None
        return self._repeated(source[1], r)


@contextlib.contextmanager
def shared_heads(keep: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While a model is traced: repeats of key and value heads written so that Torch-Pruning
    maps them (see the module), with their concatenations' sizes given to its shape inference,
    and attention as its products, the softmax passed through ``keep``."""
    mode = SharedHeads(keep)
    shape_infer = tp.dependency.shape_infer
    original = shape_infer.init_shape_information

    def init_shape_information(graph: tp.DependencyGraph) -> None:
        original(graph)
        for node in graph.module2node.values():
            sizes = mode.sizes.get(node.grad_fn)
            if node.type == tp.ops.OPTYPE.CONCAT and sizes is not None:
                node.module.concat_sizes = list(sizes)

    shape_infer.init_shape_information = init_shape_information
    try:
        with mode:
            yield
    finally:
        shape_infer.init_shape_information = original
