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

import weakref
from typing import Any

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


def one_channel_over_many(a: Any, b: Any, dim: int | None) -> bool:
    """Whether ``a`` is a one-channel map that ``b``'s channels, at ``dim`` (None: not known),
    are scaled or shifted by: ``a`` with one channel where ``b`` has more, and otherwise ``b``'s
    shape or one value per sample (a channels-last tensor's dim 1 is a height, and a
    per-channel scale over it, (N, 1, 1, C), keeps its channel link)."""
    if dim is None or not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.ndim != b.ndim or not a.shape[dim] == 1 < b.shape[dim]:
        return False
    others = [i for i in range(1, a.ndim) if i != dim % a.ndim]
    return all(a.shape[i] == b.shape[i] for i in others) or all(a.shape[i] == 1 for i in others)


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
        # id of a 2-D or 3-D tensor -> (a reference to it, its channel dim, the weight of the
        # layer that made it), see the docstring.
        self.dims: dict[int, tuple[weakref.ref, int, torch.Tensor | None]] = {}
        # id of a layer's weight -> (it, the heads its tokens' channels were viewed as).
        self.heads: dict[int, tuple[torch.Tensor, int]] = {}

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
            if one_channel_over_many(a, b, self.channel_dim(b)):
                a = self._keep(a)
            elif one_channel_over_many(b, a, self.channel_dim(a)):
                b = self._keep(b)
            args = (a, b, *args[2:])
        out = func(*args, **kwargs)
        self._carry(func, args, kwargs, out)
        if func in _VIEWS:
            self._heads(x, out)
        return out

    def _heads(self, x: Any, out: Any) -> None:
        """Record the heads where a layer's tokens (B, T, C) are viewed as (B, T, H, C / H):
        hand-written multi-head attention. Each head must keep as many channels as the others
        (they are cut as equal slices); a view with the head width fixed is the dry run's to
        refuse."""
        if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)):
            return
        if x.ndim != 3 or out.ndim != 4 or self.channel_dim(x) != 2:
            return
        heads, width = out.shape[2], out.shape[3]
        if out.shape[:2] == x.shape[:2] and heads > 1 and width > 1:
            weight = self.dims[id(x)][2]
            if weight is not None:
                known = self.heads.get(id(weight), (weight, 1))[1]
                self.heads[id(weight)] = (weight, max(known, heads))

    def channel_dim(self, t: Any) -> int | None:
        """Where ``t``'s channels are: dim 1 of a 4-D or 5-D tensor; for a 2-D or 3-D one, what
        the layer that made it says (see the module's docstring); else None."""
        if not isinstance(t, torch.Tensor) or t.ndim < 2:
            return None
        if t.ndim >= 4:
            return 1
        ref, dim, _ = self.dims.get(id(t), (None, None, None))
        return dim if ref is not None and ref() is t else None

    def _carry(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Record ``out``'s channel dim: a layer's own, or carried from an input it keeps in
        place (the same shape, or a reduction of other dims)."""
        if not isinstance(out, torch.Tensor) or out.ndim not in (2, 3) or func in _MOVERS:
            return
        if func in _MADE_BY:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            self.dims[id(out)] = (weakref.ref(out), _MADE_BY[func] % out.ndim, weight)
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
            self.dims[id(out)] = (weakref.ref(out), dim, self.dims[id(t)][2])
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

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
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
