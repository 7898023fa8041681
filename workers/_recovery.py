"""Recovery methods: how a trial spends its epoch budget around pruning. A registry by name.

Every method gets the same budget, ``finetune.epochs`` epochs of forward/backward work, and
splits it its own way (fractions of an epoch are whole batches, see ``_train.epoch_batches``):

* ``oneshot``: prune, then finetune for the whole budget;
* ``iterative``: prune in ``steps`` steps; each of the ``steps - 1`` pauses and the final
  finetune get ``budget / steps`` epochs;
* ``sparse``: ``sparse_share * budget`` epochs of training with a group-sparsity regulariser
  on the unpruned model (Torch-Pruning's GroupNormPruner, BNScalePruner or GrowingRegPruner),
  then prune, then finetune for the rest.

With ``kd`` every finetune (between steps and final) distils from the unpruned base model;
the teacher's forward pass is charged as a third of an epoch per epoch (a forward is about a
third of a forward/backward). Sparse training does not distil: its student is the teacher.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from search_space import METHODS as RECOVERY_METHODS
from search_space import SPARSE_PRUNERS, PruningPlan, Recovery, copy_model

from ._tasks import Task
from ._train import Distill, EpochCallback, epoch_batches, finetune

TEACHER_COST = 1 / 3  # a teacher forward, in epochs of forward/backward work, per distilled epoch


@dataclass
class Trainer:
    """Trains for a trial and counts the work done, in epochs (``train_epochs`` of the result)."""

    task: Task
    lr: float
    weight_decay: float
    device: torch.device
    distill: Distill | None = None
    epochs_run: float = 0.0

    def train(
        self,
        model: nn.Module,
        epochs: float,
        *,
        on_epoch: EpochCallback | None = None,
        after_backward: Callable[[nn.Module], None] | None = None,
        validate: bool = False,
        distill: bool = True,
    ) -> list[float]:
        teacher = self.distill if distill else None
        history = finetune(
            model.to(self.device),
            self.task,
            epochs=epochs,
            lr=self.lr,
            weight_decay=self.weight_decay,
            device=self.device,
            on_epoch=on_epoch,
            distill=teacher,
            after_backward=after_backward,
            validate=validate,
        )
        per_epoch = len(self.task.train_loader)
        batches = epoch_batches(epochs, per_epoch)
        ran = sum(batches[: len(history)] if validate else batches) / max(
            1, per_epoch
        )  # stopped early: less
        self.epochs_run += ran * (1 + (TEACHER_COST if teacher is not None else 0.0))
        model.zero_grad(set_to_none=True)
        return history


def make_distill(recovery: Recovery, base: nn.Module, device: torch.device) -> Distill | None:
    """The teacher is a frozen copy of the unpruned base model: the cached base stays untouched."""
    if not recovery.kd:
        return None
    teacher = copy_model(base).to(device).eval().requires_grad_(False)
    return Distill(teacher, recovery.kd_temperature, recovery.kd_alpha)


@dataclass(frozen=True)
class Recipe:
    """How one method runs: its pruning steps, what apply_plan is given, and the final finetune."""

    steps: int
    final_epochs: float
    prune_options: Mapping[str, Any] = field(
        default_factory=dict
    )  # hooks and pruner for apply_plan

    @property
    def trains_while_pruning(self) -> bool:
        return bool(self.prune_options)


def _oneshot(recovery: Recovery, plan: PruningPlan, budget: float, trainer: Trainer) -> Recipe:
    return Recipe(plan.iterative_steps, budget)


def _iterative(recovery: Recovery, plan: PruningPlan, budget: float, trainer: Trainer) -> Recipe:
    share = budget / recovery.steps

    def between_steps(model: nn.Module, step: int) -> None:
        trainer.train(model, share)
        model.cpu()  # apply_plan traces and checks shapes with the example inputs, on the CPU

    return Recipe(
        recovery.steps, budget - share * (recovery.steps - 1), {"between_steps": between_steps}
    )


@dataclass(frozen=True)
class Regulariser:
    """A Torch-Pruning pruner whose ``regularize(model)`` adds a sparsity gradient after backward."""

    pruner: type[tp.pruner.BasePruner]
    options: Callable[[float], dict[str, Any]]  # reg -> the pruner's own arguments
    grow_every: int = 0  # GrowingReg: raise the penalty of unimportant channels every n batches
    batchnorm_only: bool = False  # it can only regularise groups that hold a BatchNorm


REGULARISERS: Mapping[str, Regulariser] = {
    # DepGraph's group-norm sparsity: every layer of a group is pushed down together, the least
    # important groups hardest (up to 2^4 times).
    "group_norm": Regulariser(tp.pruner.GroupNormPruner, lambda reg: {"reg": reg}),
    # Network slimming (L1 on BatchNorm scales), as TP's group-lasso variant so that only the
    # planned groups are penalised.
    "bn_scale": Regulariser(
        tp.pruner.BNScalePruner, lambda reg: {"reg": reg, "group_lasso": True}, batchnorm_only=True
    ),
    # Growing regularisation (Wang et al. 2021): the penalty of the least important channels rises
    # by reg / 10 every batch (TP leaves the schedule to the caller), so it is reg x 2 after 10.
    "growing_reg": Regulariser(
        tp.pruner.GrowingRegPruner, lambda reg: {"reg": reg, "delta_reg": reg / 10}, grow_every=1
    ),
}


def _sparse(recovery: Recovery, plan: PruningPlan, budget: float, trainer: Trainer) -> Recipe:
    regulariser = REGULARISERS[recovery.sparse_pruner]
    epochs = budget * recovery.sparse_share

    def before_steps(model: nn.Module, pruner: tp.pruner.BasePruner) -> None:
        pruner._groups = targeted_groups(pruner, regulariser.batchnorm_only)  # noqa: SLF001 - TP's regularised groups
        ranking = pruner.importance
        # The regulariser weighs groups by their L2 norm (DepGraph's method); the plan's own
        # criterion ranks the channels at pruning time.
        pruner.importance = tp.importance.GroupMagnitudeImportance(p=2)
        try:
            trainer.train(
                model,
                epochs,
                after_backward=_regularise(pruner, regulariser.grow_every),
                distill=False,
            )
        finally:
            pruner.importance = ranking
        model.cpu()

    return Recipe(
        plan.iterative_steps,
        budget - epochs,
        {
            "before_steps": before_steps,
            "pruner_class": regulariser.pruner,
            "pruner_options": regulariser.options(recovery.reg),
        },
    )


def _regularise(pruner: tp.pruner.BasePruner, grow_every: int) -> Callable[[nn.Module], None]:
    batches = itertools.count(1)

    def after_backward(model: nn.Module) -> None:
        pruner.regularize(model)
        if grow_every and next(batches) % grow_every == 0:
            pruner.update_reg()

    return after_backward


def targeted_groups(pruner: tp.pruner.BasePruner, batchnorm_only: bool = False) -> list:
    """The groups the plan prunes (ratio > 0): the only ones sparse training should shrink."""
    out = []
    for group in pruner._groups:  # noqa: SLF001 - filtered, not rebuilt: GrowingReg keys its penalties by group
        modules = [dep.target.module for dep, _ in group]
        ratios = [
            pruner.pruning_ratio_dict[dep.target.module][-1]
            for dep, _ in group
            if dep.target.module in pruner.pruning_ratio_dict
            and pruner.DG.is_out_channel_pruning_fn(dep.handler)
        ]
        if batchnorm_only and not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules
        ):
            continue  # TP's BNScalePruner fails on a group without one
        if ratios and max(ratios) > 0:
            out.append(group)
    return out


METHODS: Mapping[str, Callable[[Recovery, PruningPlan, float, Trainer], Recipe]] = {
    "oneshot": _oneshot,
    "iterative": _iterative,
    "sparse": _sparse,
}
# The names live in search_space (a trial's recipe is validated and sampled there): one each here.
for _ours, _names in ((METHODS, RECOVERY_METHODS), (REGULARISERS, SPARSE_PRUNERS)):
    if set(_ours) != set(_names):
        raise ImportError(
            f"workers' recovery names {sorted(_ours)} differ from search_space's {sorted(_names)}"
        )


def recipe(recovery: Recovery, plan: PruningPlan, budget: float, trainer: Trainer) -> Recipe:
    return METHODS[recovery.method](recovery, plan, budget, trainer)
