"""Routes: where a group's channels really go, checked against where Torch-Pruning maps them.

Why: Torch-Pruning takes an op it does not know for an element-wise one (channel i in, channel i
out), and maps a reshape by shapes alone. A channel rolled, flipped or indexed to another
position (``torch.roll(x, 1, 1)``, ``torch.flip(x, (1,))``, ``x[:, perm]``), or folded by a
hand-written space-to-depth (``view``, ``permute``, ``reshape``), then has its readers cut at
the wrong inputs: with a roll or a flip the pruned model ran, with the right shapes, reading the
wrong channels. No list of ops covers every model (``CHANNEL_MOVERS`` names the common ones up
front), so the data is asked: a few channels of each group's root layer get a large
perturbation, each in its own row of a batch of copies of the example input, and every layer
Torch-Pruning would cut the input channels of records which of its inputs moved (the readers
that mix channels pass the reference on, so a probe travels only paths free of layers). Where the
perturbation arrived but at none of the inputs Torch-Pruning maps that channel to, the group is
misrouted and left out. Where it arrived nowhere (a zero-initialised norm, a saturated gate),
or a reader's batch is not the rows (a sequence-first layout), the check says nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ._arch import call_model, flatten

PROBES = 3  # channels perturbed per group
ROWS = 32  # at most this many rows in one forward pass (the first is the reference)
# And at most this many input elements: a row costs a sample's activations (maxvit_t at 224 px
# took over 20 GB in 32 rows), so large inputs go a few rows at a time.
ROW_ELEMENTS = 2**20
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Ops that keep channel i at channel i (or, a concat, at Torch-Pruning's own offset), by their
# autograd node's name: a group whose path holds only these and layers is not probed (it costs
# forward passes: a few seconds on a large model); any other op is named in the reason.
_KEEP = frozenset(
    {
        *("Relu", "Gelu", "Silu", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Hardtanh"),
        *("LeakyRelu", "Elu", "Softplus", "Mish", "Add", "Sub", "Mul", "Div", "Neg", "Clamp"),
        *("Clone", "Cat", "ToCopy", "AccumulateGrad", "T"),
        *("NativeBatchNorm", "NativeLayerNorm", "NativeGroupNorm"),
        *("MaxPool2DWithIndices", "AvgPool2D", "AdaptiveAvgPool2D", "AdaptiveMaxPool2D"),
        *("UpsampleNearest2D", "UpsampleBilinear2D"),
    }
)


@dataclass(frozen=True)
class _Probe:
    group: str
    root: nn.Module
    channel: int
    mapped: Mapping[nn.Module, frozenset[int]]  # each reader's inputs Torch-Pruning cuts with it
    ops: tuple[str, ...]  # the group's functional ops that could move channels, for the reason

    def verdict(self, arrived: Mapping[nn.Module, set[int]], names: Mapping[nn.Module, str]) -> str:
        for reader, cut in self.mapped.items():
            seen = arrived.get(reader, set())
            if seen and not seen & cut:
                via = f" (it passes through {', '.join(self.ops)})" if self.ops else ""
                return (
                    f"its channels reach '{names.get(reader, '?')}' elsewhere than Torch-Pruning "
                    f"maps them: channel {self.channel} arrives at input(s) {few_channels(seen)}, where "
                    f"it would cut {few_channels(cut)}{via}; an op between them moves channels where "
                    "Torch-Pruning does not follow, so it is not pruned"
                )
        return ""


def misrouted_groups(
    model: nn.Module,
    example_inputs: Any,
    dg: tp.DependencyGraph,
    roots: Iterable[tuple[str, nn.Module]],
) -> dict[str, str]:
    """The groups (their root's name and module) whose channels reach a reader elsewhere than
    Torch-Pruning maps them, each with why (see the module's docstring)."""
    names = {m: n for n, m in model.named_modules()}
    probes = [p for name, root in roots for p in _probes(dg, name, root)]
    found: dict[str, str] = {}
    per_pass = _rows_per_pass(example_inputs) - 1
    for start in range(0, len(probes), per_pass):
        chunk = probes[start : start + per_pass]
        moved = _moved(model, example_inputs, chunk)
        if moved is None:  # the batch of copies would not run: nothing to say
            return found
        for probe, arrived in zip(chunk, moved, strict=True):
            reason = found.get(probe.group) or probe.verdict(arrived, names)
            if reason:
                found[probe.group] = reason
    return found


def _probes(dg: tp.DependencyGraph, name: str, root: nn.Module) -> list[_Probe]:
    """A few of ``root``'s channels, each with the inputs of every reader Torch-Pruning cuts
    with it; none where the group's path holds only layers and ``_KEEP`` ops."""
    channels = dg.get_out_channels(root)
    if not isinstance(root, _LAYERS) or not channels or channels < 2:
        return []
    fn = dg.get_pruner_of_module(root).prune_out_channels
    picked = sorted({min(channels - 1, int((i + 0.5) * channels / PROBES)) for i in range(PROBES)})
    groups = {picked[0]: dg.get_pruning_group(root, fn, picked[0:1])}
    ops = _movers(groups[picked[0]])  # the same ops whichever channel: one group read for them
    if not ops:
        return []
    probes = []
    for c in picked:
        mapped: dict[nn.Module, set[int]] = {}
        for dep, idxs in groups.get(c) or dg.get_pruning_group(root, fn, [c]):
            layer = dep.target.module
            if isinstance(layer, _LAYERS) and dg.is_in_channel_pruning_fn(dep.handler):
                mapped.setdefault(layer, set()).update(int(getattr(i, "idx", i)) for i in idxs)
        if mapped:
            frozen = {m: frozenset(s) for m, s in mapped.items()}
            probes.append(_Probe(name, root, c, frozen, ops))
    return probes


def _movers(group: Any) -> tuple[str, ...]:
    """The ops on ``group``'s path that are neither layers, norms nor ``_KEEP`` ops."""
    ops = {
        type(dep.target.grad_fn).__name__.removesuffix("Backward0")
        for dep, _ in group
        if not isinstance(dep.target.module, (*_LAYERS, nn.modules.batchnorm._NormBase))
    }
    return tuple(sorted(op.lower() for op in ops - _KEEP))


def _moved(
    model: nn.Module, example_inputs: Any, probes: Sequence[_Probe]
) -> list[dict[nn.Module, set[int]]] | None:
    """For each probe (row ``i + 1``), the input channels of its readers that moved against
    row 0 when its channel was perturbed; None when the rows would not run."""
    rows = len(probes) + 1
    moved: list[dict[nn.Module, set[int]]] = [{} for _ in probes]
    hooks = []
    for root in {p.root: None for p in probes}:
        mine = [(i + 1, p.channel) for i, p in enumerate(probes) if p.root is root]
        hooks.append(root.register_forward_hook(_perturb(mine, rows, isinstance(root, nn.Linear))))
    for reader in {m: None for p in probes for m in p.mapped}:
        hooks.append(reader.register_forward_pre_hook(_watch(reader, rows, moved)))
        if _mixes(reader):
            hooks.append(reader.register_forward_hook(_held(rows)))
    try:
        with torch.no_grad():
            call_model(model, _rows(example_inputs, rows))
    except Exception:  # noqa: BLE001 - a model that cannot take these rows is not judged
        return None
    finally:
        for h in hooks:
            h.remove()
    return moved


def _perturb(probes: Sequence[tuple[int, int]], rows: int, last: bool):
    def hook(_module: nn.Module, _args: Any, out: Any) -> Any:
        # Only where the rows are the first dimension (not a sequence-first layout's length).
        if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != rows:
            return None
        out = out.clone()
        scale = 4 * float(out[0].std()) + 1.0
        gen = torch.Generator().manual_seed(0)
        for row, channel in probes:
            part = out[row, ..., channel] if last else out[row, channel]
            # Signs vary, so a ReLU or a one-sided gate after the layer passes some of it.
            signs = torch.randint(0, 2, part.shape, generator=gen).to(out.dtype) * 2 - 1
            part += scale * signs.to(out.device)
        return out

    return hook


def _mixes(layer: nn.Module) -> bool:
    """``layer`` makes each output channel of several input channels (all but a depthwise conv)."""
    groups = getattr(layer, "groups", 1)
    return not (groups > 1 and groups == getattr(layer, "in_channels", 0))


def _held(rows: int):
    """A reader that mixes channels passes the reference row's output on in every probe's row:
    a probe then reaches each reader only along paths free of layers, which is what Torch-Pruning
    maps. Why: through a residual block the perturbed channel reaches every channel of the sum
    (its convs mix them), and where the block's last ReLU is off at that channel (one position,
    at 1x1: half the time) it arrived everywhere but there, and ResNet-18 at 16 px had its last
    stage left out now and then, by the weights it was trained to."""

    def hook(_module: nn.Module, _args: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != rows:
            return None
        return out[:1].expand_as(out).clone()

    return hook


def _watch(reader: nn.Module, rows: int, moved: list[dict[nn.Module, set[int]]]):
    def hook(_module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != rows:
            return
        dim = -1 if isinstance(reader, nn.Linear) else 1
        diff = (x[1:] - x[:1]).abs().movedim(dim, 1)
        diff = diff.reshape(rows - 1, diff.shape[1], -1).amax(2)  # rows-1 x channels
        tol = 1e-4 * (float(x[0].abs().max()) + 1e-8)
        for i, row in enumerate((diff > tol).tolist()):
            moved[i].setdefault(reader, set()).update(c for c, hit in enumerate(row) if hit)

    return hook


def _rows(example_inputs: Any, rows: int) -> Any:
    """``rows`` copies of the example inputs' first sample (every tensor's first dimension)."""
    if isinstance(example_inputs, torch.Tensor):
        one = example_inputs[:1]
        return one.expand(rows, *one.shape[1:]).contiguous()
    if isinstance(example_inputs, dict):
        return {k: _rows(v, rows) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(_rows(v, rows) for v in example_inputs)
    return example_inputs


def _rows_per_pass(example_inputs: Any) -> int:
    sample = sum(t[:1].numel() for t in flatten(example_inputs) if t.dim() > 0)
    return max(2, min(ROWS, ROW_ELEMENTS // max(1, sample)))


def few_channels(channels: Iterable[int], most: int = 4) -> str:
    ordered = sorted(channels)
    shown = ", ".join(str(c) for c in ordered[:most])
    return f"[{shown}{', ...' if len(ordered) > most else ''}]"
