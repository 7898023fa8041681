"""Dense layers of a type Torch-Pruning has no pruner for, recognised by what they compute.

Hugging Face's GPT-2 ``Conv1D`` (``addmm(bias, x, weight)``, its weight stored in by out) and
any hand-written layer like it is no layer Torch-Pruning knows: GPT-2 had no prunable group at
all, its MLPs' widths and its residual stream included. A module is taken for a dense layer
when its only state is a 2-D ``weight`` and an optional ``bias``, and on random inputs it
computes exactly ``x @ weight + bias`` (weight stored in by out) or ``x @ weight.T + bias``
(out by in): then :class:`DensePruner` cuts its weight's columns or rows, as Torch-Pruning cuts
an ``nn.Linear``'s. What it computes is checked, not its name, so a layer that does more (a
mask, a scale, an activation) is not taken for one and stays listed with why it is not searched.

Its integer attributes that hold a width (GPT-2's ``nf``, which its ``forward`` reshapes the
output by, and ``nx``) follow the cut. Where both widths are equal, an attribute holds the
output width if a copy one output channel narrower, the attribute set to match, computes right
(the forward sizes its output by it); the others hold the input width.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from ._layers import _keep, _select

IN_OUT, OUT_IN = "in_out", "out_in"  # how the weight is stored: (in, out) or (out, in)


@dataclass(frozen=True)
class DenseLayout:
    stored: str  # IN_OUT or OUT_IN
    out_attrs: tuple[str, ...] = ()  # integer attributes holding the output width
    in_attrs: tuple[str, ...] = ()  # ... and the input width


def dense_layout(module: nn.Module) -> DenseLayout | None:
    """How ``module`` stores a dense layer's weight, if it is one Torch-Pruning does not know
    (see the module); None otherwise."""
    weight, bias = _state(module)
    if weight is None:
        return None
    training = module.training
    module.eval()  # the same answer in either mode (a dropout inside is no reason to differ)
    try:
        for stored in (IN_OUT, OUT_IN):
            if _computes(module, weight, bias, stored):
                return _with_attrs(module, stored)
        return None
    finally:
        module.train(training)


def _state(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Its 2-D weight and 1-D bias (or None), where they are all the state it holds."""
    if tp.ops.module2type(module) != tp.ops.OPTYPE.ELEMENTWISE or next(module.children(), None):
        return None, None  # a layer type Torch-Pruning prunes, or a container
    params = dict(module.named_parameters(recurse=False))
    weight, bias = params.pop("weight", None), params.pop("bias", None)
    if params or next(module.buffers(recurse=False), None) is not None:
        return None, None
    if weight is None or weight.dim() != 2 or not weight.dtype.is_floating_point:
        return None, None
    if bias is not None and (bias.dim() != 1 or bias.numel() not in weight.shape):
        return None, None
    return weight, bias


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, stored: str) -> Callable:
    w = weight if stored == OUT_IN else weight.t()
    return lambda x: nn.functional.linear(x, w, bias)


@torch.no_grad()
def _computes(
    module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, stored: str
) -> bool:
    """Whether ``module`` computes the dense layer ``stored`` describes, on random inputs of 2
    and 3 dims (at least one of which it takes)."""
    n_in = weight.shape[0] if stored == IN_OUT else weight.shape[1]
    n_out = weight.shape[1] if stored == IN_OUT else weight.shape[0]
    if bias is not None and bias.numel() != n_out:
        return False
    expected, ran = _linear(weight, bias, stored), False
    generator = torch.Generator().manual_seed(0)
    for shape in ((4, n_in), (2, 3, n_in)):
        x = torch.randn(shape, generator=generator, dtype=weight.dtype).to(weight.device)
        try:
            got = module.forward(x)  # not its hooks: a trace's, or a user's, see no probe
        except Exception:  # noqa: BLE001 (a layer that takes no such input: not this shape)
            continue
        want = expected(x)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return False
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max() + 1)):
            return False
        ran = True
    return ran


def _with_attrs(module: nn.Module, stored: str) -> DenseLayout:
    """``stored`` with the integer attributes holding its widths (see the module)."""
    weight = module.weight
    n_in, n_out = weight.shape if stored == IN_OUT else weight.shape[::-1]
    outs, ins = [], []
    for attr, value in vars(module).items():
        if type(value) is not int or value not in (n_in, n_out) or attr.startswith("_"):
            continue
        if value == n_out and (n_in != n_out or _sizes_output(module, stored, attr)):
            outs.append(attr)
        else:
            ins.append(attr)
    return DenseLayout(stored, tuple(outs), tuple(ins))


def _sizes_output(module: nn.Module, stored: str, attr: str) -> bool:
    """Whether a copy of ``module`` one output channel narrower, ``attr`` changed to match,
    computes the narrower layer."""
    trial, pruner = copy.deepcopy(module), DensePruner(DenseLayout(stored))
    width = pruner.get_out_channels(trial)
    pruner.prune_out_channels(trial, [width - 1])
    setattr(trial, attr, width - 1)
    return _computes(trial, trial.weight, getattr(trial, "bias", None), stored)


class DensePruner(tp.pruner.BasePruningFunc):
    """A dense layer Torch-Pruning does not know (see :func:`dense_layout`), cut as an
    ``nn.Linear`` is: output channels are its weight's out-dim entries and its bias's, input
    channels its in-dim entries; its width attributes follow."""

    def __init__(self, layout: DenseLayout) -> None:
        super().__init__()
        self.layout = layout

    def _dims(self) -> tuple[int, int]:
        return (1, 0) if self.layout.stored == IN_OUT else (0, 1)  # (out dim, in dim)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        out_dim, _ = self._dims()
        keep = _keep(layer.weight.shape[out_dim], idxs)
        layer.weight = _select(layer.weight, keep, out_dim)
        if getattr(layer, "bias", None) is not None:
            layer.bias = _select(layer.bias, keep, 0)
        for attr in self.layout.out_attrs:
            setattr(layer, attr, len(keep))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        _, in_dim = self._dims()
        keep = _keep(layer.weight.shape[in_dim], idxs)
        layer.weight = _select(layer.weight, keep, in_dim)
        for attr in self.layout.in_attrs:
            setattr(layer, attr, len(keep))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.weight.shape[self._dims()[0]])

    def get_in_channels(self, layer: nn.Module) -> int:
        return int(layer.weight.shape[self._dims()[1]])

    def channel_scores(
        self, layer: nn.Module, out: bool, score: Callable[[nn.Parameter], torch.Tensor]
    ) -> torch.Tensor:
        """``score`` of each weight (and bias) summed per output (``out``) or input channel."""
        out_dim, in_dim = self._dims()
        dim = out_dim if out else in_dim
        total = score(layer.weight).movedim(dim, 0).sum(1)
        bias = getattr(layer, "bias", None)
        return total + score(bias) if out and bias is not None else total
