"""Buffers that hold values per channel, made parameters while Torch-Pruning works.

Torch-Pruning finds the tensors a group's channels run through by tracing autograd, and a
buffer has no autograd node: a sinusoidal positional encoding (``register_buffer("pe", ...)``
added to the tokens, as "Attention Is All You Need" writes it) or a fixed per-channel scale
kept its width when the channels it is added to or multiplied into were cut, so every layer of
that group failed the dry run ("The size of tensor a (24) must match the size of tensor b (32)")
and was left out: a text Transformer's whole residual stream. While a graph is built or a model
pruned, such buffers are parameters (unwrapped ones, cut at their last dim of more than one, as
a learned positional embedding is); afterwards they are buffers again, cut or not.

Only floating-point buffers of more than one value, in modules Torch-Pruning has no pruner of
(a BatchNorm's statistics are its pruner's) and outside layers pruned as one unit, are taken.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn


@dataclass
class BufferParameter:
    """One buffer made a parameter, and how to make it a buffer again."""

    module: nn.Module
    name: str
    original: torch.Tensor
    persistent: bool

    def freeze(self) -> None:
        """Not trained: Torch-Pruning makes each tensor it cuts a new, trainable parameter,
        and an iterative recovery trains between its steps (a frozen norm's statistics, a
        positional encoding would have moved)."""
        self.module._parameters[self.name].requires_grad_(False)

    def restore(self) -> None:
        now = self.module._parameters.pop(self.name)
        # Unpruned (a trace): the very tensor it had; else the cut one, as a plain tensor.
        value = self.original if now.shape == self.original.shape else now.detach()
        self.module.register_buffer(self.name, value, persistent=self.persistent)


def buffers_as_parameters(
    model: nn.Module, skip: Collection[nn.Module] = ()
) -> list[BufferParameter]:
    """Make the per-value buffers of ``model`` parameters (see the module's docstring), except
    those of ``skip`` and the modules within them; each item's ``restore`` undoes it."""
    prunable = set(tp.pruner.function.PrunerBox) - {tp.ops.OPTYPE.PARAMETER}
    out: list[BufferParameter] = []
    for module in _outside(model, set(skip)):
        if tp.ops.module2type(module) in prunable:
            continue
        transient = module._non_persistent_buffers_set
        for name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_floating_point() or buf.numel() < 2:
                continue
            out.append(BufferParameter(module, name, buf, name not in transient))
            del module._buffers[name]
            transient.discard(name)
            # Untrained; the trace makes every parameter require grad while it runs.
            module.register_parameter(name, nn.Parameter(buf, requires_grad=False))
    return out


def _outside(model: nn.Module, skip: set[nn.Module]) -> list[nn.Module]:
    """The modules of ``model`` that are not in ``skip`` nor within one of them."""
    found: list[nn.Module] = []
    stack = [model]
    while stack:
        module = stack.pop()
        if module in skip:
            continue
        found.append(module)
        stack.extend(module.children())
    return found
