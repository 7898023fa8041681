"""Discovery: which channel groups of a model can be pruned, under stable names.

A *group* is Torch-Pruning's unit of coupled channels (DepGraph): pruning one channel of its
root layer removes the matching channels of every layer that depends on it. We name a group
after its root module's qualified name, which is stable across processes and code versions.

Layers Torch-Pruning cannot prune safely are left out automatically, each with its reason
(``Discovery.excluded``, and one warning listing them); see ``_arch`` for the layer types
that need special handling.
"""

from __future__ import annotations

import fnmatch
import re
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize

from ._arch import (
    Setup,
    all_trainable,
    call_model,
    flatten,
    root_types,
    structural_train_mode,
    walk_back,
)
from ._foreign import foreign_layers
from ._routes import few_channels, misrouted_groups
from ._verify import DIAGNOSED, failing_groups, tied_to

# Kept under their old names: other modules import them from here.
_call = call_model
_flatten = flatten

OUTPUT_REASON = "output layer: its channels are the model's outputs"
PATTERN_REASON = "excluded by pattern"
# Ops that move channels to other positions, by their autograd node's name (a module, a
# functional call or a method alike). Torch-Pruning takes an op it does not know for an
# elementwise one, channel i in to channel i out: a group through one was pruned into a model
# that ran but read the wrong channels (a ChannelShuffle), or broke (pixel_shuffle, glu).
CHANNEL_MOVERS = {
    "PixelShuffleBackward0": "pixel_shuffle, which folds each r*r channels into space",
    "PixelUnshuffleBackward0": "pixel_unshuffle, which unfolds space into r*r channels",
    "ChannelShuffleBackward0": "channel_shuffle, which interleaves its groups' channels",
    # nn.GLU and F.glu are traced as the chunk and product they compute (tied slices); this
    # names the op where it is reached another way (torch._C._nn.glu).
    "GluBackward0": "glu, which multiplies its input's two halves (chunk and multiply in "
    "forward instead, and the pair is pruned as tied slices)",
}


class DiscoveryError(ValueError):
    """The model could not be traced or analysed; the message names the model or layer."""


@dataclass(frozen=True)
class PrunableGroup:
    name: str  # qualified name of the root module
    kind: str  # root module's class name
    channels: int  # output channels of the root module (the prunable dimension)
    members: tuple[str, ...]  # every module the group touches
    # Equal slices Torch-Pruning cuts alike (grouped convs, GroupNorm, heads; see kept_channels)
    split: int = 1


@dataclass(frozen=True)
class Excluded:
    name: str
    reason: str


@dataclass(frozen=True)
class Discovery:
    groups: tuple[PrunableGroup, ...]
    excluded: tuple[Excluded, ...]
    output_layers: tuple[str, ...] = field(default=())
    # How Torch-Pruning must be configured for this model (all re-derived from the model by
    # apply_plan; recorded here so a search can report it). Names are qualified names.
    channel_groups: tuple[tuple[str, int], ...] = ()  # layer -> equal channel groups (heads)
    unwrapped: tuple[tuple[str, int], ...] = ()  # parameter -> dim holding its channels
    leaves: tuple[str, ...] = ()  # layers pruned as one unit by a custom pruner
    trace_mode: str = "eval"  # "train" when layers (auxiliary heads) run only in training

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    def group(self, name: str) -> PrunableGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


def discover(
    model: nn.Module,
    example_inputs: Any,
    *,
    exclude: Sequence[str] = (),
    min_channels: int = 2,
    verify: bool = True,
    warn: bool = True,
) -> Discovery:
    """List the prunable groups of ``model``.

    ``exclude`` holds ``fnmatch`` patterns of module names to leave out. The layers whose
    outputs are the model's outputs (the classifier head) are never pruned. Layers that
    Torch-Pruning cannot prune safely are excluded with their reason; ``warn`` reports them.
    ``verify`` first checks where each group's channels really go (``misrouted_groups``), then
    prunes a copy of the model (every group by a quarter) and excludes the groups that break it; apply_plan skips it, as its plan only names groups that passed.
    """
    model = model.eval()
    names = {m: n for n, m in model.named_modules()}
    check_patterns(exclude, names.values(), field_name="exclude")
    setup, dg, outputs = trace(model, example_inputs)
    user_out = [n for n in names.values() if n and any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    excluded = [Excluded(n, OUTPUT_REASON) for n in outputs]
    excluded += [Excluded(n, PATTERN_REASON) for n in user_out if n not in outputs]
    ignored = [m for m, n in names.items() if n in set(outputs) | set(user_out)]

    groups, dropped, owners = _collect_groups(dg, setup, names, ignored, min_channels)
    left = [(e.name, owners[e.name]) for e in dropped]
    excluded += dropped
    if verify and groups:
        skip = [*outputs, *user_out, *(e.name for e in dropped)]
        failed = _verify(model, example_inputs, dg, setup, names, groups, skip)
        left += [(g.name, owners[g.name]) for g in groups if g.name in failed]
        groups = [g for g in groups if g.name not in failed]
        excluded += [Excluded(n, reason) for n, reason in failed.items()]
    kept = {o for g in groups for o in owners[g.name]}
    excluded += _members_left_out(names, setup, left, kept, excluded)
    covered = {m for g in groups for m in g.members} | {e.name for e in excluded}
    excluded += _hidden_layers(model, dg, setup, covered, user_out)
    covered |= {e.name for e in excluded} | set(user_out)
    excluded += [Excluded(n, why) for n, why in foreign_layers(model, dg, covered)]
    if warn:
        _warn(model, excluded)
    if not groups:
        warnings.warn("discover: the model has no prunable groups", stacklevel=2)
    return Discovery(
        tuple(groups),
        tuple(excluded),
        tuple(outputs),
        channel_groups=tuple(sorted(setup.channel_groups().items())),
        unwrapped=tuple(sorted(setup.unwrapped().items())),
        leaves=tuple(sorted(setup.leaves())),
        trace_mode="train" if setup.train_mode else "eval",
    )


def trace(
    model: nn.Module, example_inputs: Any
) -> tuple[Setup, tp.DependencyGraph, tuple[str, ...]]:
    """Trace in eval mode; if some layers only run in training (auxiliary heads), trace in
    (structural) training mode instead, so those layers' input channels are pruned too."""
    setup = Setup.of(model)
    outputs = find_output_layers(model, example_inputs)
    dg = build_graph(model, example_inputs, setup)
    roots = setup.root_types()
    if not _unrun(model, dg, roots):
        return setup, dg, outputs
    train = Setup.of(model, train_mode=True)
    try:
        train_outputs = find_output_layers(model, example_inputs, train_mode=True)
        train_dg = build_graph(model, example_inputs, train)
    except DiscoveryError:
        return setup, dg, outputs
    if len(_unrun(model, train_dg, roots)) < len(_unrun(model, dg, roots)):
        return train, train_dg, train_outputs
    return setup, dg, outputs


def build_graph(
    model: nn.Module, example_inputs: Any, setup: Setup | None = None
) -> tp.DependencyGraph:
    """Trace ``model`` with DepGraph, turning tracing failures into one clear error."""
    setup = setup or Setup.of(model)
    try:
        return setup.build_graph(example_inputs)
    except RecursionError as exc:
        raise DiscoveryError(
            f"{type(model).__name__}: the dependency graph is too deep to trace"
        ) from exc
    except Exception as exc:  # TP raises many kinds; the user needs the model and the cause
        # The model already ran on the example inputs (``find_output_layers``): the fault is in
        # Torch-Pruning's reading of its graph, so say where, not "check the inputs".
        where = traceback.extract_tb(exc.__traceback__)[-1]
        raise DiscoveryError(
            f"{type(model).__name__} could not be traced by Torch-Pruning: "
            f"{type(exc).__name__}: {exc} (in {Path(where.filename).name}, {where.name}). "
            "The model runs on task.example_inputs, so this is Torch-Pruning's limit, not the "
            "inputs': please report it with the model's code"
        ) from exc


def _verify(
    model: nn.Module,
    example_inputs: Any,
    dg: tp.DependencyGraph,
    setup: Setup,
    names: Mapping[nn.Module, str],
    groups: Sequence[PrunableGroup],
    skip: Sequence[str],
) -> dict[str, str]:
    """The groups that fail verification, each with why: first those whose channels an op moves
    where Torch-Pruning does not follow (``misrouted_groups``), then, of the rest, those whose
    pruning breaks a copy of the model (``failing_groups``; ``skip``: layers never pruned)."""
    modules = {n: m for m, n in names.items()}
    failed = misrouted_groups(
        model, example_inputs, dg, [(g.name, modules[g.name]) for g in groups]
    )
    rest = [g for g in groups if g.name not in failed]
    if rest:
        broken = failing_groups(
            model,
            example_inputs,
            [g.name for g in rest],
            [*skip, *failed],
            train_mode=setup.train_mode,
            splits={g.name: g.split for g in rest if g.split > 1},
            channels={g.name: g.channels for g in rest},
        )
        failed |= {
            n: why if why.startswith(DIAGNOSED) else why + _why_broken(dg, modules[n], names)
            for n, why in broken.items()
        }
    return failed


def _collect_groups(
    dg: tp.DependencyGraph,
    setup: Setup,
    names: Mapping[nn.Module, str],
    ignored: list[nn.Module],
    min_channels: int,
) -> tuple[list[PrunableGroup], list[Excluded], dict[str, tuple[str, ...]]]:
    """The prunable groups; the roots left out, with why; and, by root, the layers whose output
    channels each group (kept or not) cuts."""
    groups: list[PrunableGroup] = []
    excluded: list[Excluded] = []
    owners: dict[str, tuple[str, ...]] = {}
    roots = list(setup.root_types())
    # Once: each call walks the model's modules. And the heads the trace saw tokens viewed as.
    heads = setup.channel_groups(), setup.viewed_heads
    for root, group, failure in _walk_groups(dg, ignored, tuple(roots)):
        name = names.get(root)
        if name is None:  # a module reached only through a functional call; cannot be named
            continue
        if group is None:
            excluded.append(Excluded(name, failure))
            owners[name] = (name,)
            continue
        barrier = (
            next(
                (
                    setup.barriers[d.target.grad_fn]
                    for d, _ in group
                    if d.target.grad_fn in setup.barriers
                ),
                None,
            )
            or _moved(group)
            or _multiplied(dg, group, names)
            or _normalised_across(group, names)
        )
        channels = dg.get_out_channels(root)
        touched = [d for d, _ in group if d.target.module in names]
        members = tuple(sorted({names[d.target.module] for d in touched}))
        owners[name] = tuple(
            sorted(
                {names[d.target.module] for d in touched if dg.is_out_channel_pruning_fn(d.handler)}
            )
        )
        if barrier is not None:
            excluded.append(Excluded(name, barrier))
        elif channels is None or channels < min_channels:
            excluded.append(Excluded(name, f"only {channels} output channel(s)"))
        elif (split := _split_of(dg, group, heads, names, channels)) * min_channels > channels:
            excluded.append(Excluded(name, SLICES_REASON.format(channels=channels, split=split)))
        else:
            groups.append(PrunableGroup(name, layer_kind(root), int(channels), members, split))
    return groups, excluded, owners


def _walk_groups(
    dg: tp.DependencyGraph, ignored: list[nn.Module], roots: tuple[type, ...]
) -> Iterator[tuple[nn.Module, Any, str]]:
    """Each root's group, as ``get_all_groups`` walks them (a layer cut by an earlier group roots
    none; a group cutting an ignored layer is skipped), with a failure of Torch-Pruning's walk
    from one root (GPT-NeoX: "list index out of range" in a split's map) that root's alone:
    (root, None, why). It ended the whole discovery with the bare error."""
    visited: set[nn.Module] = set()
    ignored = [*ignored, *dg.IGNORED_LAYERS_IN_TRACING]
    for m in list(dg.module2node):
        pruner = dg.get_pruner_of_module(m) if isinstance(m, roots) else None
        width = pruner.get_out_channels(m) if pruner is not None else None
        if m in ignored or m in visited or width is None:
            continue
        try:
            group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(width)))
        except Exception as exc:  # noqa: BLE001 - TP fails in many ways; the root is named
            yield m, None, f"{WALK_FAILED}: {type(exc).__name__}: {exc}"
            continue
        cut = [d.target.module for d, _ in group if dg.is_out_channel_pruning_fn(d.handler)]
        visited.update(cut)
        if not any(c in ignored for c in cut):
            yield m, group, ""


WALK_FAILED = "Torch-Pruning could not follow its channels through the model, so it is not pruned"


SLICES_REASON = (
    "its {channels} channels are cut in {split} equal slices (a GroupNorm's groups, a grouped "
    "conv's, or heads) of one channel each, and every slice keeps one: none can be cut"
)


def _split_of(
    dg: tp.DependencyGraph,
    group: Any,
    heads: tuple[Mapping[str, int], Mapping[str, int]],
    names: Mapping[nn.Module, str],
    channels: int,
) -> int:
    split = channel_split(dg, group, heads, names)
    return split if channels % split == 0 else 1  # TP cannot cut it: verify says so


def channel_split(
    dg: tp.DependencyGraph,
    group: Any,
    heads: tuple[Mapping[str, int], Mapping[str, int]],
    names: Mapping[nn.Module, str],
) -> int:
    """The equal slices ``group`` is cut in: the most groups of any grouped conv (not depthwise)
    or GroupNorm it touches, or heads it prunes, as Torch-Pruning's pruner finds them; or the
    slices its own channels are tied in (``tied_slices``), which the pruner is then told.
    ``heads``: a layer's heads (attention layers', by their handlers: ``Setup.channel_groups``)
    and the heads a layer's outputs were viewed as (``Setup.viewed_heads``: the group cutting
    its outputs is cut per head, not the one cutting its inputs)."""
    held, viewed = heads
    found = [1, tied_slices(dg, group)]
    for dep, _ in group:
        layer = dep.target.module
        if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups == layer.out_channels:
            continue  # depthwise: its channels go one by one
        out = dg.is_out_channel_pruning_fn(dep.handler)
        pruner = dg.get_pruner_of_module(layer)
        if pruner is not None:
            found.append(
                pruner.get_out_channel_groups(layer) if out else pruner.get_in_channel_groups(layer)
            )
        found.append(held.get(names.get(layer, ""), 1))
        if out:
            found.append(viewed.get(names.get(layer, ""), 1))
    return max(found)


def _moved(group: Any) -> str | None:
    """Why ``group`` cannot be pruned, if its channels pass through a ``CHANNEL_MOVERS`` op."""
    for dep, _ in group:
        op = type(getattr(dep.target, "grad_fn", None)).__name__
        if op in CHANNEL_MOVERS:
            return (
                f"its channels pass through {CHANNEL_MOVERS[op]}; Torch-Pruning maps channel i "
                "to channel i there, so it is not pruned"
            )
    return None


def _normalised_across(group: Any, names: Mapping[nn.Module, str]) -> str | None:
    """Why ``group`` cannot be pruned, if a LayerNorm normalises its channels together with
    other dims (``LayerNorm([C, H, W])`` after a conv, ``LayerNorm([T, C])`` on tokens):
    Torch-Pruning prunes a LayerNorm over one dim only, and the dry run failed with its bare
    ``IndexError``."""
    for dep, _ in group:
        layer = dep.target.module
        if isinstance(layer, nn.LayerNorm) and len(layer.normalized_shape) > 1:
            return (
                f"its channels are normalised by {names.get(layer, '?')!r}, a LayerNorm over "
                f"{tuple(layer.normalized_shape)}: Torch-Pruning prunes a LayerNorm over one "
                "dim only (LayerNorm(C)), so it is not pruned; channels first, GroupNorm(1, C) "
                "normalises over the same values with a scale and shift per channel, and is "
                "pruned"
            )
    return None


def _why_broken(dg: tp.DependencyGraph, root: nn.Module, names: Mapping[nn.Module, str]) -> str:
    """What likely made the dry run fail for ``root``'s group, in words, read off the traced
    graph ("" where nothing is found): the root's channels tied to each other (Torch-Pruning
    cuts each one's partners with it, so a plan's count does not hold), or layers of different
    widths tied together."""
    split = _fixed_split(dg, root)
    others = sorted(tied_to(dg, root, 0) - {0})
    tied = (
        f" (it cuts channel 0 with channel(s) {few_channels(others)} of the same layer: an op "
        "folds its channels together, as a maxout's view(B, C // k, k, ...) does)"
        # A split's parts tie their channels rightly (q's i meets k's i in the scores).
        if others and _slices_tied(dg, root) == 1 and not split
        else ""
    )
    return tied + _mixed_widths(dg, root, names) + split


def _fixed_split(dg: tp.DependencyGraph, root: nn.Module) -> str:
    """Where ``root``'s outputs are split into equal parts, a hint that a part size fixed in
    the code fits no cut ("" where not): nanoGPT's ``c_attn(x).split(self.n_embd, dim=2)``
    failed with PyTorch's bare "mat1 and mat2 shapes cannot be multiplied"."""
    pruner, channels = dg.get_pruner_of_module(root), dg.get_out_channels(root)
    if pruner is None or not channels:
        return ""
    for dep, _ in dg.get_pruning_group(root, pruner.prune_out_channels, [0]):
        sizes = set(getattr(dep.target.module, "split_sizes", None) or ())
        # A split Torch-Pruning could not size (None) says nothing of the code's sizes.
        if isinstance(dep.target.module, tp.ops._SplitOp) and len(sizes) == 1 and None not in sizes:
            (size,) = sizes
            return (
                f" (its output is split into parts of {size} channels: if the code fixes that "
                f"size, as split({size}, dim) with a constant does, no cut fits; write "
                f"chunk({channels // size}, dim), whose parts shrink with the layer)"
            )
    return ""


def _mixed_widths(dg: tp.DependencyGraph, root: nn.Module, names: Mapping[nn.Module, str]) -> str:
    """Where Torch-Pruning tied layers whose outputs differ in width into ``root``'s group, a
    likely cause of its dry run's failure, in words ("" where none). Chunks and concatenations
    tie such layers rightly; after an op that moved the channels to another dim (an MLP-Mixer's
    token mixing: ``transpose``, a Linear over the tokens, ``transpose`` back, added to the
    stream) they are tied wrongly, and the dry run failed with a bare ``IndexError``."""
    pruner, channels = dg.get_pruner_of_module(root), dg.get_out_channels(root)
    if pruner is None or not channels:
        return ""
    widths: dict[int, str] = {}
    for dep, _ in dg.get_pruning_group(root, pruner.prune_out_channels, list(range(channels))):
        layer = dep.target.module
        if layer in names and dg.is_out_channel_pruning_fn(dep.handler):
            widths.setdefault(int(dg.get_out_channels(layer) or 0), names[layer])
    widths.pop(0, None)
    if len(widths) < 2:
        return ""
    (w1, a), (w2, b) = sorted(widths.items())[:2]
    return (
        f" (Torch-Pruning ties layers of different widths into it, {a!r} of {w1} channels and "
        f"{b!r} of {w2}: an op between them may move channels to another dim, as a "
        "token-mixing MLP's transpose does)"
    )


def _multiplied(dg: tp.DependencyGraph, group: Any, names: Mapping[nn.Module, str]) -> str | None:
    """Why ``group`` cannot be pruned, if it cuts the inputs of a depthwise conv with a channel
    multiplier (``groups == in_channels``, k outputs each): Torch-Pruning maps its input channel
    i to output i, not to the k outputs i reads into, and the pruned model fails."""
    for dep, _ in group:
        layer = dep.target.module
        if (
            isinstance(layer, nn.modules.conv._ConvNd)
            and 1 < layer.groups == layer.in_channels < layer.out_channels
            and not dg.is_out_channel_pruning_fn(dep.handler)
        ):
            k = layer.out_channels // layer.in_channels
            return (
                f"its channels feed {names.get(layer, '?')!r}, a depthwise conv with a channel "
                f"multiplier ({k} outputs per input channel), which Torch-Pruning cannot map; "
                "so it is not pruned (that conv's own outputs are)"
            )
    return None


def tied_slices(dg: tp.DependencyGraph, group: Any) -> int:
    """How many of the root layer's channels go together when one is pruned, where they are
    equal slices of it: a layer whose output is chunked and the chunks multiplied (a GLU, a
    gated conv, a fused gate-and-up projection) ties channel ``i`` to ``i + C/k``. Torch-Pruning
    ranks such a group by channel and removes each one's partners too, so a plan's ratio took
    ``k`` times the channels (GLU conv at 0.1 kept 50 of 64, not 57) or, past ``1/k``, every
    channel, and it skipped the group. Declared as ``k`` slices, it ranks and keeps them like
    a GroupNorm's. 1 where nothing is tied, or the tied channels are not equal slices."""
    return _slices_tied(dg, group[0].dep.target.module)


def _slices_tied(dg: tp.DependencyGraph, root: nn.Module) -> int:
    channels = dg.get_out_channels(root)
    tied = tied_to(dg, root, 0)
    k = len(tied)
    if k < 2 or not channels or channels % k or tied != {j * channels // k for j in range(k)}:
        return 1
    return k


def layer_kind(module: nn.Module) -> str:
    """Its class name; a parametrized layer's own (``Conv1d (weight_norm)``), not the class
    PyTorch makes for it (``ParametrizedConv1d``)."""
    if not parametrize.is_parametrized(module):
        return type(module).__name__
    kinds = sorted(
        re.sub(r"(?<!^)(?=[A-Z])", "_", type(p).__name__.strip("_")).lower()
        for stack in module.parametrizations.values()
        for p in stack
    )
    return f"{type(module).__bases__[0].__name__} ({', '.join(kinds)})"


def _graph_names(model: nn.Module, dg: tp.DependencyGraph) -> set[str]:
    names = {m: n for n, m in model.named_modules()}
    return {names[m] for m in dg.module2node if isinstance(m, nn.Module) and m in names}


def _within(name: str, parents: Iterable[str]) -> str | None:
    """The nearest of ``parents`` that contains ``name`` (itself included)."""
    parts = name.split(".")
    parents = set(parents)
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in parents:
            return ".".join(parts[:i])
    return None


def _unrun(model: nn.Module, dg: tp.DependencyGraph, roots: tuple[type, ...]) -> list[str]:
    """Layers of ``roots`` (Conv, Linear, recurrent) the trace never reached (not even as part
    of a traced parent)."""
    seen = _graph_names(model, dg)
    return [
        n
        for n, m in model.named_modules()
        if n and isinstance(m, roots) and _within(n, seen) is None
    ]


UNRUN_REASON = (
    "never run by forward(example_inputs): Torch-Pruning cannot see which channels it reads, "
    "so it is not pruned"
)
RAN_UNTRACED = (
    "run, but what it makes reaches the outputs only through what the trace does not follow "
    "(a detached tensor, a value read by .item()): it is not pruned"
)


# Layers whose own width no group prunes: Torch-Pruning has no pruner for an EmbeddingBag.
UNPRUNED_TYPES = (nn.EmbeddingBag,)
UNPRUNED_REASON = (
    "not pruned: Torch-Pruning has no pruner for its width, so its size (and its share of the "
    "latency) stays; an nn.Embedding followed by .mean(1) or .sum(1) computes the same and is "
    "pruned"
)


def _members_left_out(
    names: Mapping[nn.Module, str],
    setup: Setup,
    left: Sequence[tuple[str, tuple[str, ...]]],
    kept: set[str],
    excluded: Sequence[Excluded],
) -> list[Excluded]:
    """The other root layers (Conv, Linear, ...) whose output channels only a group left out
    cuts, each with that group's root: a layer pruned only with another's channels (a Linear
    whose output a Bilinear reads beside another's; a conv whose output a 1-channel attention
    map multiplies) was missing from the search and from every list of what it leaves alone.
    ``left``: root -> the layers whose outputs its group cuts; ``kept``: those of kept groups.
    (A layer whose inputs a kept group cuts is still named here: its outputs stay whole.)"""
    modules, roots = {n: m for m, n in names.items()}, setup.root_types()
    named = kept | {e.name for e in excluded}
    out = []
    for root, owners in left:
        for m in owners:
            if m not in named and isinstance(modules.get(m), roots):
                out.append(Excluded(m, f"pruned only with {root!r}, which is left out (see it)"))
                named.add(m)
    return out


def _hidden_layers(
    model: nn.Module, dg: tp.DependencyGraph, setup: Setup, covered: set[str], user_out: list[str]
) -> list[Excluded]:
    """Root layers (Conv, Linear, recurrent, embeddings) that are no group's root or member, and
    why; and embedding bags, whose sizes stay (a user reads where the model's work is and that
    the search leaves it alone)."""
    leaves, roots = setup.leaves(), setup.root_types()
    unrun = set(_unrun(model, dg, roots))
    out = []
    for name, m in model.named_modules():
        if not name or name in covered or name in user_out:
            continue
        if isinstance(m, UNPRUNED_TYPES) and _within(name, covered) is None:
            kind = type(m).__name__
            out.append(Excluded(name, f"{kind}: {UNPRUNED_REASON}"))
            continue
        if not isinstance(m, roots):
            continue
        leaf = _within(name, leaves)
        if leaf is not None and leaf != name:
            kind = type(model.get_submodule(leaf)).__name__
            out.append(Excluded(name, f"inside {kind} {leaf!r}: {leaves[leaf].reason}"))
        elif name in unrun:
            out.append(Excluded(name, RAN_UNTRACED if name in setup.ran else UNRUN_REASON))
    return out


def _warn(model: nn.Module, excluded: Sequence[Excluded]) -> None:
    auto = [
        e
        for e in excluded
        if e.reason not in (OUTPUT_REASON, PATTERN_REASON) and not e.reason.startswith("only ")
    ]
    if auto:
        lines = "\n".join(f"  {e.name}: {e.reason}" for e in auto)
        warnings.warn(
            f"discover: {len(auto)} layer(s) of {type(model).__name__} are left out of the search "
            f"space (each with why):\n{lines}",
            stacklevel=3,
        )


def find_output_layers(
    model: nn.Module, example_inputs: Any, *, train_mode: bool = False
) -> tuple[str, ...]:
    """Names of the leaf layers whose outputs are returned by the model unchanged.

    The classifier is not always an ``nn.Linear`` named ``fc``: we decide from the forward
    pass which layer produces each output tensor. ``train_mode`` also finds the heads that
    only run in training (auxiliary classifiers).
    """
    # id -> (name, tensor): holding the tensor keeps its id from being reused mid-forward.
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    hooks, roots = [], root_types(model)
    for name, module in model.named_modules():
        if name and isinstance(module, roots):
            hooks.append(module.register_forward_hook(_record(produced, name)))
    try:
        # With autograd on, an output a layer's output became (interpolated, flattened) leads
        # back to that layer.
        with (
            torch.enable_grad(),
            all_trainable(model),
            structural_train_mode(model) if train_mode else nullcontext(),
        ):
            out = call_model(model, example_inputs)
    except Exception as exc:
        raise DiscoveryError(
            f"{type(model).__name__}(example_inputs) failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for h in hooks:
            h.remove()
    by_node = {t.grad_fn: name for name, t in produced.values() if t.grad_fn is not None}
    found = [
        name
        for t in flatten(out)
        for name in ([produced[id(t)][0]] if id(t) in produced else _layers_behind(t, by_node))
    ]
    if not found:  # no layer reaches an output through autograd: the last root layer run
        found = [list(produced.values())[-1][0]] if produced else []
    return tuple(dict.fromkeys(found))


def _layers_behind(t: torch.Tensor, by_node: Mapping[Any, str]) -> list[str]:
    """The layers whose outputs reach ``t`` through ops that are no layer (an upsampling of a
    segmentation head's logits, a flatten): walked back through ``t``'s autograd graph."""
    return [by_node[n] for n in walk_back([t.grad_fn], stop=by_node) if n in by_node]


def check_patterns(patterns: Iterable[str], names: Iterable[str], *, field_name: str) -> None:
    names = [n for n in names if n]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(
                f"{field_name}: pattern {pattern!r} matches no layer of the model "
                f"(layers look like {names[:3]})"
            )


def _record(produced: dict[int, tuple[str, torch.Tensor]], name: str):
    def hook(_module, _inputs, output):
        for t in flatten(output):
            produced[id(t)] = (name, t)

    return hook
