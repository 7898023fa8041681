"""Tracing one-channel tensors made from many channels, and maps that scale every channel.

A spatial attention (CBAM's) pools a feature map ``x`` (N, C, H, W) over its channels
(``x.mean(1, keepdim=True)``, ``x.amax(1)``, ``torch.max(x, 1)``), makes a map ``a``
(N, 1, H, W) from that, and multiplies ``x`` by it; a gate per sample (N, 1, 1, 1) does the
same from a pooled vector. Torch-Pruning takes every such op for an element-wise one, channel i
in for channel i out, and so tied the C channels of ``x`` to the one channel of the map's
layers: the group got that single channel and the conv before it was left out. Neither a
pooling over channels nor one channel broadcast over C has a channel i to keep in step, so
while the model is traced:

- a reduction over the channel dim alone gives a detached result: what is made from it is
  linked to no channel of ``x``;
- a one-channel map met in an element-wise op with a many-channel tensor is detached there,
  and kept, summed to one value, as a further output of the trace (``Cut.outputs``): the
  layers that made it are still traced, their inputs pruned with the channels they read (a
  gate's Linear reads ``x``'s pooled channels), their one output channel left whole.

Where the channels are: dim 1 of a 4-D or 5-D tensor (images, volumes). A 2-D or 3-D tensor's
shape does not say ((B, T, C) tokens hold them last, a Conv1d's (B, C, L) at dim 1, and a
(B, 1, C) FiLM scale on tokens is per channel, not one channel), so the mode reads it off the
layer that made the tensor (a Linear or an embedding: last; a Conv1d: dim 1) and carries it
through the ops that keep every value in its place (activations, norms, element-wise ops,
dropout, a softmax) and through reductions of other dims (a pooling over tokens). An attention
pooling (``softmax(self.score(h), 1)``, (B, T, 1), times ``h``) and a Conv1d's one-channel
gate are cut so; where the channel dim is not known (after a transpose), nothing is.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_T = torch.Tensor
# Element-wise ops with two tensor operands, as functions and as methods (in place too).
_BINARY = frozenset(
    {
        torch.mul, torch.add, torch.sub, torch.div,
        _T.mul, _T.add, _T.sub, _T.div, _T.mul_, _T.add_, _T.sub_, _T.div_,
        _T.__mul__, _T.__rmul__, _T.__add__, _T.__radd__, _T.__sub__, _T.__rsub__,
        _T.__truediv__, _T.__rtruediv__, _T.__imul__, _T.__iadd__,
    }
)  # fmt: skip
# Reductions, each with the position of its ``dim`` argument (a norm's second is its order).
_REDUCTIONS = {
    **dict.fromkeys(
        (
            torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.std,
            torch.var, torch.logsumexp, torch.prod, torch.nanmean, torch.nansum, torch.median,
            _T.mean, _T.sum, _T.amax, _T.amin, _T.max, _T.min, _T.std, _T.var, _T.logsumexp,
            _T.prod, _T.nanmean, _T.nansum, _T.median,
        ),
        1,
    ),
    **dict.fromkeys((torch.norm, _T.norm, torch.linalg.vector_norm, torch.linalg.norm), 2),
}  # fmt: skip


# Layers, as the functions they call, by the dim of their output that holds its channels.
_MADE_BY = {F.linear: -1, F.embedding: -1, torch.conv1d: 1, torch.conv_transpose1d: 1}
# Ops after which a value may sit elsewhere than it was, though the shape is the same (the
# transpose of a square): the channel dim read off their input is not carried through them.
_MOVERS = frozenset(
    {
        torch.transpose, torch.permute, torch.movedim, torch.swapaxes, torch.swapdims, torch.t,
        _T.transpose, _T.permute, _T.movedim, _T.swapaxes, _T.swapdims, _T.t,
        _T.T.__get__, _T.mT.__get__, _T.H.__get__, _T.mH.__get__,
        torch.reshape, torch.flatten, _T.view, _T.reshape, _T.flatten, _T.unflatten,
        _T.view_as, _T.reshape_as, torch.flip, torch.roll, torch.rot90, _T.flip, _T.roll,
        _T.rot90, torch.matmul, torch.bmm, torch.einsum, _T.matmul, _T.__matmul__, _T.bmm,
        _T.__getitem__, torch.index_select, torch.gather, _T.index_select, _T.gather,
    }
)  # fmt: skip


# Views that may split a tensor's channels into heads.
_VIEWS = frozenset({_T.view, _T.reshape, torch.reshape, _T.unflatten})
# Products that contract their first operand's last dim: of tokens, ``q @ k.transpose(-1, -2)``.
_CONTRACTIONS = frozenset({torch.matmul, torch.bmm, _T.matmul, _T.__matmul__, _T.bmm})
# Ops that cut a tensor into parts along a dim, each with the position of that dim.
_SPLITS = {torch.chunk: 2, _T.chunk: 2, torch.split: 2, _T.split: 2}


class TensorSet:
    """Tensors by identity, held weakly: an id is free for reuse once its tensor is freed, so
    an id alone could name a later tensor."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, t: torch.Tensor) -> None:
        self._refs[id(t)] = weakref.ref(t)

    def __contains__(self, t: object) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t


class _Made(NamedTuple):
    """What the trace knows of a 2-D or 3-D tensor: a reference to it, its channel dim, the
    weight of the layer that made it, and how many equal parts of that layer's output it is
    (``q, k, v = qkv(x).chunk(3, -1)``: 3)."""

    ref: weakref.ref
    dim: int
    weight: torch.Tensor | None
    parts: int = 1


def _split_dim(func: Any, args: tuple, kwargs: dict) -> int:
    pos = _SPLITS[func]
    return args[pos] if len(args) > pos else kwargs.get("dim", 0)


def _weight_like(t: Any) -> bool:
    """A parameter, or one viewed or transposed (``h @ self.w.t()``: a layer written out, whose
    product holds the weight's channels); not an activation (``k.transpose(-1, -2)``)."""
    if not isinstance(t, torch.Tensor) or t.grad_fn is None:
        return True
    return all(type(n).__name__ == "AccumulateGrad" for n, _ in t.grad_fn.next_functions if n)


def one_channel_over_many(a: Any, b: Any, dim: int | None) -> bool:
    """Whether ``a`` is a one-channel map that ``b``'s channels, at ``dim`` (None: not known),
    are scaled or shifted by: ``a`` with one channel where ``b`` has more, and otherwise ``b``'s
    shape or one value per sample (a channels-last tensor's dim 1 is a height, and a
    per-channel scale over it, (N, 1, 1, C), keeps its channel link). ``a`` of fewer dims is
    read as broadcasting reads it, ones in front: a causal mask (T, T) added to the scores of
    every head (B, H, T, T) is one map over the heads, and was cut with them."""
    if dim is None or not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.ndim > b.ndim:
        return False
    shape = (1,) * (b.ndim - a.ndim) + tuple(a.shape)
    if not shape[dim] == 1 < b.shape[dim]:
        return False
    others = [i for i in range(1, b.ndim) if i != dim % b.ndim]
    return all(shape[i] == b.shape[i] for i in others) or all(shape[i] == 1 for i in others)


def _reduced(func: Any, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """The dims a reduction reduces, non-negative (all of them for ``dim=None``), or None for
    any other call."""
    if func not in _REDUCTIONS or not args or not isinstance(args[0], torch.Tensor):
        return None
    x, at = args[0], _REDUCTIONS[func]
    dim = kwargs.get("dim", args[at] if len(args) > at else None)
    if dim is None:
        return tuple(range(x.ndim))
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if not all(isinstance(d, int) for d in dims):  # a norm's order where dim was expected
        return None
    return tuple(sorted({d % max(x.ndim, 1) for d in dims}))


def pools_channels(func: Any, args: tuple, kwargs: dict, dim: int | None) -> bool:
    """Whether the call reduces the channel dim ``dim`` (None: not known) of a tensor of more
    than one channel, and that dim alone or every dim: a channels-last tensor's global pool,
    ``x.mean((1, 2))``, reduces dim 1 too, and keeps its channels."""
    dims = _reduced(func, args, kwargs)
    if dims is None or dim is None:
        return False
    x = args[0]
    dim %= x.ndim
    return x.shape[dim] > 1 and (dims == (dim,) or len(dims) == x.ndim)


class Cut(TorchFunctionMode):
    """The mode, for one trace; ``maps`` holds the maps it detached, for the trace's outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.maps: list[torch.Tensor] = []
        self.off = False  # while the trace's own outputs are made
        # id of a detached pooling -> (it, the pooling): holding it keeps its id unique.
        self.pooled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # id of a 2-D or 3-D tensor -> what made it (see the docstring).
        self.dims: dict[int, _Made] = {}
        # id of a layer's weight -> (it, the heads its tokens' channels were viewed as).
        self.heads: dict[int, tuple[torch.Tensor, int]] = {}
        # What each op gave the model, while it runs (for ``Setup._dead_ends``).
        self.results: list[torch.Tensor] = []
        # 3-D tensors holding no channels (attention scores, see ``_scores``).
        self.scores = TensorSet()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self.off:
            return func(*args, **kwargs)
        x = args[0] if args else None
        if pools_channels(func, args, kwargs, self.channel_dim(x)):
            out = func(*args, **kwargs)
            if isinstance(out, tuple):  # torch.max(x, 1): (values, indices), a structseq
                return type(out)([self._pool(t) for t in out])
            return self._pool(out)
        if func in _BINARY and len(args) >= 2:
            a, b = args[0], args[1]
            if one_channel_over_many(a, b, self.channel_dim(b)) or self._over_scores(a, b):
                a = self.keep(a)
            elif one_channel_over_many(b, a, self.channel_dim(a)) or self._over_scores(b, a):
                b = self.keep(b)
            args = (a, b, *args[2:])
        if func in _SPLITS:
            args, kwargs = self._last_dim(func, args, kwargs)
        out = func(*args, **kwargs)
        self._carry(func, args, kwargs, out)
        self._scores(func, args, out)
        if func in _SPLITS:
            self._parts(func, args, kwargs, out)
        if func in _VIEWS:
            self._heads(x, out)
        parts = out if isinstance(out, (tuple, list)) else (out,)
        self.results += [t for t in parts if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        return out

    def _heads(self, x: Any, out: Any) -> None:
        """Record the heads where a layer's tokens (B, T, C) are viewed as (B, T, H, C / H):
        hand-written multi-head attention; as (B, T, 3, H, C / 3H), fused q, k and v (timm's);
        or where each equal part of them is (``q, k, v = qkv(x).chunk(3, -1)``, nanoGPT's).
        The layer's outputs are then cut in as many equal slices as the view makes, each losing
        the same offsets, so that every head keeps the same channels (and a query's the key's);
        a view with the head width fixed is the dry run's to refuse."""
        if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)):
            return
        if x.ndim != 3 or out.ndim < 4 or self.channel_dim(x) != 2:
            return
        made = self.dims[id(x)]
        heads, width = math.prod(out.shape[2:-1]) * made.parts, out.shape[-1]
        if out.shape[:2] == x.shape[:2] and heads > 1 and width > 1 and made.weight is not None:
            known = self.heads.get(id(made.weight), (made.weight, 1))[1]
            self.heads[id(made.weight)] = (made.weight, max(known, heads))

    def _last_dim(self, func: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A split of tokens along their channels with the dim written as -1: Torch-Pruning
        maps a split's offsets only at dim 1 or at a dim autograd saves as -1 (an unsigned
        18446744073709551615 it takes for "any"), so ``qkv(x).split(C, dim=2)`` had its parts'
        channels mapped as if unsplit (the route check then left the layer out)."""
        x, pos = args[0] if args else None, _SPLITS[func]
        channels = self.channel_dim(x)
        if channels is None or channels != x.ndim - 1 or _split_dim(func, args, kwargs) != channels:
            return args, kwargs
        if len(args) > pos:
            return (*args[:pos], -1, *args[pos + 1 :]), kwargs
        return args, {**kwargs, "dim": -1}

    def _parts(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Record the equal parts a layer's tokens are cut into along their channels."""
        x = args[0] if args else None
        made = self.dims.get(id(x))  # only 2-D and 3-D tensors are known by their maker
        if made is None or made.ref() is not x or not isinstance(out, (tuple, list)) or not out:
            return
        if _split_dim(func, args, kwargs) % x.ndim != made.dim or len({t.shape for t in out}) > 1:
            return
        for t in out:
            self.dims[id(t)] = _Made(weakref.ref(t), made.dim, made.weight, made.parts * len(out))

    def _scores(self, func: Any, args: tuple, out: Any) -> None:
        """Record ``out`` as holding no channels where it is a product contracting a layer's
        tokens over their channels (attention scores, (B, T, T)), or is made from one in place
        (scaled, masked, a softmax)."""
        if not isinstance(out, torch.Tensor) or out.ndim != 3:
            return
        first, second = (*args, None, None)[:2]
        contracted = (
            func in _CONTRACTIONS and self.channel_dim(first) == 2 and not _weight_like(second)
        )
        if contracted or any(t in self.scores and t.shape == out.shape for t in args):
            self.scores.add(out)

    def _over_scores(self, a: Any, b: Any) -> bool:
        """Whether ``a`` meets scores ``b`` that hold no channels (a causal mask added to one
        head's attention scores): Torch-Pruning takes the product for an element-wise op and
        tied the mask's columns to the query's and key's channels, so they were cut."""
        return (
            b in self.scores
            and isinstance(a, torch.Tensor)
            and a not in self.scores
            and a.ndim <= b.ndim
        )

    def channel_dim(self, t: Any) -> int | None:
        """Where ``t``'s channels are: dim 1 of a 4-D or 5-D tensor; for a 2-D or 3-D one, what
        the layer that made it says (see the module's docstring); else None."""
        if not isinstance(t, torch.Tensor) or t.ndim < 2:
            return None
        if t.ndim >= 4:
            return 1
        made = self.dims.get(id(t))
        return made.dim if made is not None and made.ref() is t else None

    def made_by(self, out: torch.Tensor, weight: torch.Tensor) -> None:
        """Record ``out`` as made by a layer of ``weight`` holding its channels last, as a
        Linear's output does (a dense layer of a type Torch-Pruning does not know, traced as
        one op: the ops inside it are no layer's)."""
        if out.ndim in (2, 3):
            self.dims[id(out)] = _Made(weakref.ref(out), out.ndim - 1, weight)

    def _carry(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Record ``out``'s channel dim: a layer's own, or carried from an input it keeps in
        place (the same shape, or a reduction of other dims)."""
        if not isinstance(out, torch.Tensor) or out.ndim not in (2, 3) or func in _MOVERS:
            return
        if func in _MADE_BY:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            self.dims[id(out)] = _Made(weakref.ref(out), _MADE_BY[func] % out.ndim, weight)
            return
        dims = _reduced(func, args, kwargs)
        for t in (*args, *kwargs.values()):
            dim = self.channel_dim(t)
            if dim is None or t.ndim > 3:
                continue
            if dims is not None and dim not in dims and t.ndim in (out.ndim, out.ndim + 1):
                # keepdim keeps the dims; otherwise those before the channels are gone
                dim -= 0 if t.ndim == out.ndim else sum(d < dim for d in dims)
            elif t.shape != out.shape:
                continue
            made = self.dims[id(t)]
            self.dims[id(out)] = _Made(weakref.ref(out), dim, made.weight, made.parts)
            return

    def outputs(self) -> list[torch.Tensor]:
        """The detached maps as further outputs of the trace, each summed to one value:
        Torch-Pruning reads no channels in a 0-d output. A map of one channel as an output
        made it refuse every group the map was tied to, silently (``x / x.median(1)``: a
        pooling this module does not list, so Torch-Pruning ties its channel to ``x``'s)."""
        self.off = True
        try:
            return [m.sum() for m in self.maps]
        finally:
            self.off = False

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` detached; ``t`` itself kept for the trace's outputs, so that what made it is
        still traced."""
        if t.requires_grad:
            self.maps.append(t)
        return t.detach()

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` detached, remembered so that ``undo`` can give it back where the model returns
        it (a model whose output is a pooling over channels keeps its graph). Not kept as an
        output otherwise: Torch-Pruning leaves whole every group that reaches an output of
        fewer channels than it cuts, and the layer pooled would be in it."""
        cut = t.detach()
        if t.requires_grad:
            self.pooled[id(cut)] = (cut, t)
        return cut

    def undo(self, t: torch.Tensor) -> torch.Tensor:
        """The pooling ``t`` as it was before it was detached, or ``t``."""
        return self.pooled.get(id(t), (t, t))[1]
