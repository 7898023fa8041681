"""Finetune and evaluate. Small, plain loops: the trial worker calls them top to bottom."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from search_space import call_model, flatten

from ._inputs import to_device

# on_epoch(epoch, accuracy) -> True to stop early (the orchestrator's rule decides).
EpochCallback = Callable[[int, float], bool]


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        pred = class_scores(call_model(model, to_device(x, device))).argmax(dim=1)
        correct += int((pred == y.to(device)).sum())
        total += int(y.numel())
    if total == 0:
        raise ValueError("the validation loader is empty")
    return correct / total


def class_scores(out: Any) -> torch.Tensor:
    """``out`` where the default score (top-1 accuracy) can read it: a (batch, classes, ...)
    tensor. Any other output needs the task's own ``evaluate``, and the error says so (it was
    "'dict' object has no attribute 'argmax'")."""
    if isinstance(out, torch.Tensor) and out.dim() >= 2:
        return out
    if isinstance(out, torch.Tensor):
        got = f"a tensor of shape {tuple(out.shape)}"
    else:
        got = f"a {type(out).__name__}"
    raise ValueError(
        f"task: evaluate: the default score (top-1 accuracy) reads the model's output as class "
        f"scores (batch, classes), and the model returned {got}; give the Task an "
        "evaluate(model, loader) -> score in [0, 1] (README, Your own model)"
    )


def evaluate(model: nn.Module, task, device: torch.device | str = "cpu") -> float:
    if task.evaluate is not None:
        return float(task.evaluate(model, task.val_loader))
    return accuracy(model, task.val_loader, device)


def sgd(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The finetune's optimiser: SGD with Nesterov momentum (the screen's short finetune too)."""
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True
    )


def finetune(
    model: nn.Module,
    task,
    *,
    epochs: float,
    lr: float,
    weight_decay: float = 5e-4,
    device: torch.device | str = "cpu",
    on_epoch: EpochCallback | None = None,
    distill: Distill | None = None,
    after_backward: Callable[[nn.Module], None] | None = None,
    validate: bool = True,
) -> list[float]:
    """SGD with momentum and a cosine schedule; returns validation accuracy after each epoch.

    ``epochs`` may be fractional: the last epoch then stops early (see :func:`epoch_batches`).
    ``distill`` adds a distillation term from a teacher; ``after_backward(model)`` runs between
    backward and the optimiser step (sparse training adds its regulariser's gradient there).
    ``validate=False`` skips the per-epoch evaluation (and ``on_epoch``), returning [].
    """
    plan = epoch_batches(epochs, len(task.train_loader))
    if not plan:
        return []
    opt = sgd(model, lr, weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, sum(plan)))
    history: list[float] = []
    steps = 0
    for epoch, batches in enumerate(plan):
        model.train()
        for i, (x, y) in enumerate(task.train_loader):
            if i >= batches:
                break
            x, y = to_device(x, device), to_device(y, device)
            out = call_model(model, x)
            loss = task.loss_fn(out, y)
            if distill is not None:
                loss = distill(x, out, loss)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} in epoch {epoch}; lower finetune.lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(model)
            opt.step()
            sched.step()
            steps += 1
        if not validate:
            continue
        refresh_stale_norms(model, task.train_loader, steps, device)
        history.append(evaluate(model, task, device))
        if on_epoch is not None and on_epoch(epoch, history[-1]):
            break
    return history


# A BatchNorm layer's running statistics after n training steps at momentum m still weigh the
# statistics from before them by (1 - m) ** n. Past this share they are re-estimated before
# evaluating: they describe the model as it was (the base, before pruning), not as it is.
STALE_SHARE = 0.5
REESTIMATE_BATCHES = 8


def refresh_stale_norms(
    model: nn.Module, loader: Any, steps: int, device: torch.device | str = "cpu"
) -> int:
    """Re-estimate, on up to ``REESTIMATE_BATCHES`` training batches, the running statistics of
    every BatchNorm layer a finetune of ``steps`` steps could not turn over (a momentum as small
    as MNASNet's 0.0003, or None: a cumulative average since the base model was trained).
    Returns how many were. With PyTorch's default momentum 0.1, 7 steps turn them over."""
    stale = [
        m
        for m in running_norms(model)
        if m.momentum is None or (1 - m.momentum) ** steps > STALE_SHARE
    ]
    if not stale:  # not even an iterator: starting one draws from a shuffling loader's generator
        return 0
    batches = [b for _, b in zip(range(REESTIMATE_BATCHES), loader, strict=False)]
    return reestimate_norms(model, stale, [(to_device(x, device), y) for x, y in batches])


def running_norms(model: nn.Module) -> list[nn.Module]:
    """The normalisations that evaluate on running statistics: BatchNorm's, and InstanceNorm's
    built with ``track_running_stats`` (both are ``_NormBase``). A prune or finetune leaves
    either describing the model as it was."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


@torch.no_grad()
def reestimate_norms(model: nn.Module, norms: list[nn.Module], batches: Iterable[Any]) -> int:
    """Re-estimate ``norms``' running statistics on ``batches`` (a cumulative average), with
    only those layers in training mode so dropout and the like stay off. Returns how many
    layers were re-estimated (none: no pass is run)."""
    if not norms:
        return 0
    model.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.train()
    try:
        # Momentum 1/k at the k-th batch is a cumulative average. Not momentum None: BatchNorm
        # reads it so, InstanceNorm as 0 (its statistics would never move).
        for k, (x, _) in enumerate(batches, start=1):
            for m in norms:
                m.momentum = 1.0 / k
            call_model(model, x)
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
            m.eval()
    return len(norms)


def epoch_batches(epochs: float, per_epoch: int) -> list[int]:
    """Batches in each epoch of a (possibly fractional) budget: whole epochs, then the
    fraction of one rounded to whole batches (at least one). ``[]`` for no budget."""
    if epochs <= 0 or per_epoch <= 0:
        return []
    whole = int(epochs + 1e-9)
    rest = round((epochs - whole) * per_epoch)
    return [per_epoch] * whole + ([max(1, rest)] if epochs - whole > 1e-9 else [])


@dataclass(frozen=True)
class Distill:
    """Knowledge distillation from a frozen teacher (Hinton et al.):
    ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * task loss``.

    The teacher runs under ``no_grad`` in eval mode: it is never trained and adds no graph; the
    student's gradient still depends on the teacher's logits through the KL target.
    """

    teacher: nn.Module
    temperature: float = 4.0
    alpha: float = 0.5

    def __call__(self, x: torch.Tensor, student_out, task_loss: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = _logits(call_model(self.teacher, x))
        return self.loss(_logits(student_out), target, task_loss)

    def loss(
        self, student: torch.Tensor, teacher: torch.Tensor, task_loss: torch.Tensor
    ) -> torch.Tensor:
        t = self.temperature
        kl = nn.functional.kl_div(
            nn.functional.log_softmax(student / t, dim=1),
            nn.functional.log_softmax(teacher / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return self.alpha * t * t * kl + (1 - self.alpha) * task_loss


def _logits(out) -> torch.Tensor:
    # Models with auxiliary heads return several outputs in training mode; the first is the main one.
    return out if isinstance(out, torch.Tensor) else flatten(out)[0]
