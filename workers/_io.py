"""Save and load pruned models without pickles.

A file is safetensors: the pruned tensors, plus JSON metadata holding the plan, the changed
module attributes (channel counts and the like) and a fingerprint of the base model. Loading
rebuilds the pruned architecture on top of a freshly built base model, so nothing in the file
is ever executed; a file made for another base model, or whose bytes were changed, is refused.
The digests are unkeyed: they catch corruption and edits, not a forger; safety against a forged
file comes from nothing in it being executed, and from it only setting what pruning changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from search_space import PruningPlan, drop_blocks, dropped_modules, synced_attributes

FORMAT = "prunesearch.pruned/2"  # /2 adds a digest of the metadata (plan, attributes, base)
LEGACY_FORMATS = ("prunesearch.pruned/1",)  # tensors' digest only; still loaded
_SKIP_ATTRS = {"training"}
_SCALARS = (bool, int, float, str, type(None))


class PrunedModelError(ValueError):
    """A pruned-model file that cannot be trusted or does not fit the base model."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` or (Distributed)DataParallel wrapper runs, else ``model``.

    Why: tracing a compiled model recompiles it for every shape a dry run tries (a ResNet-18's
    discovery took 67 s against 0.2 s), and either wrapper prefixes every layer name
    (``_orig_mod.``, ``module.``), so a plan or a pruned file only fitted the wrapped model."""
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        # torch.compile's wrapper class is private; a model can only be one once it is imported.
        dynamo = sys.modules.get("torch._dynamo.eval_frame")
        if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, parallel):
            model = model.module
        else:
            return model


def base_fingerprint(model: nn.Module) -> str:
    """Names and shapes of the base model's tensors: what a pruned file must be built from."""
    shapes = [(n, list(t.shape)) for n, t in model.state_dict().items()]
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]


def pruned_bytes(
    model: nn.Module, plan: PruningPlan, base_model: nn.Module, extra: dict[str, Any] | None = None
) -> bytes:
    """Serialise a pruned model; ``base_model`` is the unpruned model it came from."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "plan": plan.to_dict(),
        "base": base_fingerprint(base_model),
        "attributes": _changed_attributes(model, base_model, dropped_modules(plan.drop)),
        "extra": extra or {},
        "digest": _digest(tensors),
    }
    meta["meta_digest"] = _meta_digest(meta)
    return st_save(tensors, metadata={"prunesearch": json.dumps(meta, sort_keys=True)})


def save_pruned(
    model: nn.Module,
    plan: PruningPlan,
    path: str | os.PathLike,
    base_model: nn.Module,
    **extra: Any,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pruned_bytes(model, plan, base_model, extra))
    os.replace(tmp, path)
    return path


def load_pruned(
    source: str | os.PathLike | bytes, base_model: nn.Module
) -> tuple[nn.Module, PruningPlan]:
    """Rebuild the pruned model on ``base_model`` (modified in place) and return it with its plan.
    A compiled or DataParallel ``base_model`` is unwrapped, as the search unwrapped it."""
    base_model = unwrap_model(base_model)
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    meta, tensors = _read(data)
    if meta["base"] != base_fingerprint(base_model):
        raise PrunedModelError(
            "this pruned model was built from a different base model (fingerprints differ); "
            "load it with the base model its search used"
        )
    plan = PruningPlan.from_dict(meta["plan"])
    ties = tied_parameters(base_model)
    drop_blocks(base_model, plan.drop)  # the plan's dropped blocks hold no tensors
    expected = set(base_model.state_dict())
    if set(tensors) != expected:
        diff = sorted(set(tensors) ^ expected)[:5]
        raise PrunedModelError(f"tensor names differ from the base model's: {diff}")
    modules = dict(base_model.named_modules())
    for name, attrs in meta["attributes"].items():
        if name not in modules:
            raise PrunedModelError(f"the file changes module {name!r}, which the base model lacks")
        values = {a: _like(vars(modules[name]).get(a), v) for a, v in attrs.items()}
        # All checked before any is set: what a module may have set is read off the base
        # module (a dense layer's widths: by what it computes, which a half-set one does not).
        for attr, value in values.items():
            _check_attribute(modules[name], name, attr, value)
        for attr, value in values.items():
            setattr(modules[name], attr, value)
    for key, tensor in tensors.items():
        module_name, _, attr = key.rpartition(".")
        module = modules[module_name]
        if attr in module._parameters:
            old = module._parameters[attr]
            module._parameters[attr] = nn.Parameter(
                tensor, requires_grad=old.requires_grad if old is not None else True
            )
        else:
            module._buffers[attr] = tensor
    retie(base_model, ties)
    return base_model.eval(), plan


def tied_parameters(model: nn.Module) -> list[tuple[str, ...]]:
    """The names that share one parameter (an embedding tied to the output layer), per
    parameter shared."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [tuple(n) for n in names.values() if len(n) > 1]


def retie(model: nn.Module, ties: Iterable[tuple[str, ...]]) -> None:
    """Make each tie of ``ties`` one parameter again. Pruning replaces a layer's weight with a
    smaller one, layer by layer, and loading sets each name: both leave tied names holding
    equal but separate tensors, which a finetune then trains apart. A tie of which a name is
    gone (in a block the plan dropped) is left as it is."""
    for names in ties:
        if not all(_has_parameter(model, n) for n in names):
            continue
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            if getattr(module, attr).shape != first.shape:
                raise ValueError(f"tied parameters {names} were pruned to different shapes")
            setattr(module, attr, first)


def _has_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def read_plan(source: str | os.PathLike | bytes) -> PruningPlan:
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return PruningPlan.from_dict(_read(data)[0]["plan"])


def _read(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        tensors = st_load(data)
        # safetensors' header is 8 bytes of length, then JSON holding our metadata.
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["prunesearch"])
    except (SafetensorError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise PrunedModelError(f"not a prunesearch pruned-model file: {exc}") from exc
    if meta.get("format") not in (FORMAT, *LEGACY_FORMATS):
        raise PrunedModelError(f"unsupported format {meta.get('format')!r}; expected {FORMAT}")
    if meta.get("digest") != _digest(tensors):
        raise PrunedModelError(
            "the tensors do not match the file's digest: the file was changed after saving"
        )
    if meta["format"] == FORMAT and meta.get("meta_digest") != _meta_digest(meta):
        raise PrunedModelError(
            "the plan or attributes do not match the file's digest: the file was changed "
            "after saving"
        )
    return meta, tensors


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# What Torch-Pruning changes when it removes channels: sizes, never behaviour. A file may set
# these and nothing else (padding_mode, eps, Dropout.p, ... stay the base model's).
PRUNED_ATTRIBUTES = frozenset(
    {
        "in_channels",
        "out_channels",
        "groups",
        "in_features",
        "out_features",
        "num_features",
        "num_channels",
        "num_groups",
        "normalized_shape",
        "num_parameters",
        "embedding_dim",
        "embed_dim",
        "kdim",
        "vdim",
        "num_heads",
        "head_dim",
        "input_size",
        "hidden_size",
        "proj_size",
    }
)


def settable_attributes(module: nn.Module) -> frozenset[str]:
    """What a pruned file may set on ``module``: the sizes Torch-Pruning changes, and those the
    search space's handler for its type writes (ViT's ``hidden_dim``, PatchMerging's ``dim``),
    only there: ``dim`` on a Softmax is its axis."""
    return PRUNED_ATTRIBUTES | synced_attributes(module)


def _check_attribute(module: nn.Module, name: str, attr: str, value: Any) -> None:
    """A file may only change what pruning changes: a size attribute the module already has,
    to a positive integer (or tuple of them) no larger than the base model's."""
    current = vars(module).get(attr, _MISSING)
    if (
        attr not in settable_attributes(module)
        or current is _MISSING
        or not _shrinks(current, value)
    ):
        raise PrunedModelError(
            f"the file sets {name}.{attr} = {value!r}, which pruning never changes; "
            "it was not made by save_pruned"
        )


def _like(current: Any, value: Any) -> Any:
    """A JSON list as the container the module holds (a list of split sizes stays a list);
    a tuple otherwise."""
    if isinstance(value, list):
        return list(value) if isinstance(current, list) else tuple(value)
    return value


def _shrinks(current: Any, value: Any) -> bool:
    """``value`` is ``current`` made smaller or equal: same shape, positive integers."""
    if isinstance(current, (tuple, list)) and type(value) is type(current):
        return len(current) == len(value) and all(
            _shrinks(c, v) for c, v in zip(current, value, strict=True)
        )
    return type(current) is int and type(value) is int and 0 < value <= current


_MISSING = object()


def state_digest(model: nn.Module) -> str:
    """The content of a model's tensors (names, dtypes, shapes, bytes): a new checkpoint differs
    even when its architecture does not (``base_fingerprint`` only sees the shapes)."""
    return _digest({k: v.detach().cpu() for k, v in model.state_dict().items()})


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _changed_attributes(
    model: nn.Module, base: nn.Module, dropped: Iterable[str] = ()
) -> dict[str, dict[str, Any]]:
    """JSON-safe module attributes that pruning changed (out_channels, num_features, ...); a
    block the plan dropped is the identity, which its plan rebuilds, not an attribute."""
    base_modules = dict(base.named_modules())
    changed: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if name in dropped:
            continue
        ref = base_modules.get(name)
        if ref is None:
            raise ValueError(
                f"module {name!r} is not in the base model; pruning must not add modules"
            )
        diff = {
            k: v
            for k, v in vars(module).items()
            if k not in _SKIP_ATTRS and _json_safe(v) and vars(ref).get(k) != v
        }
        allowed = settable_attributes(module)
        unknown = sorted(set(diff) - allowed)
        if unknown:
            raise ValueError(
                f"module {name!r}: pruning changed {unknown}, which a pruned file may not set "
                f"(only sizes: {sorted(allowed)})"
            )
        if diff:
            changed[name] = diff
    return changed


def _json_safe(value: Any) -> bool:
    if isinstance(value, _SCALARS):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value)
