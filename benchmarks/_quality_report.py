"""The quality benchmark's report: per-task tables of every arm's front, the default against
the best baseline, and the screen's proxy quality and cost, as a RESULTS.md section."""

from __future__ import annotations

import math
import statistics
from typing import Any

from workers import SCREEN_STAGES

from ._arms import DROP, FLOOR, OURS, Settings, batch_of
from ._results import table


def spread(values: list[float | None], fmt: str) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "n/a"
    missing = f", {len(values) - len(got)} seed(s) none" if len(got) < len(values) else ""
    text = fmt.format(statistics.median(got))
    return (
        text
        if len(got) == 1 and not missing
        else f"{text} [{fmt.format(min(got))}-{fmt.format(max(got))}{missing}]"
    )


def task_rows(
    task: str, seeds: list[dict[str, Any]], s: Settings, key: str = "scores"
) -> list[dict[str, Any]]:
    """One row per budget and arm; ``key`` "matched" reads each baseline at its compute-matched budget."""
    rows = []
    for b in s.budgets:
        for arm in s.arms:
            per = [sd[key][(arm.key, b)] for sd in seeds]
            ours = [sd[key][(OURS, b)]["hv"] for sd in seeds]
            wins = sum(o > p["hv"] + 1e-12 for o, p in zip(ours, per, strict=True))
            rows.append(
                {
                    "task": task,
                    "budget": b,
                    "arm": arm.label,
                    "hypervolume": spread([p["hv"] for p in per], "{:.4f}"),
                    "acc @ 2x-uniform latency": spread([p["acc_2x"] for p in per], "{:.4f}"),
                    "best speed-up, <= 1 pt drop": spread([p["speedup"] for p in per], "{:.2f}x"),
                    "finetuned": statistics.median(p["n"] for p in per),
                    "finetune s": f"{statistics.median(p['finetune_s'] for p in per):.1f}",
                    "default's HV higher": "-" if arm.key == OURS else f"{wins}/{len(per)} seeds",
                }
            )
    return rows


def ratios(results: dict[str, list[dict[str, Any]]], s: Settings, key: str) -> list[str]:
    """Median hypervolume of the default over the best baseline's, per task and budget, plainly."""
    lines = []
    for task, seeds in results.items():
        for b in s.budgets:
            med = {
                a.key: statistics.median(sd[key][(a.key, b)]["hv"] for sd in seeds) for a in s.arms
            }
            rivals = [a for a in s.arms if a.baseline and a.key != OURS]
            if not rivals:  # the default arm run alone (a cost measurement): nothing to compare
                continue
            best = max(rivals, key=lambda a: med[a.key])
            r = med[OURS] / med[best.key] if med[best.key] > 0 else math.inf
            verdict = "beaten" if r > 1 + 1e-9 else "**not beaten**"
            # No ratio where no baseline kept a model within the floor: a quotient of 0 says less.
            shown = f"**{r:.2f}x**" if math.isfinite(r) else "no ratio (no baseline front)"
            if med[OURS] <= 0 and not math.isfinite(r):
                verdict = "**not beaten** (no arm kept a model within the floor)"
            lines.append(
                f"- {task}, budget {b}: default {med[OURS]:.4f} vs best baseline {best.label} "
                f"{med[best.key]:.4f}: {shown}, {verdict}."
            )
    return lines


def _stage_ms(screen: dict[str, Any], stage: str) -> float | None:
    """A stage's milliseconds per screened candidate (copies of a plan were not screened again;
    the damage table's screenings are not split by stage). None where a run predates stages."""
    if f"screen_{stage}_s" not in screen:
        return None
    n = screen.get("screen_candidates", 0) + screen.get("screen_failed", 0)
    n -= screen.get("screen_duplicates", 0)
    return 1000 * screen[f"screen_{stage}_s"] / n if n > 0 else None


def _median_of(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    return f"{statistics.median(got):.0f}" if got else "n/a"


def screen_rows(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for task, seeds in results.items():
        tau = [sd["proxy"].get("proxy_kendall_tau") for sd in seeds]
        rho = [sd["proxy"].get("proxy_spearman") for sd in seeds]
        per = [sd["screen"].get("screen_s_per_candidate", 0.0) for sd in seeds]
        rows.append(
            {
                "task": task,
                "proxy Kendall tau": spread(tau, "{:.2f}"),
                "proxy Spearman": spread(rho, "{:.2f}"),
                "candidates": spread(
                    [sd["screen"].get("screen_candidates") for sd in seeds], "{:.0f}"
                ),
                "plans told, not screened again": spread(
                    [sd["screen"].get("screen_duplicates", 0.0) for sd in seeds], "{:.0f}"
                ),
                "worker s / candidate": spread(per, "{:.3f}"),
                "candidates / s / core": spread([1 / x if x else None for x in per], "{:.1f}"),
                "finetuned trial worker s": spread([sd["trial_s"] for sd in seeds], "{:.2f}"),
                "candidate / trial cost": spread(
                    [
                        x / sd["trial_s"] if sd["trial_s"] else None
                        for x, sd in zip(per, seeds, strict=True)
                    ],
                    "{:.3f}",
                ),
                "median ms / candidate: prune, BN, score, time": " / ".join(
                    _median_of([_stage_ms(sd["screen"], k) for sd in seeds]) for k in SCREEN_STAGES
                ),
                "screen wall s": spread(
                    [sd["screen"].get("screen_wall_s") for sd in seeds], "{:.1f}"
                ),
                "extra trials (compute-matched)": spread([sd["extra"] for sd in seeds], "{:.0f}"),
            }
        )
    return rows


def report(results: dict[str, list[dict[str, Any]]], s: Settings, wall: float) -> str:
    rows = [r for task, seeds in results.items() for r in task_rows(task, seeds, s)]
    matched = [r for task, seeds in results.items() for r in task_rows(task, seeds, s, "matched")]
    refs = "; ".join(
        f"{t}: base {statistics.median(sd['base_ms'] for sd in seeds):.3f} ms at batch {batch_of(t)}, "
        f"2x-uniform model at {spread([sd['ref_2x'] for sd in seeds], '{:.3f}')} x base latency"
        for t, seeds in results.items()
    )
    return (
        f"## Search quality: {', '.join(results)}, {len(s.seeds)} seed(s)\n\nTasks {', '.join(results)}; {len(s.seeds)} seed(s); budgets {list(s.budgets)} "
        f"finetuned trials per arm ({s.epochs} finetune epoch(s) each, every early-stop rule off); arms "
        f"{', '.join(a.label for a in s.arms)}. "
        + (
            "**Base models vary with the seed**: seed k prunes a base model trained, and data split, "
            "with the task option seed = k (`--vary-base`). "
            if s.vary_base
            else "Every seed prunes the task's one base model (its options as given). "
        )
        + "Each arm is a real prunesearch run (see the docstring of "
        "`benchmarks/quality.py` for what each arm gets). Latency: every model of a seed re-timed side by side "
        f"after the seed's runs, each paired against the base model (the product's paired protocol; {s.passes} passes in "
        "shuffled orders, median ratio), so latency is a fraction of the base model's. "
        f"Hypervolume reference: latency 1.0 (base), accuracy base - {FLOOR:.2f}. Cells: median [min-max] over "
        "seeds. 'acc @ 2x-uniform latency': best accuracy at or below the latency of the least-pruned uniform "
        "model that is >= 2x faster than base (n/a: none was, or the arm found nothing that fast). 'Best "
        f"speed-up': fastest model within {DROP * 100:.0f} point of base accuracy (1.00x: none faster).\n\n"
        f"Reference latencies: {refs}.\n\n### Finetune-matched (every arm: B finetuned trials)\n\n"
        + table(rows, list(rows[0]))
        + "\n\nDefault vs the best baseline (median hypervolume):\n\n"
        + "\n".join(ratios(results, s, "scores"))
        + (
            "\n\n### Compute-matched (baselines without a screen: B + E finetuned trials, E = the "
            "screen's cost in finetuned trials)\n\n"
            + table(matched, list(matched[0]))
            + "\n\nDefault vs the best baseline, compute-matched (median hypervolume):\n\n"
            + "\n".join(ratios(results, s, "matched"))
            if s.matched
            else "\n\nCompute-matched: not run (`--finetune-matched`: every arm ran B trials only)."
        )
        + "\n\n### The screen: proxy quality and cost\n\nKendall tau / Spearman between the proxy (adaptive-BN "
        "score on a training slice) and finetuned validation accuracy over the default arm's finetuned picks; "
        "cost in worker seconds (prune, re-estimate BN, score, and its share of the short timing) per plan "
        "actually screened (a plan the sampler asked for again is told the first result: 'plans told').\n\n"
        + table(screen_rows(results), list(screen_rows(results)[0]))
        + f"\n\nWall time: {wall / 60:.1f} min.\n"
    )
