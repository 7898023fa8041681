"""The screen's head refit (``search.screen.refit_head``): score a pruned candidate through an
output layer re-solved for its own features, not the base model's output layer.

Pruning changes what the layers before the output layer compute, so the base model's output
layer reads shifted features; a finetune re-learns it within a few steps. The loss through the
stale output layer mixes two things: what the features lost (which a finetune cannot give back)
and how far the output layer is off (which it can). Re-solving the output layer in closed form
(ridge regression of the candidate's features onto the base model's own outputs on the BatchNorm
slice) takes the second out, so the loss after it ranks candidates by what their features keep.
It is the task's own loss on the scoring slice, through that re-solved layer.

The output layer is the ``nn.Linear`` whose output *is* the model's output (found by a forward
hook on the base model). Where there is none (the model returns a tuple, a dict, or applies
something after its last Linear), or its input is not one feature vector per example, the proxy
stays the plain loss: ``OutputHead.find`` returns None.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from search_space import call_model

from ._train import class_scores

# The ridge's strength, relative to the features' mean energy (the trace of the Gram matrix over
# its size): scale-free, so wide and narrow candidates are regularised alike. On fully finetuned
# pools of shifted_digits, 0.1 and 1.0 ranked alike and 0.001 a little worse (RESULTS.md,
# proxy-refit-*).
RIDGE = 0.1

Batches = list[tuple[Any, Any]]


@dataclass(frozen=True)
class OutputHead:
    """The base model's output layer (by module name) and its outputs on the fitting slice."""

    name: str
    targets: torch.Tensor  # the base model's outputs on the BatchNorm slice, stacked

    @classmethod
    @torch.no_grad()
    def find(cls, base: nn.Module, batches: Sequence[tuple[Any, Any]]) -> OutputHead | None:
        """The ``nn.Linear`` of ``base`` whose output is the model's output, with ``base``'s
        outputs on ``batches`` as the refit's targets; None where there is no such layer."""
        if not batches:
            return None
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [
            m.register_forward_hook(_record(seen, name))
            for name, m in base.named_modules()
            if isinstance(m, nn.Linear)
        ]
        try:
            base.eval()
            out = call_model(base, batches[0][0])
        finally:
            for h in hooks:
                h.remove()
        name = next((n for n, (_, o) in seen.items() if o is out), None)
        if name is None or not isinstance(out, torch.Tensor) or out.dim() != 2:
            return None
        if seen[name][0].dim() != 2:  # a layer applied per token or per pixel: no single vector
            return None
        targets = torch.cat([out, *(call_model(base, x) for x, _ in batches[1:])])
        return cls(name, targets.detach())

    @contextlib.contextmanager
    def watch(self, model: nn.Module) -> Iterator[list[torch.Tensor]]:
        """Collects the input of ``model``'s output layer on every forward pass inside."""
        got: list[torch.Tensor] = []
        try:
            layer = model.get_submodule(self.name)
        except AttributeError:  # not in this candidate (a plan replaced it): nothing is collected
            yield got
            return
        hook = layer.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))
        try:
            yield got
        finally:
            hook.remove()

    def solve(self, features: Sequence[torch.Tensor]) -> Refit | None:
        """The output layer re-solved for ``features`` (the candidate's, on the same slice the
        targets came from); None where they do not match the targets or the solve fails."""
        if not features:
            return None
        f = _with_bias(torch.cat(list(features)))
        if f.shape[0] != self.targets.shape[0]:
            return None
        gram = f.T @ f
        size = gram.shape[0]
        eye = torch.eye(size, dtype=gram.dtype, device=gram.device)
        # +1e-9: features that are all zero (a collapsed candidate) still give a solvable system.
        gram = gram + (RIDGE * torch.trace(gram) / size + 1e-9) * eye
        try:
            weights = torch.linalg.solve(gram, f.T @ self.targets.to(f))
        except RuntimeError:  # singular even so: no refit, the plain loss stands
            return None
        if not torch.isfinite(weights).all():
            return None
        return Refit(self, weights)


@dataclass(frozen=True)
class Refit:
    """A re-solved output layer: features (with a bias column added) times ``weights``."""

    head: OutputHead
    weights: torch.Tensor

    def __call__(self, features: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The re-solved layer's outputs for ``features``, in ``like``'s dtype."""
        return (_with_bias(features) @ self.weights).to(like.dtype)


def _with_bias(features: torch.Tensor) -> torch.Tensor:
    f = features.flatten(1).double()
    return torch.cat([f, torch.ones(f.shape[0], 1, dtype=f.dtype, device=f.device)], dim=1)


def _record(seen: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str):
    def hook(_module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if args and isinstance(args[0], torch.Tensor):
            seen[name] = (args[0], out)

    return hook


WORST_PROXY = -1e9  # a candidate whose loss is not finite (it collapsed) ranks last, not NaN


@torch.no_grad()
def proxy_measures(
    model: nn.Module, task, batches: Batches, refit: Refit | None = None
) -> tuple[float, float, float]:
    """The proxy (minus the task's mean loss on ``batches``: higher is better), its standard
    error across the batches (0 with one) and the task's score, from one forward pass per batch
    where the task scores by top-1 accuracy (a task with its own ``evaluate`` is scored by it, a
    second pass: its metric may need more than the logits). The loss goes through
    ``task.loss_fn`` as finetuning calls it, so any loss a task trains with works here. With
    ``refit``, the loss is of the re-solved output layer's outputs; the score stays the model's
    own."""
    model.eval()
    losses, correct, total = [], 0, 0
    with refit.head.watch(model) if refit else contextlib.nullcontext([]) as seen:
        for x, y in batches:
            out = call_model(model, x)
            scored = refit(seen[-1], out) if seen else out
            seen.clear()
            losses.append(float(task.loss_fn(scored, y)))
            if task.evaluate is None:
                correct += int((class_scores(out).argmax(dim=1) == y).sum())
                total += int(y.numel())
    proxy, se = _loss_stats(losses)
    if task.evaluate is not None:
        return proxy, se, float(task.evaluate(model, batches))
    return proxy, se, correct / max(1, total)


def _loss_stats(losses: list[float]) -> tuple[float, float]:
    if not losses:
        raise ValueError("screening needs training data to score on: the slice is empty")
    if not all(math.isfinite(v) for v in losses):
        return WORST_PROXY, 0.0
    mean = sum(losses) / len(losses)
    if len(losses) < 2:
        return -mean, 0.0
    var = sum((v - mean) ** 2 for v in losses) / (len(losses) - 1)
    return -mean, math.sqrt(var / len(losses))
