"""A finetune evaluates with BatchNorm statistics that describe the model it trained: a layer
whose running statistics a short finetune could not turn over (a tiny momentum, as MNASNet's
0.0003) is re-estimated on training batches first; one at PyTorch's default is left alone."""

from __future__ import annotations

import copy

import pytest
import torch

from search_space import discover, uniform_plan
from workers import accuracy, apply_plan, finetune, refresh_stale_norms


def _pruned(task, momentum: float):
    found = discover(task.model, task.example_inputs, verify=False, warn=False)
    torch.manual_seed(0)
    model = apply_plan(task.model, task.example_inputs, uniform_plan(found, 0.5))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = momentum
    return model, norms


def test_a_tiny_batchnorm_momentum_does_not_leave_the_finetuned_model_at_chance(digits_task):
    model, norms = _pruned(digits_task, 0.0003)
    (accuracy,) = finetune(model, digits_task, epochs=1, lr=0.01)
    # Evaluated on the pruned base's statistics (the EMA kept 99 % of them) it scored 0.097.
    assert accuracy > 0.8
    assert all(m.momentum == 0.0003 for m in norms)  # the layers' own settings are kept


def test_statistics_a_finetune_turned_over_are_left_as_they_are(digits_task):
    model, norms = _pruned(digits_task, 0.1)
    before = [m.running_mean.clone() for m in norms]
    assert refresh_stale_norms(model, digits_task.train_loader, steps=23) == 0  # 0.9^23: 9 %
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms, strict=True))
    assert refresh_stale_norms(copy.deepcopy(model), digits_task.train_loader, steps=3) == len(
        norms
    )


class _Named(torch.nn.Module):
    """Class scores under a name, as many models return them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(x)}


def test_an_output_the_default_score_cannot_read_asks_for_the_task_s_own_evaluate():
    """It was "'dict' object has no attribute 'argmax'", from deep inside the first trial."""
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    with pytest.raises(ValueError, match=r"returned a dict; give the Task an evaluate\(model"):
        accuracy(_Named(), loader)
    scalar = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Flatten(0))  # one number each
    with pytest.raises(ValueError, match=r"a tensor of shape \(4,\)"):
        accuracy(scalar, loader)
