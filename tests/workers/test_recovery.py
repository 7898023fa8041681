"""Recovery methods end to end (digits and a torchvision model), and what each promises:
sparse training shrinks the targeted groups, iterative pruning lands on the plan's channel
counts, distillation's gradient goes through the teacher, which is never pruned or updated."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from search_space import PruningPlan, Recovery, discover, uniform_plan
from workers import (
    TEACHER_COST,
    Distill,
    Task,
    Trainer,
    TrialStatus,
    apply_plan,
    build_task,
    cached_task,
    channel_counts,
    finetune,
    recipe,
    run_trial,
)

SMALL_DIGITS = "tests.workers.test_recovery:small_digits"
VISION = "tests.workers.test_recovery:tiny_resnet"
RECIPES = {
    "oneshot": {},
    "iterative": {"method": "iterative", "steps": 2},
    "sparse-group_norm": {"method": "sparse", "sparse_share": 0.5, "reg": 0.05},
    "sparse-bn_scale": {
        "method": "sparse",
        "sparse_share": 0.5,
        "reg": 0.05,
        "sparse_pruner": "bn_scale",
    },
    "sparse-growing_reg": {
        "method": "sparse",
        "sparse_share": 0.5,
        "reg": 0.05,
        "sparse_pruner": "growing_reg",
    },
    "kd": {"kd": True, "kd_temperature": 4.0, "kd_alpha": 0.7},
}


# -- tasks (module:function refs, built inside run_trial) ---------------------------------------
def small_digits(options) -> Task:
    """The digits task (its cached base model) with 4 training batches an epoch: fast trials."""
    task = build_task("digits")
    gen = torch.Generator().manual_seed(0)
    train = DataLoader(
        Subset(task.train_loader.dataset, range(128)), batch_size=32, shuffle=True, generator=gen
    )
    val = DataLoader(Subset(task.val_loader.dataset, range(128)), batch_size=128)
    return Task(
        model=task.model, example_inputs=task.example_inputs, train_loader=train, val_loader=val
    )


def tiny_resnet(options) -> Task:
    """torchvision's ResNet-18 with random weights on generated 32x32 data."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=4).eval()
    x, y = torch.randn(24, 3, 32, 32), torch.randint(0, 4, (24,))
    gen = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8, shuffle=True, generator=gen)
    return Task(
        model=model,
        example_inputs=x[:1],
        train_loader=train,
        val_loader=DataLoader(TensorDataset(x[16:], y[16:]), batch_size=8),
    )


def _spec(
    plan: PruningPlan, recovery: dict, task: str = SMALL_DIGITS, epochs: int = 2, **kw
) -> dict:
    return {
        "number": 3,
        "plan": plan.to_dict(),
        "task": task,
        "finetune": {"epochs": epochs, "lr": 0.01},
        "target": {"batch_size": 1, "rounds": 2, "runs": 5},
        "recovery": recovery,
        "keep_model": False,
        **kw,
    }


@pytest.fixture(scope="module")
def vision_plan() -> PruningPlan:
    task = tiny_resnet({})
    return uniform_plan(discover(task.model, task.example_inputs), 0.5)


# -- end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_plan(digits_discovery) -> PruningPlan:
    return uniform_plan(digits_discovery, 0.3)


@pytest.fixture(scope="module")
def as_pruned(digits_plan):
    """The plan's model without any training (the pruning drops digits to about chance)."""
    return run_trial(_spec(digits_plan, {}, epochs=0))


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_method_runs_end_to_end_on_digits(name, digits_plan, as_pruned):
    result = run_trial(_spec(digits_plan, RECIPES[name]))
    assert result.status == TrialStatus.COMPLETE, result.reason
    assert result.recovery == Recovery.from_dict(RECIPES[name]).to_dict()
    assert result.signature == as_pruned.signature  # every method reaches the same architecture
    assert result.accuracy > as_pruned.accuracy + 0.05  # it recovered (8 small batches in all)
    # Same budget of 2 epochs whatever the method (fractions are whole batches); KD adds its teacher.
    budget = 2 * (1 + TEACHER_COST) if name == "kd" else 2.0
    assert result.train_epochs == pytest.approx(budget, abs=0.01)
    if RECIPES[name].get("method") in ("iterative", "sparse"):
        assert result.seconds["recover"] > 0


@pytest.mark.parametrize(
    "name",
    ["oneshot", "iterative", "sparse-group_norm", "sparse-bn_scale", "sparse-growing_reg", "kd"],
)
def test_each_method_runs_end_to_end_on_a_torchvision_model(name, vision_plan):
    result = run_trial(_spec(vision_plan, RECIPES[name], task=VISION, epochs=1))
    assert result.status == TrialStatus.COMPLETE, result.reason
    assert 0.0 <= result.accuracy <= 1.0 and result.macs > 0
    assert result.train_epochs == pytest.approx(1 + TEACHER_COST if name == "kd" else 1.0, abs=0.01)
    assert result.plan.iterative_steps == (2 if name == "iterative" else 1)


# -- sparse training ---------------------------------------------------------------------------
def _conv_norms(model: nn.Module, names: list[str]) -> torch.Tensor:
    """Mean channel norm of each root layer: what group-norm and growing regularisation shrink."""
    modules = dict(model.named_modules())
    return torch.stack([modules[n].weight.detach().flatten(1).norm(dim=1).mean() for n in names])


def _bn_scales(model: nn.Module, names: list[str]) -> torch.Tensor:
    """Mean |scale| of each root layer's BatchNorm: what slimming shrinks."""
    modules = dict(model.named_modules())
    return torch.stack(
        [modules[n.replace("conv", "bn")].weight.detach().abs().mean() for n in names]
    )


def _after_sparse_training(
    task: Task, plan: PruningPlan, recovery: Recovery, measure
) -> torch.Tensor:
    """``measure`` of the targeted layers right after sparse training, before pruning."""
    trainer = Trainer(task, lr=0.01, weight_decay=0.0, device=torch.device("cpu"))
    how = recipe(recovery, plan, 2.0, trainer)
    seen = []

    def before_steps(model, pruner):
        how.prune_options["before_steps"](model, pruner)
        seen.append(measure(model, list(plan.ratios)))

    torch.manual_seed(0)  # the same batches with and without the regulariser
    apply_plan(
        task.model, task.example_inputs, plan, **{**how.prune_options, "before_steps": before_steps}
    )
    assert trainer.epochs_run == pytest.approx(1.0)
    return seen[0]


@pytest.mark.parametrize(
    "pruner, measure",
    [("group_norm", _conv_norms), ("growing_reg", _conv_norms), ("bn_scale", _bn_scales)],
)
def test_sparse_training_drives_the_targeted_groups_norms_down(pruner, measure):
    task = small_digits({})
    targeted = ["layer2.0.conv1", "layer3.0.conv1"]
    plan = PruningPlan(ratios={n: 0.5 for n in targeted}, units={n: (n,) for n in targeted})
    before = measure(task.model, targeted)
    plain = _after_sparse_training(
        task, plan, Recovery("sparse", sparse_share=0.5, reg=1e-9, sparse_pruner=pruner), measure
    )
    sparse = _after_sparse_training(
        task, plan, Recovery("sparse", sparse_share=0.5, reg=2.0, sparse_pruner=pruner), measure
    )
    # Against the same training without the regulariser, and against the start.
    assert torch.all(sparse < 0.92 * plain), (before, plain, sparse)
    assert torch.all(sparse < before), (before, plain, sparse)
    assert torch.equal(
        measure(task.model, targeted), before
    )  # on a copy: the base model is untouched


# -- iterative pruning ------------------------------------------------------------------------
@pytest.mark.parametrize("round_to, steps", [(1, 3), (8, 2), (1, 5)])
def test_iterative_pruning_reaches_the_plans_channel_counts_exactly(
    round_to, steps, digits_task, digits_discovery
):
    names = digits_discovery.names
    ratios = {n: [0.1, 0.35, 0.5, 0.7][i % 4] for i, n in enumerate(names)}
    plan = PruningPlan(ratios=ratios, units={n: (n,) for n in names}, round_to=round_to)
    calls = []
    iterative = apply_plan(
        digits_task.model,
        digits_task.example_inputs,
        PruningPlan.from_dict({**plan.to_dict(), "iterative_steps": steps}),
        between_steps=lambda m, s: calls.append(channel_counts(m)),
    )
    oneshot = apply_plan(digits_task.model, digits_task.example_inputs, plan)
    before = channel_counts(digits_task.model)
    assert len(calls) == steps - 1
    assert channel_counts(iterative) == channel_counts(oneshot)
    for name, ratio in ratios.items():
        kept = int(before[name] * (1 - ratio))
        expected = max(kept - kept % round_to, round_to) if round_to > 1 else kept
        assert channel_counts(iterative)[name] == expected, name
    # The pauses saw the model on its way down, not already at the plan.
    assert any(calls[0][n] > channel_counts(oneshot)[n] for n in names)


def test_iterative_finetunes_between_steps_within_the_budget(digits_discovery):
    plan = uniform_plan(digits_discovery, 0.5)
    result = run_trial(_spec(plan, {"method": "iterative", "steps": 4}, epochs=4))
    assert result.status == TrialStatus.COMPLETE, result.reason
    assert len(result.epoch_accuracy) == 1  # the final finetune: budget / steps = 1 epoch
    assert result.train_epochs == pytest.approx(4.0)


# -- distillation ---------------------------------------------------------------------------
def test_the_distillation_gradient_goes_through_the_teachers_logits():
    torch.manual_seed(0)
    student = torch.randn(5, 10, requires_grad=True)
    task_loss = nn.functional.cross_entropy(student, torch.arange(5))
    t, alpha = 3.0, 0.6
    grads = []
    for teacher in (torch.randn(5, 10), torch.randn(5, 10)):
        (grad,) = torch.autograd.grad(
            Distill(nn.Identity(), t, alpha).loss(student, teacher, task_loss),
            student,
            retain_graph=True,
        )
        grads.append(grad)
        # d/ds of alpha*T^2*KL(p_t || p_s) is alpha*T*(softmax(s/T) - softmax(t/T)) / batch.
        (task_grad,) = torch.autograd.grad(task_loss, student, retain_graph=True)
        expected = alpha * t * (torch.softmax(student / t, 1) - torch.softmax(teacher / t, 1)) / 5
        assert torch.allclose(grad, expected + (1 - alpha) * task_grad, atol=1e-6)
    assert not torch.allclose(grads[0], grads[1])  # a different teacher, a different gradient


def test_the_teacher_is_neither_pruned_nor_updated(digits_discovery):
    base = cached_task(SMALL_DIGITS).model
    state = copy.deepcopy(base.state_dict())
    counts = channel_counts(base)
    result = run_trial(
        _spec(uniform_plan(digits_discovery, 0.5), {"method": "iterative", "steps": 2, "kd": True})
    )
    assert result.status == TrialStatus.COMPLETE, result.reason
    assert cached_task(SMALL_DIGITS).model is base
    assert channel_counts(base) == counts
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in state.items())
    assert all(
        p.requires_grad for p in base.parameters()
    )  # the teacher is a frozen copy, not the base


def test_a_distilled_finetune_leaves_its_teacher_untouched():
    task = small_digits({})
    teacher = copy.deepcopy(task.model).eval().requires_grad_(False)
    state = copy.deepcopy(teacher.state_dict())
    student = apply_plan(
        task.model,
        task.example_inputs,
        uniform_plan(discover(task.model, task.example_inputs), 0.5),
    )
    finetune(student, task, epochs=1, lr=0.01, distill=Distill(teacher, 4.0, 0.5))
    assert all(
        torch.equal(v, teacher.state_dict()[k]) for k, v in state.items()
    )  # BN statistics too
    assert all(p.grad is None for p in teacher.parameters())


# -- early stopping in every method ---------------------------------------------------------
class StopAtOnce:
    def __init__(self) -> None:
        self.epochs: list[int] = []

    def reject(self, latency):
        return None

    def stop(self, latency_ms, epoch, accuracy):
        self.epochs.append(epoch)
        return True


@pytest.mark.parametrize(
    "recovery, first_epoch, work",
    [
        ({}, 0, 1.0),
        (
            {"method": "iterative", "steps": 2},
            2,
            3.0,
        ),  # 2 epochs between the steps, then 1 of the final 2
        ({"method": "sparse", "sparse_share": 0.5, "reg": 0.01}, 2, 3.0),
    ],
)
def test_the_early_stopping_rule_still_stops_the_final_finetune(
    recovery, first_epoch, work, digits_discovery
):
    rules = StopAtOnce()
    result = run_trial(_spec(uniform_plan(digits_discovery, 0.3), recovery, epochs=4), rules=rules)
    assert result.status == TrialStatus.STOPPED and len(result.epoch_accuracy) == 1
    assert rules.epochs == [first_epoch]  # epochs of the whole budget: the rule's view
    assert result.train_epochs == pytest.approx(work)
