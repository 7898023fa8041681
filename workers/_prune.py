"""Apply a PruningPlan to a model with Torch-Pruning (DepGraph)."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from search_space import (
    DensePruner,
    Discovery,
    PruningPlan,
    Setup,
    call_model,
    computed_weights,
    copy_model,
    dense_layout,
    discover,
    drop_blocks,
    exact_ratio,
    flatten,
    kept_channels,
    kept_ratio_cap,
)

from ._criteria import BaseGradients, PerGroupImportance, calibrate, get_criterion
from ._io import retie, tied_parameters


def apply_plan(
    model: nn.Module,
    example_inputs: Any,
    plan: PruningPlan,
    *,
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
    between_steps: Callable[[nn.Module, int], None] | None = None,
    before_steps: Callable[[nn.Module, tp.pruner.BasePruner], None] | None = None,
    pruner_class: type[tp.pruner.BasePruner] = tp.pruner.BasePruner,
    pruner_options: Mapping[str, Any] | None = None,
    inplace: bool = False,
    discovery: Discovery | None = None,
    gradients: BaseGradients | None = None,
    on_ranked: Callable[[dict[str, int]], None] | None = None,
    loss_fn: Callable[..., torch.Tensor] = nn.functional.cross_entropy,
) -> nn.Module:
    """Return ``model`` pruned as ``plan`` says.

    The output layers are never pruned, and the pruned model's output shapes equal the
    original's (checked, in training mode too when the model has training-only heads).
    ``between_steps(model, step)`` runs after each of ``plan.iterative_steps`` steps but the
    last (iterative pruning finetunes there). ``before_steps(model, pruner)`` runs once the
    pruner is built, before the first step (sparse training regularises there); ``pruner_class``
    is the Torch-Pruning class to build (a regularising subclass) with ``pruner_options``.
    ``discovery``, when given, is ``model``'s (by layer name; e.g. the base model's, reused for
    each of many candidates pruned from it): it saves tracing the model again. ``gradients``,
    likewise, is ``model``'s calibration on ``calibration`` taken once for many candidates: the
    first step restores it instead of running the backward passes again (later steps, and a
    model ``before_steps`` may have changed, calibrate as usual). ``on_ranked(counts)`` is told,
    once pruned, how many groups each criterion ranked: a criterion that cannot rank a group
    (``bn_scale`` where it has no BatchNorm) leaves it to l1, which is then counted. The
    gradient criteria rank by ``loss_fn`` (give the task's: it takes the model's output whole).
    """
    if not inplace:
        model = copy_model(model)
    model.eval()
    ties = tied_parameters(model)
    # Torch-Pruning makes each pruned weight a new Parameter, trainable: a frozen layer (a
    # transfer-learning backbone) came out of pruning trainable, and the finetune trained it.
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if discovery is None:
        discovery = quiet_discover(model, example_inputs)
    setup = Setup.of(model, train_mode=discovery.trace_mode == "train")
    reference = setup.output_shapes(example_inputs)
    pruner, importances, ranking = _make_pruner(
        model, example_inputs, plan, discovery, setup, pruner_class, pruner_options or {}
    )
    rounding = _Rounding.of(plan, discovery, model, ranking.importance)
    if before_steps is not None:
        before_steps(model, pruner)
    modes = {get_criterion(c).gradients for c in {plan.criterion, *plan.criteria.values()}} - {None}
    for step in range(plan.iterative_steps):
        if step == 0 and modes and gradients is not None and before_steps is None:
            gradients(modes).restore(model, importances)
        else:
            calibrate(model, importances, modes, calibration, loss_fn)
        rounding.step(pruner)
        setup.after_prune()
        model.zero_grad(set_to_none=True)
        if between_steps is not None and step < plan.iterative_steps - 1:
            between_steps(model, step)
    setup.restore()  # weight_norm and the like, taken off while the pruner worked
    # Blocks go after the channels: their input and output are the residual stream, pruned
    # alike on both sides, so the identity that replaces a block still fits.
    drop_blocks(model, plan.drop)
    retie(model, ties)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    model.eval()
    if on_ranked is not None:
        on_ranked(ranking.counts())
    after = setup.output_shapes(example_inputs)
    if after != reference:
        raise RuntimeError(f"pruning changed the model's output shapes: {reference} -> {after}")
    return model


def quiet_discover(model: nn.Module, example_inputs: Any) -> Discovery:
    """``model``'s groups, traced without verifying or warning: its report was given when the
    search's space was built."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return discover(model, example_inputs, verify=False, warn=False)


def _make_pruner(
    model: nn.Module,
    example_inputs: Any,
    plan: PruningPlan,
    discovery: Discovery,
    setup: Setup,
    cls: type[tp.pruner.BasePruner],
    extra: Mapping[str, Any],
):
    modules = dict(model.named_modules())
    unknown = sorted(set(plan.group_ratios()) - set(discovery.names))
    if unknown:
        raise ValueError(
            f"plan names groups this model does not have: {unknown[:5]}; "
            "was the plan made for another base model?"
        )
    planned = set(plan.group_ratios())
    # Layers no unit covers keep all their channels; output layers and layers discovery
    # excluded are never pruned.
    ignored = [modules[n] for n in discovery.output_layers]
    ignored += [modules[g] for g in discovery.names if g not in planned]
    ignored += [modules[e.name] for e in discovery.excluded if e.name in modules]
    ratios, default_ratio = _tp_ratios(plan, discovery, modules), 0.0
    if plan.isomorphic:
        # Torch-Pruning ranks in isomorphic scopes only the groups outside ``pruning_ratio_dict``
        # (the plan's own scopes took them all, and isomorphic pruning changed nothing).
        shared = set(ratios.values())
        if len(shared) > 1:
            raise ValueError(
                "an isomorphic plan gives every group one ratio (search.space.granularity: "
                f"uniform); this one has {len(shared)}"
            )
        ratios, default_ratio = {}, shared.pop() if shared else 0.0
    default = get_criterion(plan.criterion).make()
    per_unit = {
        modules[g]: get_criterion(c).make() for u, c in plan.criteria.items() for g in plan.units[u]
    }
    named = {id(default): plan.criterion}
    named |= {id(per_unit[modules[g]]): c for u, c in plan.criteria.items() for g in plan.units[u]}
    ranking = _Ranking(PerGroupImportance(default, per_unit), named)
    pruner = setup.pruner(
        example_inputs,
        ranking.importance,  # also ranks groups a criterion cannot (bn_scale), with l1
        ratios,
        ignored,
        global_pruning=plan.global_pruning
        or plan.isomorphic,  # TP ranks isomorphic scopes globally
        # Exact plans' ratios are already rounded and capped (``_tp_ratios``).
        max_pruning_ratio=1.0 if plan.exact else plan.max_ratio,
        iterative_steps=plan.iterative_steps,
        round_to=None,  # exact plans are rounded already, global ones by ``_Rounding``
        isomorphic=plan.isomorphic,
        cls=cls,
        slices={modules[g.name]: g.split for g in discovery.groups if g.split > 1},
        default_ratio=default_ratio,
        **extra,
    )
    return pruner, [default, *per_unit.values()], ranking


def _tp_ratios(
    plan: PruningPlan, discovery: Discovery, modules: Mapping[str, nn.Module]
) -> dict[Any, float]:
    """The ratio Torch-Pruning is given for each unit's root layers (a tuple: a unit's groups).

    An exact plan (local: ``PruningPlan.exact``) gives each group the ratio at which
    Torch-Pruning, rounding nothing itself, keeps exactly ``kept_channels`` (``exact_ratio``;
    iterative steps go towards it, the last keeps it). Why: Torch-Pruning's own rounding of a
    group cut in slices (GroupNorm, grouped convs, heads) pruned nothing of it at a high ratio
    (GroupNorm(8, 32) at 0.9 kept 32) and nothing at all with ``round_to`` 8, in one step or
    three. Global plans rank as they prune: their ratios, capped, rounded by ``_Rounding``."""
    ratios: dict[Any, float] = {}
    for unit, groups in plan.units.items():
        smallest = min(discovery.group(g).channels for g in groups)
        ratio = kept_ratio_cap(plan.ratios[unit], smallest, plan.round_to)
        if not plan.exact:
            key = modules[groups[0]] if len(groups) == 1 else tuple(modules[g] for g in groups)
            ratios[key] = ratio
            continue
        for g in groups:
            group = discovery.group(g)
            kept = kept_channels(ratio, group.channels, plan.round_to, group.split)
            ratios[modules[g]] = exact_ratio(kept, group.channels, group.split)
    return ratios


@dataclass(frozen=True)
class _Rounding:
    """A global plan's rounding, done as Torch-Pruning yields each group it cuts: a group of
    one slice keeps a multiple of ``round_to``, as Torch-Pruning's own rounding keeps it; a group
    cut in slices (GroupNorm, grouped convs, heads) keeps a multiple of ``kept_channels``' step
    (``round_to`` and its slices), at least one step and what ``max_ratio`` leaves, even where
    the ranking took all of it. Both rank by the scores the plan's importance gave the group
    before any was cut, as Torch-Pruning ranks. Why: Torch-Pruning rounds a sliced group's
    per-slice count as if it were the group's, and skips a group whose slices it would empty,
    so a GroupNorm's conv kept all 32 channels at round_to 8, and at 0.8 with round_to 1
    (RegNet's grouped convs kept 50-100 % at 0.3). Exact plans are rounded already."""

    round_to: int
    max_ratio: float
    splits: Mapping[nn.Module, int]
    importance: PerGroupImportance | None

    @classmethod
    def of(
        cls, plan: PruningPlan, discovery: Discovery, model: nn.Module, imp: PerGroupImportance
    ) -> _Rounding:
        if plan.exact:
            return cls(1, 1.0, {}, None)
        modules = dict(model.named_modules())
        splits = {modules[g.name]: g.split for g in discovery.groups if g.split > 1}
        return cls(plan.round_to, plan.max_ratio, splits, imp)

    def step(self, pruner: tp.pruner.BasePruner) -> None:
        if self.importance is None:
            pruner.step()
            return
        dg = pruner.DG
        # Torch-Pruning's check refuses a group that empties its root: a sliced one is yielded
        # so that it keeps a step here (the check is Torch-Pruning's again after the step).
        check = dg.check_pruning_group
        dg.check_pruning_group = lambda g: g[0].dep.target.module in self.splits or check(g)
        try:
            for group in pruner.step(interactive=True):
                rounded = self._rounded(dg, group)
                if rounded is not None and check(rounded):
                    rounded.prune()
        finally:
            del dg.check_pruning_group

    def _rounded(self, dg: tp.DependencyGraph, group):
        root, fn = group[0].dep.target.module, group[0].dep.handler
        channels, split = dg.get_out_channels(root), self.splits.get(root, 1)
        scores = self.importance.scores.get(root)
        if not channels or scores is None or len(scores) != channels:
            return group
        kept = channels - len(group[0].idxs)
        if split == 1:  # Torch-Pruning's own rounding (kept 0: its check skips the group)
            rounded = kept - kept % self.round_to
        else:
            step = math.lcm(self.round_to, split)
            least = max(step, math.ceil(channels * (1 - self.max_ratio) / step) * step)
            rounded = min(channels, max(least, kept - kept % step))
        if rounded == kept:
            return group
        if rounded >= channels:
            return None
        size = channels // split
        cut = torch.argsort(scores.view(split, -1).mean(0))[: size - rounded // split]
        idxs = sorted(int(c) + s * size for s in range(split) for c in cut)
        return dg.get_pruning_group(root, fn, idxs)


class _Ranking:
    """The plan's importance, and the criteria's names: which ranked how many groups."""

    def __init__(self, importance: PerGroupImportance, named: Mapping[int, str]) -> None:
        self.importance = importance
        self.named = {**named, id(importance.fallback): "l1", id(importance.own): "l1"}

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for used in self.importance.used.values():
            name = self.named[id(used)]
            counts[name] = counts.get(name, 0) + 1
        return counts


def count_macs_params(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    # Torch-Pruning's counter prints a line for keyword-only inputs (it counts them right), and
    # knows layers by their exact type: a weight-normed Conv1d's class is another one.
    computed = computed_weights(model)
    with contextlib.redirect_stdout(io.StringIO()):
        macs, params, counted, _ = tp.utils.count_ops_and_params(
            computed, example_inputs, layer_wise=True
        )
    recurrent = _weight_macs(computed, example_inputs)
    if recurrent:
        # Torch-Pruning 1.6 reads a recurrent layer's batch and length from input[0][0].shape:
        # time x features for a batch-first input, not batch x time (an LSTM over 24 tokens of
        # 32 features counted 33x its MACs), and counts no dense layer of a type it does not
        # know (GPT-2's Conv1D). Its total is per sample, by its own batch rule.
        first = (
            next(iter(example_inputs), None)
            if isinstance(example_inputs, (tuple, list))
            else example_inputs
        )
        batch = len(first) if isinstance(first, torch.Tensor) and first.dim() else 1
        macs += sum(right - (counted.get(m) or 0) for m, right in recurrent.items()) / batch
    return int(macs), int(params)


@torch.no_grad()
def _weight_macs(model: nn.Module, example_inputs: Any) -> dict[nn.Module, float]:
    """Each recurrent layer's MACs on ``example_inputs``: its weight matrices (input, hidden
    and projection, every layer and direction) times the steps it ran (batch x time); and each
    dense layer's of a type Torch-Pruning does not know (``dense_layout``): its weight times
    the rows it ran."""
    layers = [
        m for m in model.modules() if isinstance(m, nn.RNNBase) or dense_layout(m) is not None
    ]
    if not layers:
        return {}
    macs: dict[nn.Module, float] = {}

    def record(layer: nn.Module, _inputs: Any, output: Any) -> None:
        out = flatten(output)[0]  # the output sequence (a PackedSequence's data)
        weights = sum(p.numel() for n, p in layer.named_parameters() if n.startswith("weight"))
        macs[layer] = macs.get(layer, 0.0) + out.numel() / out.shape[-1] * weights

    handles = [m.register_forward_hook(record) for m in layers]
    modes = [(m, m.training) for m in model.modules()]  # the caller's model: modes restored
    try:
        call_model(model.eval(), example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.train(training)
    return macs


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels of every root layer, by name: what a plan changed."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
        elif isinstance(m, nn.RNNBase):
            out[name] = m.hidden_size * (2 if m.bidirectional else 1)
        elif isinstance(m, nn.Embedding):
            out[name] = m.embedding_dim
        elif (layout := dense_layout(m)) is not None:  # GPT-2's Conv1D
            out[name] = DensePruner(layout).get_out_channels(m)
    return out
