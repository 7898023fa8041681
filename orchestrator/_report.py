"""The front as views a user opens from MLflow: what every trial became, the alias picks, and an
interactive accuracy-vs-latency report (one self-contained HTML file, inline SVG, no network).

``front_views`` snapshots the study on the loop's thread; the recorder renders the report on its
writer thread, where it knows each trial's child run (for the links).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import optuna
from optuna.trial import TrialState

from search_space import PruningPlan
from workers import TrialStatus

from ._pareto import front
from ._picks import MOST_ACCURATE, fastest_alias
from ._study import latency_of, plan_of, ranking_label

REPORT = "front_report.html"  # on the parent run
UI_URL_VAR = "PRUNESEARCH_UI_URL"  # where the MLflow UI of a local store is served (prunesearch ui)
DEFAULT_UI_URL = "http://127.0.0.1:5000"


def ui_url(tracking_uri: str) -> str:
    """The MLflow UI's address: the tracking server itself, else where `prunesearch ui` serves."""
    if tracking_uri.startswith(("http://", "https://")):
        parts = urlsplit(tracking_uri)  # never a password in a link a report shows
        return urlunsplit(
            parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
        ).rstrip("/")
    return os.environ.get(UI_URL_VAR, DEFAULT_UI_URL).rstrip("/")


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_url(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


@dataclass(frozen=True)
class FrontViews:
    """What the parent run shows of the front: the PNG, and the data the HTML report draws."""

    png: bytes
    trials: list[dict[str, Any]]
    base: dict[str, float]
    target: str
    drop: float
    picks: dict[int, list[str]] = field(default_factory=dict)  # trial -> alias names


def front_views(study: optuna.Study, base: Mapping[str, float], config: Any) -> FrontViews:
    """The PNG and the report's data as of now (on the loop's thread: the study is read here)."""
    from ._plots import front_figure

    drop = config.tracking.alias_drop
    trials = trial_points(study, base)
    return FrontViews(
        png=front_figure(study, base, config.target.name, drop=drop),
        trials=trials,
        base=dict(base),
        target=config.target.name,
        drop=drop,
        picks=alias_picks(trials, base["accuracy"], drop),
    )


def trial_points(
    study: optuna.Study, base: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """Every finished trial as plain values: outcome, accuracy and latency where measured; on
    the front as ``front(study, base)`` has it."""
    on_front = {t.number for t in front(study, base)}
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    out = []
    for t in study.get_trials(deepcopy=False, states=done):
        a = t.user_attrs
        ended = TrialStatus.FAILED if t.state == TrialState.FAIL else TrialStatus.COMPLETE
        status = TrialStatus(a.get("status") or ended)
        epochs = a.get("epoch_accuracy") or []
        accuracy = t.values[0] if t.values else (epochs[-1] if epochs else None)
        measured = latency_of(t)
        latency = t.values[1] if t.values else (measured.median_ms if measured else None)
        out.append(
            {
                "trial": t.number,
                "status": status,
                "front": t.number in on_front,
                "accuracy": accuracy,
                "latency_ms": latency,
                "macs": a.get("macs"),
                "params": a.get("params"),
                "recipe": _recipe(plan_of(t), a.get("recovery") or {}, a.get("ranked_by")),
            }
        )
    return out


def alias_picks(
    trials: Sequence[Mapping[str, Any]], base_accuracy: float, drop: float
) -> dict[int, list[str]]:
    """The registry's alias rule applied to the front (see ``_registry._set_aliases``)."""
    on_front = [t for t in trials if t["front"]]
    picks: dict[int, list[str]] = {}
    if not on_front:
        return picks
    best = max(on_front, key=lambda t: (t["accuracy"], -t["latency_ms"]))
    picks.setdefault(best["trial"], []).append(MOST_ACCURATE)
    good = [t for t in on_front if t["accuracy"] >= base_accuracy - drop]
    if good:
        fastest = min(good, key=lambda t: (t["latency_ms"], -t["accuracy"]))
        picks.setdefault(fastest["trial"], []).append(fastest_alias(drop))
    return picks


def outcome_counts(trials: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(TrialStatus, 0)
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    return counts


def outcome_summary(trials: Sequence[Mapping[str, Any]]) -> str:
    """``13 trials: 9 complete, 2 infeasible, 2 stopped`` (outcomes with none left out)."""
    counts = outcome_counts(trials)
    parts = [f"{n} {word}" for word, n in counts.items() if n]
    noun = "trial" if len(trials) == 1 else "trials"
    return f"{len(trials)} {noun}" + (": " + ", ".join(parts) if parts else "")


def _recipe(
    plan: PruningPlan | None, recovery: Mapping[str, Any], ranked_by: Mapping[str, int] | None
) -> str:
    """The plan and recovery in a few words; the mean ratio is over units, as the search samples."""
    ratios = list(plan.ratios.values()) if plan else []
    mean = sum(ratios) / len(ratios) if ratios else 0.0
    criterion = ranking_label(plan, ranked_by) or "-"
    round_to = plan.round_to if plan else "-"
    text = f"{criterion}, mean ratio {mean:.2f}, round_to {round_to}"
    if recovery:
        text += "; " + ", ".join(f"{k} {v}" for k, v in sorted(recovery.items()))
    return text


def render_report(views: FrontViews, links: Mapping[int, str]) -> str:
    """The interactive report: every trial plotted, the front highlighted, hover for details."""
    points = [
        t
        | {
            "recipe": html.escape(t["recipe"]),
            "run": html.escape(links.get(t["trial"], ""), quote=True),
            "picks": views.picks.get(t["trial"], []),
        }
        for t in views.trials
        if t["accuracy"] is not None and t["latency_ms"] is not None
    ]
    svg = _svg(points, views)
    title = f"Pareto front on {views.target}: {outcome_summary(views.trials)}"
    data = json.dumps(points).replace("</", "<\\/")
    base_js = json.dumps(views.base["latency_ms"])
    return _PAGE.format(title=html.escape(title), svg=svg, data=data, base_js=base_js)


W, H, PAD = 760, 460, 56
COLOURS = {
    TrialStatus.COMPLETE: "#1f77b4",
    TrialStatus.INFEASIBLE: "#7f7f7f",
    TrialStatus.STOPPED: "#ff7f0e",
    TrialStatus.REJECTED: "#9467bd",
}


def _svg(points: list[dict[str, Any]], views: FrontViews) -> str:
    base = views.base
    xs = [p["latency_ms"] for p in points] + [base["latency_ms"]]
    ys = [p["accuracy"] for p in points] + [base["accuracy"], base["accuracy"] - views.drop]
    x0, x1 = min(xs) * 0.95, max(xs) * 1.05
    y0, y1 = min(ys) - 0.01, min(1.0, max(ys) + 0.01)
    sx = lambda v: PAD + (v - x0) / ((x1 - x0) or 1) * (W - 2 * PAD)  # noqa: E731
    sy = lambda v: H - PAD - (v - y0) / ((y1 - y0) or 1) * (H - 2 * PAD)  # noqa: E731
    parts = [f'<svg id="front" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">']
    parts += _axes(sx, sy, x0, x1, y0, y1, views.target)
    threshold = base["accuracy"] - views.drop
    parts.append(
        f'<line class="threshold" x1="{PAD}" x2="{W - PAD}" y1="{sy(threshold):.1f}" '
        f'y2="{sy(threshold):.1f}" stroke="#2ca02c" stroke-dasharray="5,4"/>'
        f'<text x="{PAD + 4}" y="{sy(threshold) + 14:.1f}" font-size="11" fill="#2ca02c">'
        f"base - {views.drop * 100:g} pt ({fastest_alias(views.drop)} threshold)</text>"
    )
    on_front = sorted((p for p in points if p["front"]), key=lambda p: p["latency_ms"])
    if on_front:
        path = " ".join(f"{sx(p['latency_ms']):.1f},{sy(p['accuracy']):.1f}" for p in on_front)
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="#d62728" stroke-opacity="0.6"/>'
        )
    for i, p in enumerate(points):
        parts.append(_point(i, p, sx, sy, base))
    bx, by = sx(base["latency_ms"]), sy(base["accuracy"])
    parts.append(
        f'<text class="base" x="{bx:.1f}" y="{by + 6:.1f}" text-anchor="middle" font-size="22">&#9733;</text>'
        f'<text x="{bx + 10:.1f}" y="{by - 8:.1f}" font-size="11">base model</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts)


def _point(i: int, p: dict[str, Any], sx: Any, sy: Any, base: Mapping[str, float]) -> str:
    x, y = sx(p["latency_ms"]), sy(p["accuracy"])
    cls = "point front" if p["front"] else f"point {p['status']}"
    colour = "#d62728" if p["front"] else COLOURS.get(p["status"], "#444")
    r, opacity = (6, 1.0) if p["front"] else (4, 0.45)
    speedup = base["latency_ms"] / p["latency_ms"] if p["latency_ms"] else 0.0
    tip = f"trial {p['trial']} ({p['status']}): accuracy {p['accuracy']:.4f}, {p['latency_ms']:.3f} ms, {speedup:.2f}x"
    out = (
        f'<circle class="{cls}" data-i="{i}" data-trial="{p["trial"]}" cx="{x:.1f}" cy="{y:.1f}" r="{r}" '
        f'fill="{colour}" fill-opacity="{opacity}"><title>{html.escape(tip)}</title></circle>'
    )
    if p["picks"]:
        label = html.escape(", ".join(p["picks"]))
        out += (
            f'<circle class="pick" cx="{x:.1f}" cy="{y:.1f}" r="10" fill="none" stroke="#000"/>'
            f'<text x="{x + 12:.1f}" y="{y + 14:.1f}" font-size="11">{label}</text>'
        )
    return out


def _axes(sx: Any, sy: Any, x0: float, x1: float, y0: float, y1: float, target: str) -> list[str]:
    out = [
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#333"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>',
        f'<text x="{W / 2}" y="{H - 14}" text-anchor="middle" font-size="12">latency, ms (median, on {html.escape(target)})</text>',
        f'<text x="16" y="{H / 2}" text-anchor="middle" font-size="12" transform="rotate(-90 16 {H / 2})">accuracy</text>',
    ]
    for k in range(6):
        xv, yv = x0 + (x1 - x0) * k / 5, y0 + (y1 - y0) * k / 5
        out.append(
            f'<text x="{sx(xv):.1f}" y="{H - PAD + 16}" text-anchor="middle" font-size="10">{xv:.3f}</text>'
        )
        out.append(
            f'<text x="{PAD - 6}" y="{sy(yv) + 3:.1f}" text-anchor="end" font-size="10">{yv:.3f}</text>'
        )
    return out


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 13px sans-serif; margin: 16px; }}
#tip {{ position: fixed; display: none; background: #fff; border: 1px solid #999; padding: 6px 8px;
  box-shadow: 0 2px 6px rgba(0,0,0,.2); pointer-events: auto; max-width: 360px; }}
.point {{ cursor: pointer; }}
</style></head>
<body>
<h3>{title}</h3>
<p>Red: the Pareto front. Faded: other trials (blue complete, grey over a constraint, orange stopped
early: its last epoch). Ringed: the registry's alias picks. Hover or click a point for details.</p>
{svg}
<div id="tip"></div>
<script id="points" type="application/json">{data}</script>
<script>
const points = JSON.parse(document.getElementById("points").textContent);
const tip = document.getElementById("tip");
function show(ev) {{
  const p = points[+ev.target.dataset.i];
  const mac = p.macs == null ? "-" : (p.macs / 1e6).toFixed(2) + " M";
  const par = p.params == null ? "-" : (p.params / 1e3).toFixed(1) + " k";
  const base = {base_js};
  tip.innerHTML = "<b>trial " + p.trial + "</b> (" + p.status + (p.front ? ", on the front" : "") + ")<br>" +
    "accuracy " + p.accuracy.toFixed(4) + ", latency " + p.latency_ms.toFixed(3) + " ms<br>" +
    "speed-up " + (base / p.latency_ms).toFixed(2) + "x, MACs " + mac + ", params " + par + "<br>" +
    "recipe: " + p.recipe + (p.picks.length ? "<br>alias: " + p.picks.join(", ") : "") +
    (p.run ? "<br><a href='" + p.run + "' target='_blank'>MLflow run</a>" : "");
  tip.style.left = (ev.clientX + 12) + "px"; tip.style.top = (ev.clientY + 12) + "px";
  tip.style.display = "block";
}}
document.querySelectorAll(".point").forEach(el => {{
  el.addEventListener("mouseenter", show); el.addEventListener("click", show);
}});
</script>
</body></html>
"""
