"""Layers whose weight a parametrization computes (``weight_norm``, as audio models use it).

Torch-Pruning prunes a layer by replacing its weight with a smaller ``Parameter``; a
parametrized layer's weight is computed on each access, so TP fails on it and such layers
were left out. Before a pruner is built their parametrizations are removed, leaving the
weight they computed (the same function); once pruned, the same parametrizations are
registered again on the smaller weight through their ``right_inverse`` (``weight_norm``:
``g = |w|``, ``v = w``, exact), so the layer's tensor names, and what a finetune trains, are
the base model's. A parametrization that keeps state shaped by the weight (``spectral_norm``'s
power-iteration vectors) cannot be put back on a smaller weight: it is left in place, and TP's
failure on it leaves its layer out, with the reason, as before.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize


@dataclass
class Stripped:
    module: nn.Module
    tensor: str
    parametrizations: list[nn.Module]
    originals: dict[str, nn.Parameter]  # what the parametrizations computed from (g, v)
    unsafe: bool  # as registered (weight_norm registers unsafe: no shape checks)


def strip_parametrizations(model: nn.Module) -> list[Stripped]:
    """Remove every restorable parametrization of ``model``, keeping the values it computed."""
    out = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor, stack in list(module.parametrizations.items()):
            found = list(stack)
            if not all(_restorable(p) for p in found):
                continue
            originals = dict(stack.named_parameters(recurse=False))
            unsafe = bool(getattr(stack, "unsafe", False))
            _own_class(module)
            parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
            out.append(Stripped(module, tensor, found, originals, unsafe))
    return out


def restore_parametrizations(stripped: list[Stripped]) -> None:
    """Register again what ``strip_parametrizations`` removed, on the (pruned) tensors."""
    for s in stripped:
        for p in s.parametrizations:
            parametrize.register_parametrization(s.module, s.tensor, p, unsafe=s.unsafe)
        stack = s.module.parametrizations[s.tensor]
        now = dict(stack.named_parameters(recurse=False))
        if {n: p.shape for n, p in now.items()} == {n: p.shape for n, p in s.originals.items()}:
            # Nothing was pruned (a trace): the very tensors it had, not ones re-derived from
            # the weight (equal only to rounding).
            for name, original in s.originals.items():
                setattr(stack, name, original)


def computed_weights(model: nn.Module) -> nn.Module:
    """``model`` with every parametrized weight computed once into a plain one (a copy; the
    model itself where it has none): the same function, and what pickles. A parametrized
    module refuses to pickle, so this is what travels to a latency bench; it times the model as
    deployed once ``remove_weight_norm`` has run, as inference code does for such models."""
    if not any(parametrize.is_parametrized(m) for m in model.modules()):
        return model
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if parametrize.is_parametrized(module):
            _own_class(module)
            for tensor in list(module.parametrizations):
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
            # weight_norm also leaves a state-dict hook, a local function (it reads old
            # checkpoints); a copy that is only timed loads none, and must pickle.
            module._load_state_dict_pre_hooks.clear()
    return plain


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a class of its own. A parametrized module's class is made for it, holding
    the parametrized properties, and a deep copy shares it: removing the parametrization from
    a copy (a trial's, a candidate's) deletes the property from that shared class, and the
    original module loses its weight."""
    cls = module.__class__
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def _restorable(p: nn.Module) -> bool:
    """It can be computed back from any tensor (it has a right inverse) and holds nothing of its
    own shaped by the tensor it was registered on."""
    has_inverse = callable(getattr(p, "right_inverse", None))
    return (
        has_inverse and not any(True for _ in p.parameters()) and not any(True for _ in p.buffers())
    )
