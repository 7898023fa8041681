"""The front as a picture: accuracy against measured latency, for the parent run in MLflow."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import optuna
from matplotlib.figure import Figure  # the object API: no pyplot global state, no display needed
from torch import nn

from ._report import alias_picks, outcome_summary, trial_points


def front_figure(
    study: optuna.Study, base: Mapping[str, float], target: str, drop: float | None = None
) -> bytes:
    """``front_plot`` as PNG bytes, for the parent run in MLflow."""
    buf = io.BytesIO()
    front_plot(study, base, target, drop).savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def front_plot(
    study: optuna.Study, base: Mapping[str, float], target: str, drop: float | None = None
) -> Figure:
    """Every measured trial by outcome, the front as steps, the base starred; with ``drop``
    (tracking.alias_drop) the registry's alias picks ringed and their accuracy threshold drawn.
    The title counts every trial of the study by outcome; the legend lists only what is drawn."""
    trials = trial_points(study)
    drawn = [t for t in trials if t["accuracy"] is not None and t["latency_ms"] is not None]
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    for status, style in _STYLES.items():
        pts = [t for t in drawn if t["status"] == status and not t["front"]]
        if pts:
            ax.scatter([t["latency_ms"] for t in pts], [t["accuracy"] for t in pts], s=18, **style)
    on_front = sorted((t for t in drawn if t["front"]), key=lambda t: t["latency_ms"])
    if on_front:
        xs, ys = [t["latency_ms"] for t in on_front], [t["accuracy"] for t in on_front]
        ax.step(xs, ys, where="post", color="tab:red", alpha=0.6)
        ax.scatter(xs, ys, s=36, color="tab:red", zorder=3, label="Pareto front")
        for t in on_front:
            ax.annotate(
                f"t{t['trial']}",
                (t["latency_ms"], t["accuracy"]),
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
    if drop is not None:
        _mark_picks(ax, drawn, base, drop)
    ax.set_xlabel(f"latency, ms (median, on {target})")
    ax.set_ylabel("accuracy")
    ax.set_title(
        f"{plural(len(on_front), 'front model')} of {outcome_summary(trials)}", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


_STYLES: dict[str, dict] = {
    "complete": {"color": "tab:blue", "alpha": 0.3, "label": "dominated"},
    "infeasible": {"marker": "x", "color": "grey", "alpha": 0.5, "label": "over a constraint"},
    "stopped": {
        "marker": "v",
        "color": "tab:orange",
        "alpha": 0.5,
        "label": "stopped (last epoch)",
    },
}


def _mark_picks(
    ax: Any, drawn: list[dict[str, Any]], base: Mapping[str, float], drop: float
) -> None:
    threshold = base["accuracy"] - drop
    ax.axhline(
        threshold, color="tab:green", linestyle="--", linewidth=1, label=f"base - {drop * 100:g} pt"
    )
    picks = alias_picks(drawn, base["accuracy"], drop)
    by_number = {t["trial"]: t for t in drawn}
    for number, names in picks.items():
        t = by_number[number]
        ax.scatter(
            [t["latency_ms"]],
            [t["accuracy"]],
            s=160,
            facecolors="none",
            edgecolors="black",
            zorder=5,
        )
        ax.annotate(
            ", ".join(names),
            (t["latency_ms"], t["accuracy"]),
            textcoords="offset points",
            xytext=(6, -12),
            fontsize=7,
        )


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def kept_channels(base_model: nn.Module, pruned: nn.Module) -> list[tuple[str, int, int]]:
    """(layer, channels kept, channels in the base) for every conv and linear layer."""
    pruned_layers = dict(pruned.named_modules())
    rows = []
    for name, layer in base_model.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and name in pruned_layers:
            after = pruned_layers[name]
            total = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
            kept = after.out_channels if isinstance(after, nn.Conv2d) else after.out_features
            rows.append((name, int(kept), int(total)))
    return rows


def kept_channels_figure(rows: list[tuple[str, int, int]], title: str) -> bytes:
    """PNG: per layer, the base's channels (light) and those kept (dark), so a user sees where
    the speed came from."""
    fig = Figure(figsize=(7, max(2.5, 0.28 * len(rows) + 1.2)), dpi=100)
    ax = fig.subplots()
    names = [r[0] for r in rows]
    ax.barh(names, [r[2] for r in rows], color="tab:blue", alpha=0.25, label="base model")
    ax.barh(names, [r[1] for r in rows], color="tab:blue", label="kept")
    for i, (_, kept, total) in enumerate(rows):
        ax.annotate(
            f"{kept}/{total}", (kept, i), xytext=(3, -3), textcoords="offset points", fontsize=7
        )
    ax.invert_yaxis()
    ax.set_xlabel("output channels")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
