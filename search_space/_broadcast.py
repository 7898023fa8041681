"""Tracing one-channel tensors made from many channels, and maps that scale every channel.

A spatial attention (CBAM's) pools a feature map ``x`` (N, C, H, W) over its channels
(``x.mean(1, keepdim=True)``, ``x.amax(1)``, ``torch.max(x, 1)``), makes a map ``a``
(N, 1, H, W) from that, and multiplies ``x`` by it; a gate per sample (N, 1, 1, 1) does the
same from a pooled vector. Torch-Pruning takes every such op for an element-wise one, channel i
in for channel i out, and so tied the C channels of ``x`` to the one channel of the map's
layers: the group got that single channel and the conv before it was left out. Neither a
pooling over channels nor one channel broadcast over C has a channel i to keep in step, so
while the model is traced:

- a reduction over dim 1 alone of a 4-D or 5-D tensor (images, volumes: channels are dim 1)
  gives a detached result: what is made from it is linked to no channel of ``x``;
- a one-channel map met in an element-wise op with a many-channel tensor is detached there,
  and kept, summed to one value, as a further output of the trace (``Cut.outputs``): the
  layers that made it are still traced, their inputs pruned with the channels they read (a
  gate's Linear reads ``x``'s pooled channels), their one output channel left whole.
"""

from __future__ import annotations

from typing import Any

import torch
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


def one_channel_over_many(a: Any, b: Any) -> bool:
    """Whether ``a`` is a one-channel map that ``b``'s channels are scaled or shifted by: both
    at least 4-D, ``a`` with one channel where ``b`` has more, and otherwise ``b``'s shape or
    one value per sample (a channels-last tensor's dim 1 is a height, and a per-channel scale
    over it, (N, 1, 1, C), keeps its channel link)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.ndim != b.ndim or a.ndim < 4 or not a.shape[1] == 1 < b.shape[1]:
        return False
    return a.shape[2:] == b.shape[2:] or all(s == 1 for s in a.shape[1:])


def pools_channels(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether the call reduces dim 1 of a 4-D or 5-D tensor of more than one channel."""
    if func not in _REDUCTIONS or not args or not isinstance(args[0], torch.Tensor):
        return False
    x = args[0]
    if x.ndim < 4 or x.shape[1] < 2:
        return False
    at = _REDUCTIONS[func]
    dim = kwargs.get("dim", args[at] if len(args) > at else None)
    if dim is None:  # every dim, channels among them
        return True
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    # Dim 1 alone: a channels-last tensor's global pool, x.mean((1, 2)), reduces dim 1 too.
    return all(isinstance(d, int) for d in dims) and {d % x.ndim for d in dims} == {1}


class Cut(TorchFunctionMode):
    """The mode, for one trace; ``maps`` holds the maps it detached, for the trace's outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.maps: list[torch.Tensor] = []
        self.off = False  # while the trace's own outputs are made
        # id of a detached pooling -> (it, the pooling): holding it keeps its id unique.
        self.pooled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self.off:
            return func(*args, **kwargs)
        if pools_channels(func, args, kwargs):
            out = func(*args, **kwargs)
            if isinstance(out, tuple):  # torch.max(x, 1): (values, indices), a structseq
                return type(out)([self._pool(t) for t in out])
            return self._pool(out)
        if func in _BINARY and len(args) >= 2:
            a, b = args[0], args[1]
            if one_channel_over_many(a, b):
                a = self._keep(a)
            elif one_channel_over_many(b, a):
                b = self._keep(b)
            args = (a, b, *args[2:])
        return func(*args, **kwargs)

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
