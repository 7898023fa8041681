"""Screening (fidelity 0) and the allocator's profile, on real models and data."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from search_space import PruningPlan, allocate, discover, fit_costs, uniform_plan
from workers import (
    AUTO_STEPS,
    SCREEN_STAGES,
    Target,
    Task,
    TrialStatus,
    adapt_batchnorm,
    adapting,
    apply_plan,
    build_task,
    has_batchnorm,
    measure_relative,
    profile_groups,
    proxy_batches,
    proxy_measures,
    screen_candidates,
)

from .odd_models import OneHeadInTheLoss, first_head
from .screen_tasks import LOSSES_SEEN, Forbidden, digits_without_validation


def _job(plans: list[PruningPlan], **extra) -> dict:
    return {
        "task": "digits",
        "seed": 0,
        "bn_batches": 2,
        "score_batches": 2,
        "target": {"warmup": 1, "rounds": 1, "runs": 3},
        "candidates": [{"number": i, "plan": p.to_dict()} for i, p in enumerate(plans)],
        **extra,
    }


def test_screening_never_reads_the_validation_data(digits_discovery):
    plans = [uniform_plan(digits_discovery, r) for r in (0.2, 0.6)]
    results = screen_candidates(
        _job(plans, task="tests.workers.screen_tasks:digits_without_validation")
    )
    assert [r.status for r in results] == [TrialStatus.COMPLETE, TrialStatus.COMPLETE], [
        r.reason for r in results
    ]
    task = digits_without_validation({})
    profile = profile_groups(task, task.model, digits_discovery, batches=2)
    assert set(profile.groups) == set(digits_discovery.names)


def test_a_short_finetune_trains_on_batches_the_proxy_never_scores_on(digits_discovery):
    """``search.screen.steps``: SGD steps on further training batches, never the scored slice
    and never the validation data; the tuned candidate scores better than untuned."""
    plans = [uniform_plan(digits_discovery, 0.6)]
    job = _job(plans, task="tests.workers.screen_tasks:digits_watched", timed=[])
    LOSSES_SEEN.clear()
    (plain,) = screen_candidates(job)
    (tuned,) = screen_candidates(job | {"steps": 3, "lr": 0.05})
    assert plain.status == tuned.status == TrialStatus.COMPLETE, (plain.reason, tuned.reason)
    trained = [y for grad, y in LOSSES_SEEN if grad]
    scored = {y for grad, y in LOSSES_SEEN if not grad}
    assert len(trained) == 3 and len(scored) == 2  # 3 steps; 2 score batches, both runs alike
    assert not scored & set(trained)
    assert tuned.proxy > plain.proxy  # three steps recover some of what pruning 60 % cost


def test_steps_auto_tunes_a_model_without_batchnorm_and_not_one_with_it(digits_discovery):
    def trained_on(task: str, plan: PruningPlan) -> int:
        LOSSES_SEEN.clear()
        (result,) = screen_candidates(_job([plan], task=task, timed=[], steps="auto"))
        assert result.status == TrialStatus.COMPLETE, result.reason
        return sum(grad for grad, _ in LOSSES_SEEN)

    digits = "tests.workers.screen_tasks:digits_watched"
    assert trained_on(digits, uniform_plan(digits_discovery, 0.5)) == 0  # adaptive BN alone
    plain = build_task("tests.workers.screen_tasks:plain_watched")
    found = discover(plain.model, plain.example_inputs)
    assert trained_on("tests.workers.screen_tasks:plain_watched", uniform_plan(found, 0.5)) == (
        AUTO_STEPS
    )


def test_a_candidate_that_will_not_prune_is_recorded_and_the_rest_go_on(digits_discovery):
    good = uniform_plan(digits_discovery, 0.3)
    bad = PruningPlan(ratios={"no.such.layer": 0.5}, units={"no.such.layer": ("no.such.layer",)})
    results = screen_candidates(_job([good, bad, good]))
    assert [r.status for r in results] == [
        TrialStatus.COMPLETE,
        TrialStatus.FAILED,
        TrialStatus.COMPLETE,
    ]
    assert "no.such.layer" in results[1].reason
    assert results[0].signature == results[2].signature and results[0].latency["median_ms"] > 0
    assert results[0].proxy < 0.0 and results[0].proxy_se >= 0.0  # minus a loss
    assert 0.0 <= results[0].score <= 1.0 and results[1].latency is None
    # Each stage's seconds on record, summing to the candidate's cost; the failed one has none
    # past the stage that failed.
    assert tuple(results[0].stages) == SCREEN_STAGES
    assert all(v > 0 for v in results[0].stages.values())
    assert sum(results[0].stages.values()) == pytest.approx(results[0].seconds, abs=5e-3)
    assert "time" not in results[1].stages and "adapt" not in results[1].stages
    # Only the numbers in "timed" are timed (search.screen.time_share): the rest are scored.
    (untimed,) = screen_candidates(_job([good]) | {"timed": []})
    assert untimed.status == TrialStatus.COMPLETE and untimed.latency is None
    assert untimed.proxy is not None and "time" not in untimed.stages


def test_more_pruning_scores_lower_on_the_proxy_and_gradient_criteria_screen_too(digits_discovery):
    plans = [
        uniform_plan(digits_discovery, r, criterion=c)
        for r, c in ((0.1, "l1"), (0.85, "l1"), (0.5, "taylor"))
    ]
    results = screen_candidates(_job(plans))
    assert results[0].proxy > results[1].proxy
    assert results[2].status == TrialStatus.COMPLETE, results[2].reason


def test_a_batch_of_gradient_criteria_scores_each_candidate_as_if_screened_alone(digits_discovery):
    # The batch takes the base model's gradients once and lays them onto every copy: pruning one
    # copy must leave nothing behind for the next.
    plans = [
        uniform_plan(digits_discovery, r, criterion=c)
        for r, c in ((0.6, "taylor"), (0.3, "l1"), (0.3, "taylor"), (0.5, "hessian"))
    ]
    together = screen_candidates(_job(plans) | {"timed": []})
    for plan, result in zip(plans, together, strict=True):
        (alone,) = screen_candidates(_job([plan]) | {"timed": []})
        assert result.status == alone.status == TrialStatus.COMPLETE, result.reason
        assert (result.proxy, result.score, result.signature) == (
            alone.proxy,
            alone.score,
            alone.signature,
        )


def test_the_proxy_is_minus_the_loss_so_candidates_that_tie_on_accuracy_still_rank():
    """A model right on every sample of the slice scores accuracy 1.0 however damaged; its loss
    still says which is more confident."""
    data = [(torch.eye(4)[i : i + 2] * 5, torch.tensor([i, i + 1])) for i in range(3)]
    task = SimpleNamespace(loss_fn=nn.functional.cross_entropy, evaluate=None)
    sharp, blunt = nn.Identity(), _Scale(0.2)
    (p_sharp, se_sharp, a_sharp), (p_blunt, _, a_blunt) = (
        proxy_measures(sharp, task, data),
        proxy_measures(blunt, task, data),
    )
    assert a_sharp == a_blunt == 1.0
    assert p_blunt < p_sharp < 0.0 and se_sharp >= 0.0
    broken = _Scale(float("nan"))
    assert proxy_measures(broken, task, data)[0] < p_blunt  # a collapsed candidate ranks last


def test_the_screen_scores_a_candidate_in_one_pass_minus_the_mean_loss_and_the_accuracy():
    data = [(torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])) for _ in range(3)]
    task = SimpleNamespace(loss_fn=nn.functional.cross_entropy, evaluate=None)
    model, calls = nn.Linear(4, 4), []
    model.register_forward_hook(lambda *_: calls.append(1))
    proxy, se, score = proxy_measures(model, task, data)
    assert len(calls) == len(data)  # one forward per batch for the loss and the accuracy both
    with torch.no_grad():
        outs = [(model(x), y) for x, y in data]
    losses = torch.tensor([float(nn.functional.cross_entropy(o, y)) for o, y in outs])
    assert proxy == pytest.approx(-float(losses.mean()))
    assert se == pytest.approx(float(losses.std()) / len(data) ** 0.5)  # across the batches
    right = sum(int((o.argmax(1) == y).sum()) for o, y in outs)
    assert score == pytest.approx(right / sum(len(y) for _, y in outs))
    custom = SimpleNamespace(loss_fn=nn.functional.cross_entropy, evaluate=lambda m, b: 0.25)
    assert proxy_measures(model, custom, data)[2] == 0.25  # a task's own metric is kept


class _Scale(nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k


@pytest.mark.parametrize(
    "norm",
    [nn.BatchNorm2d(4), nn.InstanceNorm2d(4, affine=True, track_running_stats=True)],
    ids=["batchnorm", "instancenorm"],
)
def test_adaptive_bn_reestimates_statistics_and_restores_the_layers(norm):
    # Every normalisation that keeps running statistics is stale after a prune, BatchNorm's
    # and an InstanceNorm's that tracks them alike: both are re-estimated.
    model = nn.Sequential(nn.Conv2d(1, 4, 3), norm, nn.ReLU(), nn.Dropout(0.5))
    data = [(torch.randn(16, 1, 8, 8) * 3 + 2, torch.zeros(16)) for _ in range(3)]
    bn = model[1]
    assert adapt_batchnorm(model, data) == 1
    assert bn.momentum == 0.1 and not bn.training and not model[3].training
    with torch.no_grad():
        outs = torch.cat([model[0](x) for x, _ in data])
    assert torch.allclose(bn.running_mean, outs.mean(dim=(0, 2, 3)), atol=1e-4)
    assert adapt_batchnorm(nn.Sequential(nn.Linear(2, 2)), data) == 0
    assert not has_batchnorm(nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4)))


def test_proxy_slices_are_disjoint_and_seeded(digits_task):
    bn, score = proxy_batches(digits_task, 3, 2, 3)
    again_bn, again_score = proxy_batches(digits_task, 3, 2, 3)
    assert len(bn) == 2 and len(score) == 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(score, again_score, strict=True))
    seen = {tuple(x.flatten().tolist()) for b in bn for x in b[0]}
    assert not any(tuple(x.flatten().tolist()) in seen for b in score for x in b[0])


class _Wide(nn.Module):
    """A toy model whose layers differ in latency per channel (spatial size) and importance."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU())
        self.b = nn.Sequential(
            nn.Conv2d(48, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(), nn.MaxPool2d(4)
        )
        self.c = nn.Sequential(nn.Conv2d(48, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU())
        self.fc = nn.Linear(96, 4)

    def forward(self, x):
        return self.fc(self.c(self.b(self.a(x))).mean(dim=(2, 3)))


def test_the_allocator_meets_its_latency_target_within_the_measured_spread():
    torch.manual_seed(0)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 4, (128,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    task = Task(
        model=_Wide().eval(), example_inputs=x[:8], train_loader=loader, val_loader=Forbidden()
    )
    d = discover(task.model, task.example_inputs)
    profile = profile_groups(task, task.model, d, batches=2)
    groups = list(profile.groups)
    # Timed as a search times: paired with a reference, as a ratio (drift cancels).
    rng = random.Random(0)
    steps = [0.0, 0.2, 0.4, 0.6, 0.8]
    plans = [{g: rng.choice(steps) for g in groups} for _ in range(24)]
    fitted = fit_costs(profile, plans, [_ratio(task, p, {})["ratio"] for p in plans])
    # What the cost model can know: its error on plans it was not fitted to, measured here,
    # the smallest (every group at 0.8) among them. On this toy at batch 8 (2-3 ms) a model
    # linear in each layer's work misses them by up to 2x on this VM (CPU kernels do not scale
    # linearly with channels; issue 16's note), and the allocation has landed 0.77-1.31x off
    # its target over runs. The allocator must not do worse than its model: no plan it picks
    # may lie where the model errs more than on plans it was never asked about.
    unseen = [{g: rng.choice(steps) for g in groups} for _ in range(7)] + [
        dict.fromkeys(groups, 0.8)
    ]
    errors = [abs(math.log(fitted.predict(p) / _ratio(task, p, {})["ratio"])) for p in unseen]
    allocs = {}
    for level in (0.2, 0.5, 0.8):
        uniform = dict.fromkeys(groups, level)
        allocs[level] = allocate(fitted, level, 1.0, max_ratio=0.9)
        assert allocs[level] != uniform
        # In its model the allocation meets its target (up to one channel's step).
        assert fitted.predict(allocs[level]) == pytest.approx(fitted.predict(uniform), rel=0.03)
        measured = _ratio(task, allocs[level], uniform)
        miss = abs(math.log(measured["ratio"]))
        assert miss <= max(errors) + 3 * measured["ratio_se"], (level, measured, allocs[level])
    # And the target steers what is measured: a lower latency target gives a faster model.
    assert _ratio(task, allocs[0.5], allocs[0.2])["ratio"] < 1.0
    assert _ratio(task, allocs[0.8], allocs[0.5])["ratio"] < 1.0


def _ratio(task: Task, ratios: dict[str, float], reference: dict[str, float]) -> dict:
    """Latency of the plan ``ratios`` over that of ``reference`` (a plan; {} is the base)."""
    models = [
        apply_plan(
            task.model, task.example_inputs, PruningPlan(ratios=r, units={g: (g,) for g in r})
        )
        if r
        else task.model
        for r in (ratios, reference)
    ]
    target = Target(batch_size=8, precision=0.02, min_seconds=0.2, max_seconds=2.0)
    return measure_relative(*models, task.example_inputs, target)


@pytest.mark.parametrize("level", [0.3])
def test_the_profile_models_each_layers_work_and_its_two_sides(level):
    task = Task(
        model=_Wide().eval(),
        example_inputs=torch.randn(2, 3, 32, 32),
        train_loader=DataLoader(
            TensorDataset(torch.randn(64, 3, 32, 32), torch.randint(0, 4, (64,))), batch_size=32
        ),
        val_loader=Forbidden(),
    )
    d = discover(task.model, task.example_inputs)
    profile = profile_groups(task, task.model, d, batches=1)
    # "a" and "b" run at 32x32, "c" at 8x8; "b" reads what "a" makes, "c" what "b" makes.
    layers = {x.name: x for x in profile.layers}
    assert (layers["b.0"].out_group, layers["b.0"].in_group) == ("b.0", "a.0")
    assert layers["b.0"].cost == 32 * 32 * 48 * 48 * 9 * 2  # MACs of one batch of two
    assert layers["fc"].out_group is None and layers["fc"].in_group == "c.0"
    assert layers["b.0:outputs"].cost == 32 * 32 * 48 * 2 and layers["b.0:outputs"].in_group is None
    assert all(len(p.importance) == p.channels for p in profile.groups.values())
    assert allocate(profile, level, 0.0) == dict.fromkeys(profile.groups, level)


def test_a_group_cut_in_slices_is_profiled_a_slice_at_a_time():
    # A GroupNorm(4, 16) group loses one channel of each of its 4 slices at a time: its profile
    # says so, and each channel carries its index's mean importance over the slices, so the
    # allocator's steps of 4 lose what the pruner's removal loses.
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()
    task = Task(
        model=model,
        example_inputs=torch.randn(2, 3, 8, 8),
        train_loader=DataLoader(
            TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))), batch_size=16
        ),
        val_loader=Forbidden(),
    )
    profile = profile_groups(task, model, discover(model, task.example_inputs), batches=1)
    assert profile.splits == {"0": 4, "3": 1}
    sliced = profile.groups["0"].importance
    values = sorted(set(sliced))
    assert len(values) == 4 and all(sliced.count(v) == 4 for v in values)
    assert len(set(profile.groups["3"].importance)) > 4  # a plain group ranks channel by channel
    for level in (0.25, 0.5):
        kept = 16 * (1 - allocate(profile, level)["0"])
        assert round(kept) % 4 == 0


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 12)
        self.rnn = nn.GRU(12, 10, batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0][:, -1])


def test_an_embeddings_width_is_profiled_as_what_its_readers_take_in():
    # A lookup does no MACs: its width costs what the layers reading it do with it (the GRU's
    # input work scales with it) and the copy of its outputs.
    torch.manual_seed(0)
    model, tokens = _Tokens().eval(), torch.randint(0, 40, (16, 7))
    task = Task(
        model=model,
        example_inputs=tokens[:2],
        train_loader=DataLoader(TensorDataset(tokens, torch.randint(0, 3, (16,))), batch_size=8),
        val_loader=Forbidden(),
    )
    profile = profile_groups(task, model, discover(model, tokens[:2]), batches=1)
    layers = {x.name: x for x in profile.layers}
    assert (layers["embed"].cost, layers["embed"].out_group) == (0.0, "embed")
    assert (
        layers["embed:outputs"].cost == 2 * 7 * 12 and layers["embed:outputs"].out_group == "embed"
    )
    assert layers["rnn"].in_group == "embed" and layers["rnn"].out_group == "rnn"
    cheaper = profile.predict({"embed": 0.5})
    assert cheaper < profile.predict({}) and len(set(profile.groups["embed"].importance)) > 1


def test_relative_timing_pairs_a_model_with_its_reference():
    small, big = nn.Linear(64, 64), nn.Sequential(*[nn.Linear(64, 64) for _ in range(12)])
    x = torch.randn(4, 64)
    target = Target(batch_size=16, warmup=2, runs=5)
    same = measure_relative(small, small, x, target, pairs=4)
    assert same["pairs"] == 4 and 0.5 < same["ratio"] < 2.0
    slower = measure_relative(big, small, x, target, pairs=4)
    assert slower["ratio"] > 2.0 and slower["median_ms"] > slower["reference_ms"]


def test_the_screen_says_what_it_does_to_a_candidate_before_scoring():
    plain = nn.Sequential(nn.Conv2d(1, 8, 3), nn.GroupNorm(2, 8), nn.ReLU())
    normed = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    assert has_batchnorm(normed) and not has_batchnorm(plain)  # GroupNorm keeps no statistics
    # steps: auto is adaptive BN alone with BatchNorm, a short finetune without it
    assert adapting("auto", True) == "re-estimate BatchNorm"
    assert adapting("auto", False) == f"{AUTO_STEPS} SGD steps (no BatchNorm to re-estimate)"
    assert adapting(1, True) == "1 SGD step, then re-estimate BatchNorm"
    assert adapting(0, False) == "no BatchNorm to re-estimate"


def test_the_profile_gives_a_group_the_loss_does_not_reach_no_importance():
    # Its weights have no gradient, which Torch-Pruning's Taylor read unchecked: the profile,
    # and with it the search, failed (AttributeError) on a model with a head its loss leaves out.
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))
    task = Task(
        model=OneHeadInTheLoss().eval(),
        example_inputs=x[:2],
        train_loader=DataLoader(TensorDataset(x, y), batch_size=32),
        val_loader=Forbidden(),
        loss_fn=first_head,
    )
    d = discover(task.model, task.example_inputs)
    profile = profile_groups(task, task.model, d, batches=2)
    assert set(profile.groups["b"].importance) == {0.0}  # cutting it costs the loss nothing
    assert max(profile.groups["a"].importance) > 0 and max(profile.groups["stem"].importance) > 0
