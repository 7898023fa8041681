"""The front's views: the static PNG and the interactive HTML report, from a real Optuna study."""

from __future__ import annotations

import json
import re

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from orchestrator import config_from_dict, front_plot, front_views, render_report
from search_space import PruningPlan
from workers import TrialStatus

BASE = {"accuracy": 0.95, "latency_ms": 1.0, "macs": 2e6, "params": 1e4}
PLAN = PruningPlan(ratios={"a": 0.5}, units={"a": ("a",)}, criterion="l1", round_to=8).to_dict()


def _trial(number: int, status: str, acc: float | None, ms: float, state=TrialState.COMPLETE):
    values = [acc, ms] if state == TrialState.COMPLETE else None
    return create_trial(
        state=state,
        values=values,
        params={"r": 0.5},
        distributions={"r": FloatDistribution(0, 1)},
        user_attrs={
            "status": status,
            "plan": PLAN,
            "macs": 1_000_000,
            "params": 5000,
            "latency": {"median_ms": ms},
            "epoch_accuracy": [acc] if acc is not None else [],
        },
    )


@pytest.fixture
def study():
    study = optuna.create_study(directions=["maximize", "minimize"])
    for i, (status, acc, ms, state) in enumerate(
        [
            (TrialStatus.COMPLETE, 0.945, 0.60, TrialState.COMPLETE),  # fastest within 1 point
            (TrialStatus.COMPLETE, 0.950, 0.80, TrialState.COMPLETE),  # most accurate
            (TrialStatus.COMPLETE, 0.900, 0.90, TrialState.COMPLETE),  # dominated
            (TrialStatus.STOPPED, 0.700, 0.50, TrialState.PRUNED),
            (TrialStatus.REJECTED, None, 0.95, TrialState.PRUNED),
            (TrialStatus.FAILED, None, 0.0, TrialState.FAIL),
        ]
    ):
        t = _trial(i, status, acc, ms, state)
        study.add_trial(t)
    return study


def test_the_png_counts_every_trial_by_outcome_and_legends_only_what_is_drawn(study):
    fig = front_plot(study, BASE, "cpu", drop=0.01)
    ax = fig.axes[0]
    assert ax.get_title() == (
        "2 front models of 6 trials: 3 complete, 1 rejected, 1 stopped, 1 failed"
    )
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "over a constraint" not in labels  # nothing infeasible was drawn
    assert {
        "dominated",
        "stopped (last epoch)",
        "Pareto front",
        "base model",
        "base - 1 pt",
    } <= set(labels)
    notes = {t.get_text() for t in ax.texts}
    assert {"most-accurate", "fastest-within-1pct"} <= notes  # the alias picks, marked


def test_the_report_has_every_measured_trial_the_front_and_the_picks_offline(study):
    config = config_from_dict({"name": "x"})
    views = front_views(study, BASE, config)
    links = {1: "http://127.0.0.1:5000/#/experiments/1/runs/abc"}
    page = render_report(views, links)
    # self-contained: no script, style, image or font fetched from anywhere
    assert not re.search(r"""(src|href)=["']?https?://""", page) and "<link" not in page
    assert "@import" not in page and "url(" not in page
    circles = re.findall(r'<circle class="point ([a-z ]+)" data-i="\d+" data-trial="(\d+)"', page)
    assert sorted(int(n) for _, n in circles) == [0, 1, 2, 3]  # measured ones; not 4 or 5
    assert {int(n) for c, n in circles if c == "front"} == {0, 1}
    assert "most-accurate" in page and "fastest-within-1pct" in page and "&#9733;" in page
    data = json.loads(
        re.search(r'<script id="points" type="application/json">(.*?)</script>', page, re.S)[1]
    )
    by_trial = {p["trial"]: p for p in data}
    assert by_trial[1]["run"] == links[1] and by_trial[1]["picks"] == ["most-accurate"]
    assert by_trial[0]["macs"] == 1_000_000 and "l1" in by_trial[0]["recipe"]
    assert "6 trials: 3 complete, 1 rejected, 1 stopped, 1 failed" in page


def test_a_model_card_s_kept_channels_cover_1d_convs_and_recurrent_layers():
    """The registered model's kept-channels chart: every Conv (1-D too), Linear and recurrent
    layer (its hidden units), as pruned."""
    import torch
    from torch import nn

    from orchestrator import kept_channels
    from search_space import discover, uniform_plan
    from workers import apply_plan

    class Sensor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(3, 16, 3, padding=1)
            self.rnn = nn.GRU(16, 12, batch_first=True)
            self.head = nn.Linear(12, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(torch.relu(self.conv(x)).transpose(1, 2))
            return self.head(out[:, -1])

    torch.manual_seed(0)
    model, x = Sensor().eval(), torch.randn(2, 3, 10)
    found = discover(model, x, verify=False, warn=False)
    pruned = apply_plan(model, x, uniform_plan(found, 0.5), discovery=found)
    assert kept_channels(model, pruned) == [("conv", 8, 16), ("rnn", 6, 12), ("head", 4, 4)]
