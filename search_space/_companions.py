"""A Conv or Linear layer's own per-output state beyond ``weight`` and ``bias``, cut with it.

Torch-Pruning's Conv and Linear pruners cut ``weight`` and ``bias`` only. A subclass that keeps
more state per output channel (timm's ``ScaledStdConv2d``: a ``gain`` per output channel, read
by its weight standardisation) came out of pruning with that state at the old width and failed
at its next call ("weight should contain 448 elements not 512"), so the dry run left out every
group of an NF-ResNet. Any parameter or buffer a Conv or Linear layer holds itself whose first
dim is the layer's output width is now cut along that dim with the channels it belongs to
(``_cut_companions``, installed once for the process, as ``_shapes`` bounds the index maps).
State of another shape is left as it is: the dry run still finds what it breaks, and says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

_OWN = frozenset({"weight", "bias"})  # what Torch-Pruning's pruners cut themselves


def companions(module: nn.Module, width: int) -> list[str]:
    """The names of ``module``'s own parameters and buffers, other than its weight and bias,
    that hold one entry per output channel (first dim ``width``, its output width): they are
    cut with its output channels. Empty for a plain Conv or Linear."""
    if width < 2:  # a width of one cannot tell a channel from a broadcast
        return []
    own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return [n for n, t in own if n not in _OWN and t is not None and t.dim() and len(t) == width]


def _cut(module: nn.Module, names: Sequence[str], keep: list[int], pruner) -> None:
    index = torch.as_tensor(keep, dtype=torch.long)
    for name in names:
        if name in module._parameters:
            # TP's own helper: the new parameter keeps requires_grad and its gradient (Taylor).
            param = module._parameters[name]
            module._parameters[name] = pruner._prune_parameter_and_grad(param, keep, 0)
        else:
            buffer = module._buffers[name]
            module._buffers[name] = buffer.index_select(0, index.to(buffer.device))


def _out_channel_fns() -> frozenset:
    fn = tp.pruner.function
    return frozenset(
        {
            fn.prune_conv_out_channels,
            fn.prune_depthwise_conv_out_channels,
            fn.prune_linear_out_channels,
        }
    )


def _cut_companions() -> None:
    """Wrap Torch-Pruning's ``Dependency.__call__`` (what every group's prune calls for each
    layer it cuts): after TP's own Conv or Linear out-channel pruner ran, the layer's
    ``companions`` are cut by the same indices. TP's pruning functions are left as they are:
    TP and its importances compare them by identity."""
    cls = tp.dependency.dependency.Dependency
    original = cls.__call__
    if getattr(original, "companions", False):
        return
    out_fns = _out_channel_fns()

    def __call__(self, idxs):
        if self.handler not in out_fns:
            return original(self, idxs)
        module, pruner = self.target.module, self.handler.__self__
        width = int(pruner.get_out_channels(module))  # read before TP's pruner changes it
        names = companions(module, width)
        result = original(self, idxs)
        if names:
            drop = {int(i) for i in tp._helpers.to_plain_idxs(idxs)}
            _cut(module, names, [i for i in range(width) if i not in drop], pruner)
        return result

    __call__.companions = True  # type: ignore[attr-defined]
    cls.__call__ = __call__


_cut_companions()
