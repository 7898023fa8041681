"""Importance criteria by name: a registry, not an if-chain. Adding one is one entry."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner.importance import FPGMImportance  # defined, not exported by TP

from search_space import CRITERIA as CRITERION_NAMES
from search_space import (
    DensePruner,
    call_model,
    copy_model,
    flatten,
    strip_parametrizations,
    structural_train_mode,
)

from ._inputs import take


class HessianImportance(tp.importance.GroupHessianImportance):
    """TP's Hessian (OBD) criterion with two fixes for TP 1.6.

    * ``accumulate_grad`` sums squared per-sample gradients over every sample (TP keys its
      check by name but stores by parameter, so it keeps only the last sample).
    * ``__call__`` lends the accumulated values to ``.grad`` only while it ranks, so a Taylor
      criterion ranking other groups of the same plan still reads the batch gradients.
    """

    def accumulate_grad(self, model: nn.Module) -> None:
        for p in model.parameters():
            if p.grad is not None:
                self._accu_grad[p] = self._accu_grad.get(p, 0) + p.grad.detach().pow(2)
                self._counter[p] = self._counter.get(p, 0) + 1

    def __call__(self, group) -> torch.Tensor | None:
        accu, counter = self._accu_grad, self._counter
        saved = {p: p.grad for p in accu}
        try:
            for p, g in accu.items():
                p.grad = g / counter[p]
            self._accu_grad, self._counter = {}, {}  # the parent would consume them
            return super().__call__(group)
        finally:
            self._accu_grad, self._counter = accu, counter
            for p, g in saved.items():
                p.grad = g


@dataclass(frozen=True)
class Criterion:
    make: Callable[[], tp.importance.Importance]
    # "batch": needs loss.backward() over calibration batches before ranking (Taylor).
    # "sample": needs per-sample gradients accumulated into the importance (Hessian / OBD).
    gradients: str | None = None


CRITERIA: Mapping[str, Criterion] = {
    "l1": Criterion(lambda: tp.importance.GroupMagnitudeImportance(p=1)),
    "l2": Criterion(lambda: tp.importance.GroupMagnitudeImportance(p=2)),
    "bn_scale": Criterion(tp.importance.BNScaleImportance),
    "lamp": Criterion(lambda: tp.importance.LAMPImportance(p=2)),
    "fpgm": Criterion(lambda: FPGMImportance(p=2)),
    "taylor": Criterion(tp.importance.GroupTaylorImportance, gradients="batch"),
    "hessian": Criterion(HessianImportance, gradients="sample"),
    "random": Criterion(tp.importance.RandomImportance),
}
# The names live in search_space (the config and the sampler choose from them): one each here.
if set(CRITERIA) != set(CRITERION_NAMES):
    raise ImportError(
        f"workers' criteria {sorted(CRITERIA)} differ from search_space's {sorted(CRITERION_NAMES)}"
    )


def get_criterion(name: str) -> Criterion:
    try:
        return CRITERIA[name]
    except KeyError:
        raise ValueError(f"unknown criterion {name!r}; choose from {sorted(CRITERIA)}") from None


class PerGroupImportance(tp.importance.Importance):
    """Rank each group with the criterion chosen for its root layer (per-layer criteria).

    A criterion that cannot rank a group (``bn_scale`` on a group without BatchNorm) returns
    None; TP would then silently keep the whole group, so ``fallback`` (l1) ranks it instead.
    """

    def __init__(
        self,
        default: tp.importance.Importance,
        by_module: Mapping[nn.Module, tp.importance.Importance] | None = None,
        fallback: tp.importance.Importance | None = None,
    ) -> None:
        self.default = default
        self.by_module = dict(by_module or {})
        self.fallback = fallback if fallback is not None else CRITERIA["l1"].make()
        self.own = OwnMagnitude(p=1)
        # Which criterion ranked each group (by its root layer), as last asked: what a plan's
        # criterion became where it could not rank (bn_scale on a model without BatchNorm).
        self.used: dict[nn.Module, tp.importance.Importance] = {}
        # And the scores it gave, as last asked: a global plan's rounding ranks by them.
        self.scores: dict[nn.Module, torch.Tensor] = {}

    def choose(self, group) -> tp.importance.Importance:
        """The root's criterion; else that of a layer whose outputs the group prunes."""
        root = group[0].dep.target.module
        if root in self.by_module:
            return self.by_module[root]
        dg = getattr(group, "_DG", None)
        for dep, _ in group:
            if dep.target.module in self.by_module and (
                dg is None or dg.is_out_channel_pruning_fn(dep.handler)
            ):
                return self.by_module[dep.target.module]
        return self.default

    def __call__(self, group) -> torch.Tensor | None:
        chosen = self.choose(group)
        imp = graded(chosen, group)
        if imp is None:
            chosen, imp = self.fallback, graded(self.fallback, group)
        if imp is None:  # no member TP's criteria read: recurrent layers, embeddings alone
            chosen, imp = self.own, self.own(group)
        self.used[group[0].dep.target.module] = chosen
        if imp is not None:
            self.scores[group[0].dep.target.module] = imp
        return imp


def graded(criterion: tp.importance.Importance, group) -> torch.Tensor | None:
    """``criterion(group)``, its importance as wide as the group's root (``_root_wide``); for
    Taylor and Hessian, with a zero gradient lent to each layer of the group the task's loss
    does not reach (a head it leaves out), and None when it reaches none of them. Why:
    Torch-Pruning reads their ``.grad`` unchecked, and every candidate of such a model failed
    (AttributeError); a zero gradient is what the loss says of them."""
    with _root_wide(criterion, len(group[0].idxs)):
        return _graded(criterion, group)


def _graded(criterion: tp.importance.Importance, group) -> torch.Tensor | None:
    kinds = (tp.importance.GroupTaylorImportance, tp.importance.GroupHessianImportance)
    if not isinstance(criterion, kinds):
        return criterion(group)
    weights = {
        id(w): w
        for dep, _ in group
        if isinstance(w := getattr(dep.target.module, "weight", None), nn.Parameter)
    }
    lent = getattr(criterion, "_accu_grad", {})  # Hessian's: lent to .grad only as it ranks
    missing = [w for w in weights.values() if w.grad is None and w not in lent]
    if missing and len(missing) == len(weights):
        return None
    for w in missing:
        w.grad = torch.zeros_like(w)
    try:
        return criterion(group)
    finally:
        for w in missing:
            w.grad = None


# Where TP's reductions start each channel (group_reduction); 0 for the others.
_REDUCTION_START = {"prod": 1.0, "max": -99999.0}


@contextlib.contextmanager
def _root_wide(criterion: tp.importance.Importance, width: int) -> Iterator[None]:
    """TP sizes a group's importance by the first member its criterion scores, as if that were
    the root. Taylor and FPGM score no depthwise conv and no BatchNorm, so in a group whose root
    is one and whose first scored member holds only some of its channels (a piece of a split:
    timm MixNet's depthwise convs, split and joined by stored sizes) the other members'
    channels fell outside it ("index 6 is out of bounds"): the whole model failed under those
    criteria, and its profiling failed under every search. That member is widened to the
    root's width, its other channels at the reduction's start, which no sum, mean, max or
    product changes."""
    reduce = getattr(criterion, "_reduce", None)
    if reduce is None or "_reduce" in vars(criterion):
        yield
        return
    start = _REDUCTION_START.get(getattr(criterion, "group_reduction", None), 0.0)

    def widened(imps: list[torch.Tensor], idxs: list[list[int]]) -> torch.Tensor:
        if imps and len(imps[0]) < width and None not in idxs[0]:
            first = torch.full((width,), start, dtype=torch.float32, device=imps[0].device)
            first[torch.as_tensor(idxs[0], device=first.device)] = imps[0].float()
            imps, idxs = [first, *imps[1:]], [list(range(width)), *idxs[1:]]
        return reduce(imps, idxs)

    criterion._reduce = widened
    try:
        yield
    finally:
        del criterion._reduce  # the class's own again


class OwnMagnitude(tp.importance.Importance):
    """The Lp magnitude of the weights per channel of the members TP's criteria do not read:
    recurrent layers, embeddings and dense layers of other types (GPT-2's ``Conv1D``).

    TP's criteria read Conv, Linear and normalisation layers; a group whose only members are
    recurrent layers (one LSTM feeding another) or an embedding and such layers gets no ranking
    from them, and TP keeps such a group whole, whatever its ratio. An output channel of a
    recurrent layer (direction ``d``, unit ``k``) owns row ``k`` of every gate in each layer's
    weights and biases; an input channel, its column of the first layer's input weights; an
    embedding's channel, its column of the table; a dense layer's, its weights (and bias) of
    that channel (``DensePruner.channel_scores``). Members' magnitudes are averaged per channel.
    ``taylor``: each weight scores ``|weight x gradient|`` instead (where the gradient is there),
    as Taylor importance scores the layers TP reads: the allocator's profile ranks by it.
    """

    def __init__(self, p: int = 1, taylor: bool = False) -> None:
        self.p, self.taylor = p, taylor

    def _score(self, param: torch.Tensor) -> torch.Tensor:
        if self.taylor and param.grad is not None:
            return (param.detach() * param.grad).abs()
        return param.detach().abs().pow(self.p)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        dg = getattr(group, "_DG", None)
        total, count = None, 0
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            out = dg is None or dg.is_out_channel_pruning_fn(dep.handler)
            if isinstance(layer, nn.Embedding) and out:
                per_channel = self._score(layer.weight).sum(0).float().cpu()
            elif isinstance(layer, nn.RNNBase) and not getattr(layer, "proj_size", 0):
                per_channel = self._outputs(layer) if out else self._inputs(layer)
            elif isinstance(pruner := getattr(dep.handler, "__self__", None), DensePruner):
                per_channel = pruner.channel_scores(layer, out, self._score).float().cpu()
            else:
                continue
            local = per_channel[list(idxs)]
            if total is None:
                total = torch.zeros(len(group[0][1]), dtype=local.dtype)
            total.scatter_add_(0, torch.as_tensor(group[i].root_idxs), local)
            count += 1
        return None if total is None else total / count

    def _outputs(self, layer: nn.RNNBase) -> torch.Tensor:
        hidden = layer.hidden_size
        dirs = 2 if layer.bidirectional else 1
        out = torch.zeros(dirs, hidden)
        for name, param in layer.named_parameters(recurse=False):
            # (gates, units, columns): a bias has one column
            rows = self._score(param).reshape(-1, hidden, param[0].numel())
            per_unit = rows.sum(dim=(0, 2))
            out[1 if name.endswith("_reverse") else 0] += per_unit.float().cpu()
        return out.reshape(-1)

    def _inputs(self, layer: nn.RNNBase) -> torch.Tensor:
        cols = [p for n, p in layer.named_parameters(recurse=False) if n.startswith("weight_ih_l0")]
        return sum(self._score(c).sum(0).float().cpu() for c in cols)


def calibrate(
    model: nn.Module,
    importances: Iterable[tp.importance.Importance],
    modes: set[str],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[..., torch.Tensor] = nn.functional.cross_entropy,
) -> int:
    """Fill the gradients Taylor/Hessian rank by. Returns the number of batches used.

    Runs in training mode for the layers that branch on it (auxiliary heads add their loss)
    with normalisation layers in eval mode, so the model's running statistics are untouched.
    """
    if not modes:
        return 0
    batches = list(batches)
    if not batches:
        raise ValueError(
            "criteria taylor/hessian need calibration batches from the task's training data"
        )
    hessians = [i for i in importances if isinstance(i, tp.importance.GroupHessianImportance)]
    for h in hessians:
        h.zero_grad()
    with structural_train_mode(model), torch.enable_grad():
        if "sample" in modes:
            for x, y in batches:
                for loss in _sample_losses(model, x, y, loss_fn):
                    model.zero_grad()
                    loss.backward(retain_graph=True)
                    for h in hessians:
                        h.accumulate_grad(model)
        model.zero_grad()
        if "batch" in modes:
            for x, y in batches:  # Taylor reads .grad: accumulate over every batch
                _loss(model, x, y, loss_fn).backward()
    return len(batches)


def _loss(model: nn.Module, x: Any, y: Any, loss_fn: Callable[..., torch.Tensor], **kw):
    """The batch's loss. The default cross-entropy is summed over every output (auxiliary
    classifiers included); a task's own loss takes the output whole, as its finetune gives it
    (a dict of outputs, a tuple with auxiliary heads it weighs)."""
    out = call_model(model, x)
    if loss_fn is nn.functional.cross_entropy:
        return sum(loss_fn(o, y, **kw) for o in flatten(out))
    return loss_fn(out, y, **kw)


def _sample_losses(
    model: nn.Module, x: Any, y: torch.Tensor, loss_fn: Callable[..., torch.Tensor]
) -> Iterable[torch.Tensor]:
    """One loss per sample (Hessian): from one pass where the loss takes ``reduction`` and
    honours it, else sample by sample (a task's own loss may reduce as it likes)."""
    if _takes_reduction(loss_fn):
        losses = _loss(model, x, y, loss_fn, reduction="none")
        if losses.dim() == 1 and len(losses) == len(y):
            return losses
    return (_loss(model, take(x, i), y[i : i + 1], loss_fn) for i in range(len(y)))


def _takes_reduction(loss_fn: Callable[..., torch.Tensor]) -> bool:
    try:
        params = inspect.signature(loss_fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: do not guess
        return False
    return any(p.name == "reduction" or p.kind is p.VAR_KEYWORD for p in params)


@dataclass(frozen=True)
class Gradients:
    """What ``calibrate`` leaves for the gradient criteria, by parameter name: each parameter's
    gradient summed over the batches (Taylor reads ``.grad``) and, for Hessian, its squared
    per-sample gradients summed, with their count."""

    grads: Mapping[str, torch.Tensor]
    squares: Mapping[str, torch.Tensor]
    counts: Mapping[str, int]

    def restore(self, model: nn.Module, importances: Iterable[tp.importance.Importance]) -> None:
        """Lay these onto ``model`` (a copy of the model they were taken from, not yet pruned)
        and into its Hessian ``importances``, as ``calibrate`` would have left them."""
        params = dict(model.named_parameters())
        for name, p in params.items():  # calibrate clears every gradient before its passes
            g = self.grads.get(name)
            p.grad = None if g is None else g.clone()  # a copy each: pruning prunes gradients
        for h in importances:
            if isinstance(h, tp.importance.GroupHessianImportance):
                h._accu_grad = {params[n]: s.clone() for n, s in self.squares.items()}
                h._counter = {params[n]: c for n, c in self.counts.items()}


class BaseGradients:
    """The gradients ``calibrate`` finds on ``model`` over ``batches``, taken once per set of
    modes and restored onto each copy of ``model`` that is pruned (``apply_plan(gradients=)``).

    Why: every candidate a screen prunes is a copy of one base model, calibrated on the same
    batches before its first pruning step, so each ran the same backward passes to the same
    gradients. On a ``digits`` candidate Taylor's took 86 of its 116 ms of pruning, and Hessian's
    (a backward pass per sample) 3.7 s against 30 ms for a magnitude criterion. Taken once they
    cost a batch of candidates one calibration. ``model`` itself is never calibrated: a copy is.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        loss_fn: Callable[..., torch.Tensor] = nn.functional.cross_entropy,
    ) -> None:
        self._model, self._batches, self._loss_fn = model, list(batches), loss_fn
        self._taken: dict[frozenset[str], Gradients] = {}

    def __call__(self, modes: Iterable[str]) -> Gradients:
        key = frozenset(modes)
        if key not in self._taken:
            self._taken[key] = self._take(key)
        return self._taken[key]

    def _take(self, modes: frozenset[str]) -> Gradients:
        model = copy_model(self._model).eval()  # as apply_plan calibrates its copy:
        strip_parametrizations(model)  # with its pruner built (see search_space)
        hessian = HessianImportance()
        calibrate(model, [hessian], set(modes), self._batches, self._loss_fn)
        names = {p: n for n, p in model.named_parameters()}
        return Gradients(
            grads={n: p.grad.detach().clone() for p, n in names.items() if p.grad is not None},
            squares={names[p]: s for p, s in hessian._accu_grad.items()},
            counts={names[p]: c for p, c in hessian._counter.items()},
        )
