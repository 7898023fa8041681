"""Tracing a map with one channel that scales or shifts every channel: no channel link.

A spatial attention (CBAM's, a segmentation net's gate) multiplies a feature map
``x`` (N, C, H, W) by a map ``a`` (N, 1, H, W) made from it. Torch-Pruning takes the product for
an element-wise op, channel i of one operand for channel i of the other, and so ties the C
channels of ``x`` to the one channel of the layer that made ``a``: the group gets that layer's
single channel and is left out (on a CBAM block the conv before it was never pruned). One
channel broadcast over C has no channel i to keep in step, so while the model is traced such an
operand is detached: the product's channels are ``x``'s alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


def one_channel_over_many(a: Any, b: Any) -> bool:
    """Whether ``a`` is a one-channel map that ``b``'s channels are scaled or shifted by: both
    at least 4-D (images, volumes: channels are dim 1), ``a`` with one channel where ``b`` has
    more, and otherwise ``b``'s shape or one value per sample (a channels-last tensor's dim 1
    is a height, and a per-channel scale over it, (N, 1, 1, C), keeps its channel link)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.ndim != b.ndim or a.ndim < 4 or not a.shape[1] == 1 < b.shape[1]:
        return False
    return a.shape[2:] == b.shape[2:] or all(s == 1 for s in a.shape[1:])


class _OneChannelMapsCut(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in _BINARY and len(args) >= 2:
            a, b = args[0], args[1]
            if one_channel_over_many(a, b):
                a = a.detach()
            elif one_channel_over_many(b, a):
                b = b.detach()
            args = (a, b, *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def one_channel_maps_cut() -> Iterator[None]:
    """While tracing: a one-channel map met in an element-wise op with a many-channel tensor
    is detached from the graph (``one_channel_over_many``)."""
    with _OneChannelMapsCut():
        yield
