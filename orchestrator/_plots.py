"""The front as a picture: accuracy against measured latency, for the parent run in MLflow."""

from __future__ import annotations

import io
from collections.abc import Mapping

import optuna
from matplotlib.figure import Figure  # the object API: no pyplot global state, no display needed
from optuna.trial import TrialState

from ._pareto import front


def front_figure(study: optuna.Study, base: Mapping[str, float], target: str) -> bytes:
    """PNG: every measured trial faded, infeasible ones crossed, the front drawn as steps, base starred."""
    on_front = front(study)
    numbers = {t.number for t in on_front}
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    feasible = [t for t in done if t.number not in numbers and _feasible(t)]
    infeasible = [t for t in done if not _feasible(t)]

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    ax.scatter(
        [t.values[1] for t in feasible],
        [t.values[0] for t in feasible],
        s=18,
        color="tab:blue",
        alpha=0.3,
        label="dominated",
    )
    ax.scatter(
        [t.values[1] for t in infeasible],
        [t.values[0] for t in infeasible],
        s=18,
        marker="x",
        color="grey",
        alpha=0.5,
        label="over a constraint",
    )
    if on_front:
        xs, ys = [t.values[1] for t in on_front], [t.values[0] for t in on_front]
        ax.step(xs, ys, where="post", color="tab:red", alpha=0.6)
        ax.scatter(xs, ys, s=36, color="tab:red", zorder=3, label="Pareto front")
        for t in on_front:
            ax.annotate(
                f"t{t.number}",
                (t.values[1], t.values[0]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    ax.scatter(
        [base["latency_ms"]],
        [base["accuracy"]],
        s=120,
        marker="*",
        color="black",
        zorder=4,
        label="base model",
    )
    ax.set_xlabel(f"latency, ms (median, on {target})")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{len(on_front)} front models of {len(done)} measured trials")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(c <= 0 for c in (trial.constraints or {}).values())
