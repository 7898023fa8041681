"""Torch-Pruning pruners for layers it cannot trace through, pruned as one unit instead.

Each pruner treats a whole module as one layer (a Torch-Pruning *customized* layer): the tracer
sees only its input and output channels, and the pruner removes the matching weights inside.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn


def _keep(size: int, idxs: Sequence[int]) -> list[int]:
    drop = set(int(i) for i in idxs)
    return [i for i in range(size) if i not in drop]


def _select(param: nn.Parameter, keep: Sequence[int], dim: int) -> nn.Parameter:
    """``param`` restricted to ``keep`` along ``dim``; its gradient (Taylor ranks by it) follows."""
    index = torch.as_tensor(list(keep), dtype=torch.long, device=param.device)
    out = nn.Parameter(
        param.data.index_select(dim, index).contiguous(), requires_grad=param.requires_grad
    )
    if param.grad is not None:
        out.grad = param.grad.index_select(dim, index).contiguous()
    return out


def _slice_linear(
    layer: nn.Linear, rows: Sequence[int] | None = None, cols: Sequence[int] | None = None
) -> None:
    if rows is not None:
        layer.weight = _select(layer.weight, rows, 0)
        if layer.bias is not None:
            layer.bias = _select(layer.bias, rows, 0)
        layer.out_features = len(rows)
    if cols is not None:
        layer.weight = _select(layer.weight, cols, 1)
        layer.in_features = len(cols)


def _slice_layer_norm(norm: nn.Module, keep: Sequence[int]) -> None:
    if not isinstance(norm, nn.LayerNorm):
        raise TypeError(
            f"cannot prune a {type(norm).__name__} inside a merged layer; only nn.LayerNorm"
        )
    if norm.weight is not None:
        norm.weight = _select(norm.weight, keep, 0)
    if getattr(norm, "bias", None) is not None:
        norm.bias = _select(norm.bias, keep, 0)
    norm.normalized_shape = (len(keep),)


class WindowAttentionPruner(tp.pruner.BasePruningFunc):
    """torchvision's ShiftedWindowAttention (v1 and v2) as one layer of ``dim`` channels.

    Its input and output are the block's embedding channels, and its q, k and v have as many
    channels again (the functional window attention splits ``dim`` into heads). Pruning channel
    ``i`` removes column ``i`` of ``qkv`` and ``proj``, row ``i`` of each of q, k, v, and row
    ``i`` of ``proj``. With channel groups equal to the number of heads (see ``_arch``), every
    head loses the same offsets: the head dim shrinks and the number of heads is kept, so the
    relative-position bias (one entry per head) stays valid.
    """

    def check(self, layer, idxs, to_output):
        super().check(layer, idxs, to_output)
        remaining = layer.proj.out_features - len(idxs)
        if remaining % layer.num_heads:
            raise AssertionError(
                f"{remaining} channels left do not split into {layer.num_heads} heads"
            )

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        dim = layer.proj.out_features
        keep = _keep(dim, idxs)
        qkv_rows = [i + part * dim for part in range(3) for i in keep]
        _slice_linear(layer.qkv, rows=qkv_rows, cols=keep)
        _slice_linear(layer.proj, rows=keep, cols=keep)
        return layer

    prune_in_channels = prune_out_channels  # input and output channels are the same channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.proj.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.proj.in_features


class PatchMergingPruner(tp.pruner.BasePruningFunc):
    """torchvision's PatchMerging (v1 and v2): four 2x2 neighbours concatenated, then a Linear.

    Input channel ``i`` appears four times in the concatenation (at ``i + k * dim``), so pruning
    it removes those four columns of ``reduction`` and, when the norm comes first (v1), of the
    norm over ``4 * dim``. Output channels are rows of ``reduction`` and, when the norm comes
    last (v2), of the norm over ``2 * dim``.
    """

    def __init__(self, norm_first: bool = True) -> None:
        super().__init__()
        self.norm_first = norm_first

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        dim = layer.dim
        keep = _keep(dim, idxs)
        keep4 = [i + k * dim for k in range(4) for i in keep]
        if self.norm_first:
            _slice_layer_norm(layer.norm, keep4)
        _slice_linear(layer.reduction, cols=keep4)
        layer.dim = len(keep)
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(layer.reduction.out_features, idxs)
        if not self.norm_first:
            _slice_layer_norm(layer.norm, keep)
        _slice_linear(layer.reduction, rows=keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.reduction.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.dim


class RecurrentPruner(tp.pruner.BasePruningFunc):
    """``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (any number of layers, either direction) as one
    layer whose output channels are its hidden units (``hidden_size`` per direction).

    Torch-Pruning 1.6's own LSTM pruner takes one layer only and slices the wrong axes, so it is
    not used. Unit ``k`` owns row ``k`` of every gate in ``weight_ih``, ``weight_hh`` and both
    biases, column ``k`` of ``weight_hh`` (its own recurrence) and, in the next layer, column
    ``k`` of each direction's block of ``weight_ih``. The same units go in every layer and both
    directions: the final states (``h_n``, ``c_n``) of every layer then keep the output's
    channels, so a head reading ``h_n[-1]`` is pruned as one reading ``output[:, -1]``. With
    channel groups equal to the directions (see ``_arch``), both directions lose the same units.
    """

    def check(self, layer, idxs, to_output):
        super().check(layer, idxs, to_output)
        if getattr(layer, "proj_size", 0):
            raise AssertionError("a recurrent layer with proj_size is not pruned")

    def prune_out_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
        hidden, dirs = layer.hidden_size, _directions(layer)
        units = sorted({int(i) % hidden for i in idxs})
        if len(units) * dirs != len(set(int(i) for i in idxs)):
            raise AssertionError(
                f"pruning {len(idxs)} output channels of a {dirs}-direction recurrent layer "
                "must remove the same units from each direction"
            )
        keep = _keep(hidden, units)
        gates = layer.weight_ih_l0.shape[0] // hidden
        rows = [k + g * hidden for g in range(gates) for k in keep]
        below = [k + d * hidden for d in range(dirs) for k in keep]  # the next layer's input
        for name in _parameter_names(layer):
            param = getattr(layer, name)
            param = _select(param, rows, 0)
            if name.startswith("weight_hh"):
                param = _select(param, keep, 1)
            elif name.startswith("weight_ih") and not name.startswith("weight_ih_l0"):
                param = _select(param, below, 1)
            setattr(layer, name, param)
        layer.hidden_size = len(keep)
        layer.flatten_parameters()  # cuDNN's packed weights (a no-op on CPU)
        return layer

    def prune_in_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(layer.input_size, idxs)
        for name in _parameter_names(layer):
            if name.startswith("weight_ih_l0"):  # the first layer's, of either direction
                setattr(layer, name, _select(getattr(layer, name), keep, 1))
        layer.input_size = len(keep)
        layer.flatten_parameters()  # cuDNN's packed weights (a no-op on CPU)
        return layer

    def get_out_channels(self, layer: nn.RNNBase) -> int:
        return layer.hidden_size * _directions(layer)

    def get_in_channels(self, layer: nn.RNNBase) -> int:
        return layer.input_size

    def get_out_channel_groups(self, layer: nn.RNNBase) -> int:
        return _directions(layer)  # each direction loses the same units


def _directions(layer: nn.RNNBase) -> int:
    return 2 if layer.bidirectional else 1


def _parameter_names(layer: nn.RNNBase) -> list[str]:
    """Its weights and biases (``weight_ih_l0``, ``bias_hh_l1_reverse``, ...)."""
    return [name for name, _ in layer.named_parameters(recurse=False)]


class OutputPruner(tp.ops.OutputPruner):
    """Torch-Pruning's pruner of a model's outputs, for outputs without a channel dim too: its
    own cuts ``shape[1]`` of any output, and a 0-d output (the trace's one-channel maps,
    summed: search_space/_broadcast.py) failed with "IndexError: list index out of range"."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if layer.shape is not None and len(layer.shape) < 2:
            return layer  # nothing to cut: it reads no channels (get_out_channels: None)
        return super().prune_out_channels(layer, idxs)

    prune_in_channels = prune_out_channels


class InstanceNormPruner(tp.pruner.function.InstanceNormPruner):
    """Torch-Pruning's InstanceNorm pruner, which also cuts the running statistics: with
    ``track_running_stats`` its own left ``running_mean`` at the old width, and the pruned
    model failed on its first call (so discovery left the layer before it out)."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(layer.num_features, idxs)
        for name in ("running_mean", "running_var"):
            stats = getattr(layer, name, None)
            if stats is not None:
                index = torch.as_tensor(keep, dtype=torch.long, device=stats.device)
                setattr(layer, name, stats.index_select(0, index).contiguous())
        return super().prune_out_channels(layer, idxs)

    prune_in_channels = prune_out_channels
