"""Finetune and evaluate. Small, plain loops: the trial worker calls them top to bottom."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

# on_epoch(epoch, accuracy) -> True to stop early (the orchestrator's rule decides).
EpochCallback = Callable[[int, float], bool]


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(dim=1)
        correct += int((pred == y.to(device)).sum())
        total += int(y.numel())
    if total == 0:
        raise ValueError("the validation loader is empty")
    return correct / total


def evaluate(model: nn.Module, task, device: torch.device | str = "cpu") -> float:
    if task.evaluate is not None:
        return float(task.evaluate(model, task.val_loader))
    return accuracy(model, task.val_loader, device)


def finetune(
    model: nn.Module,
    task,
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 5e-4,
    device: torch.device | str = "cpu",
    on_epoch: EpochCallback | None = None,
) -> list[float]:
    """SGD with momentum and a cosine schedule; returns validation accuracy after each epoch."""
    if epochs <= 0:
        return []
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * max(1, len(task.train_loader)))
    history: list[float] = []
    for epoch in range(epochs):
        model.train()
        for x, y in task.train_loader:
            x, y = x.to(device), y.to(device)
            loss = task.loss_fn(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} in epoch {epoch}; lower finetune.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        history.append(evaluate(model, task, device))
        if on_epoch is not None and on_epoch(epoch, history[-1]):
            break
    return history
