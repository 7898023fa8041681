"""The front as a picture: accuracy against measured latency, for the parent run in MLflow."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import optuna
from matplotlib.figure import Figure  # the object API: no pyplot global state, no display needed
from torch import nn

from workers import TrialStatus, channel_counts

from ._report import alias_picks, outcome_summary, trial_points


def front_figure(
    study: optuna.Study, base: Mapping[str, float], target: str, drop: float | None = None
) -> bytes:
    """``front_plot`` as PNG bytes, for the parent run in MLflow."""
    return png(front_plot(study, base, target, drop))


def front_plot(
    study: optuna.Study, base: Mapping[str, float], target: str, drop: float | None = None
) -> Figure:
    """Every measured trial by outcome, the front as steps, the base starred; with ``drop``
    (tracking.alias_drop) the registry's alias picks ringed and their accuracy threshold drawn.
    The title counts every trial of the study by outcome; the legend lists only what is drawn."""
    trials = trial_points(study, base)
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
    TrialStatus.COMPLETE: {"color": "tab:blue", "alpha": 0.3, "label": "dominated"},
    TrialStatus.INFEASIBLE: {
        "marker": "x",
        "color": "grey",
        "alpha": 0.5,
        "label": "over a constraint",
    },
    TrialStatus.STOPPED: {
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
    """(layer, channels kept, channels in the base) for every conv, linear and recurrent layer
    (its hidden units, both directions); a layer of a dropped residual block keeps none."""
    after = channel_counts(pruned)
    return [
        (name, int(after.get(name, 0)), int(total))
        for name, total in channel_counts(base_model).items()
    ]


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
    return png(fig)


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def sensitivity_figure(accuracy: Mapping[str, Mapping[str, float]], base_accuracy: float) -> bytes:
    """PNG heat map of a sensitivity scan: groups (rows) x ratios (columns), each cell the
    accuracy lost with that group alone pruned at that ratio, no finetuning; darker loses more."""
    groups = list(accuracy)
    ratios = sorted({r for row in accuracy.values() for r in row}, key=float)
    drop = [
        [base_accuracy - float(accuracy[g].get(r, base_accuracy)) for r in ratios] for g in groups
    ]
    fig = Figure(figsize=(1.2 + 0.8 * len(ratios), max(2.5, 0.3 * len(groups) + 1.4)), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(drop, cmap="Reds", aspect="auto", vmin=0.0)
    ax.set_xticks(range(len(ratios)), [f"{float(r):g}" for r in ratios])
    ax.set_yticks(range(len(groups)), groups, fontsize=7)
    dark = 0.5 * max((v for row in drop for v in row), default=0.0)
    for i, row in enumerate(drop):
        for j, value in enumerate(row):
            colour = "white" if dark > 0 and value > dark else "black"  # readable on any cell
            ax.annotate(f"{value:.2f}", (j, i), ha="center", va="center", fontsize=6, color=colour)
    ax.set_xlabel("ratio of the group's channels pruned")
    ax.set_title(
        f"accuracy lost, each group alone, no finetuning (base {base_accuracy:.4f})", fontsize=9
    )
    fig.colorbar(image, ax=ax, label="accuracy lost")
    return png(fig)


def trend_figure(nights: list[Mapping[str, Any]]) -> bytes:
    """PNG of the front over nights (each a mapping with date, hypervolume, best_ms): the
    hypervolume, and the fastest model within the accuracy floor; a night without one is a gap."""
    nights = sorted(nights, key=lambda n: n["date"])
    dates = [n["date"] for n in nights]
    fig = Figure(figsize=(7, 4.5), dpi=100)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(dates, [n.get("hypervolume") for n in nights], marker="o", color="tab:red")
    top.set_ylabel("hypervolume")
    best = [n.get("best_ms") for n in nights]
    bottom.plot(dates, [b if b is not None else float("nan") for b in best], marker="o")
    bottom.set_ylabel("best ms within floor")
    bottom.set_xlabel("night")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.set_title(f"the front over {plural(len(nights), 'night')}", fontsize=10)
    fig.autofmt_xdate()
    return png(fig)
