"""Layers whose weight a parametrization computes (``weight_norm``, as audio models use it).

Torch-Pruning prunes a layer by replacing its weight with a smaller ``Parameter``; a
parametrized layer's weight is computed on each access, so TP fails on it and such layers
were left out. Before a pruner is built their parametrizations are removed, leaving the
weight they computed (the same function); once pruned, the same parametrizations are
registered again on the smaller weight through their ``right_inverse`` (``weight_norm``:
``g = |w|``, ``v = w``, exact), so the layer's tensor names, and what a finetune trains, are
the base model's. A parametrization that keeps state shaped by the weight (``spectral_norm``'s
power-iteration vectors) cannot be put back on a smaller weight: it is left in place, and TP's
failure on it leaves its layer out, with the reason, as before. The older hook form,
``torch.nn.utils.weight_norm`` (``weight_g``, ``weight_v``), is taken off and put back the same
way.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import weight_norm as hooked_weight_norm
from torch.nn.utils.weight_norm import WeightNorm, remove_weight_norm


@dataclass
class Stripped:
    """A parametrization taken off one tensor of one module, and how to put it back."""

    module: nn.Module
    tensor: str
    parametrizations: list[nn.Module]
    originals: dict[str, nn.Parameter]  # what the parametrizations computed from (g, v)
    unsafe: bool  # as registered (weight_norm registers unsafe: no shape checks)

    def restore(self) -> None:
        for p in self.parametrizations:
            parametrize.register_parametrization(self.module, self.tensor, p, unsafe=self.unsafe)
        _keep_if_unpruned(self.module.parametrizations[self.tensor], self.originals)


@dataclass
class HookStripped:
    """The older ``torch.nn.utils.weight_norm`` (a forward pre-hook) taken off one tensor."""

    module: nn.Module
    tensor: str
    dim: int
    originals: dict[str, nn.Parameter]  # weight_g, weight_v

    def restore(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated, and the model's own
            hooked_weight_norm(self.module, self.tensor, self.dim)
        _keep_if_unpruned(self.module, self.originals)


def _keep_if_unpruned(owner: nn.Module, originals: dict[str, nn.Parameter]) -> None:
    """Nothing was pruned (a trace): the very tensors it had, not ones re-derived from the
    weight (equal only to rounding)."""
    now = {n: getattr(owner, n).shape for n in originals}
    if now == {n: p.shape for n, p in originals.items()}:
        for name, original in originals.items():
            setattr(owner, name, original)


def strip_parametrizations(model: nn.Module) -> list[Stripped | HookStripped]:
    """Remove every restorable parametrization of ``model``, keeping the values it computed."""
    out: list[Stripped | HookStripped] = []
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):  # torch's own remover reads it so
            if isinstance(hook, WeightNorm):
                names = (f"{hook.name}_g", f"{hook.name}_v")
                originals = {n: getattr(module, n) for n in names}
                remove_weight_norm(module, hook.name)
                out.append(HookStripped(module, hook.name, hook.dim, originals))
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


def restore_parametrizations(stripped: list[Stripped | HookStripped]) -> None:
    """Put back what ``strip_parametrizations`` removed, on the (pruned) tensors."""
    for s in stripped:
        s.restore()


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``. A layer under the hook form of weight_norm keeps the weight its
    last forward computed; after a forward with gradients that tensor is no graph leaf, which a
    deep copy refuses (pytorch#103001). Every forward computes it again, so it is detached
    first (a pending backward keeps its own references)."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            weight = getattr(module, hook.name, None) if isinstance(hook, WeightNorm) else None
            if isinstance(weight, torch.Tensor) and weight.grad_fn is not None:
                setattr(module, hook.name, weight.detach())
    return copy.deepcopy(model, _derived_tensors(model))


def _derived_tensors(model: nn.Module) -> dict[int, Any]:
    """A deep copy's memo holding, for each tensor with a graph (no leaf) that a module keeps in
    a plain attribute, a detached copy: a cache of values computed from its parameters (timm's
    LeViT keeps its attention biases gathered per position, computed in an eval forward), which
    a deep copy refuses as it refuses weight_norm's. The copy's cache holds the same values."""
    memo: dict[int, Any] = {}  # keyed by id: the model holds each original while it is copied

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.grad_fn is not None and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for module in model.modules():
        for value in vars(module).values():
            walk(value)
    return memo


def computed_weights(model: nn.Module) -> nn.Module:
    """``model`` with every parametrized weight computed once into a plain one (a copy; the
    model itself where it has none): the same function, and what pickles. A parametrized
    module refuses to pickle, so this is what travels to a latency bench; it times the model as
    deployed once ``remove_weight_norm`` has run, as inference code does for such models."""
    if not any(parametrize.is_parametrized(m) for m in model.modules()):
        return model
    plain = copy_model(model)
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
