"""Generator-free ceiling: how far *any* per-layer channel allocation beats the uniform sweep
once finetuned, measured on pools that no search generator made.

    python -m benchmarks.ceiling build --tasks digits --seeds 5    # the pools (slow, once)
    python -m benchmarks.ceiling redraw --tasks digits --seeds 5   # the ceilings' picks again
    python -m benchmarks.ceiling screen --tasks digits --seeds 5   # every plan's proxy (seconds)
    python -m benchmarks.ceiling screen --steps 2,4,8 ...          # proxies after a short finetune
    python -m benchmarks.ceiling screen --variants refit_head=false  # any screen setting
    python -m benchmarks.ceiling report --tasks digits --seeds 5   # the table (seconds)

``build``, per task and seed: plain random search over per-layer ratios (``--random`` plans: the
quality benchmark's random arm, its sampler and space), a dense uniform sweep (``--dense``
evenly spaced ratios in (0, 0.8], l2, no rounding: TP's default at a finer step than the
baseline's), and the baselines exactly as ``benchmarks.quality`` runs them (the uniform sweep
and TP global pruning at the largest budget). Every plan is finetuned as a trial of the product
is; every architecture is then re-timed paired against the base, side by side, as the quality
benchmark does. One JSON file per pool.

``report``: the ceiling (the best front any ``budget`` plans make, found greedily, as in
``benchmarks.selection``) over the dense uniform plans alone, the random per-layer plans alone,
and both, each as a ratio of medians against the better baseline. The dense-uniform ceiling is
what picking among uniform plans with hindsight gives; what the union adds beyond it is what
non-uniform allocation can add at all, on this task, at this finetune. ``redraw`` finetunes the
ceilings' picks again under other seeds, and ``report`` then also scores those picks on the
mean of the other draws, taking out the lucky finetunes a hindsight pick favours. ``screen``
screens every plan of a pool as the default search's screen would (the proxy, on the training
slice, and a short timing); ``report`` then also replays the search's pick rule on those plans,
with that proxy and with a perfect one (each plan's finetuned accuracy): how much of the gap
between the rule and the ceiling is the proxy's. ``screen --steps 2,4,8`` screens them again
with a short finetune before scoring (``search.screen.steps``), ``--variants`` with any other
screen setting (``refit_head=false``), and ``report`` compares those proxies with the default:
their ranking of finetuned accuracy and the pick rule on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scipy.stats import kendalltau

from orchestrator import next_pick, plan_key, screen_job
from workers import build_task, screen_candidates

from . import quality as q
from ._results import RESULTS, table, write_section
from .selection import ceiling_picks, finetune_all, hv_of, oracle_proxy, redrawn_picks, replay

POOLS = Path(tempfile.gettempdir()) / "prunesearch-ceiling"
RANDOM = q.ARMS[1]  # plain random search: per-layer ratios, no screen, no anchors
DENSE = q.Arm("dense uniform", "dense", "random", q.SWEEP_SPACE, sweep=True, anchors=0, screen=0)
KINDS = ("uniform", "random")  # a pool candidate's kind: the dense sweep's, or random search's


def build(task: str, seed: int, s: q.Settings, tmp: Path, n_random: int, n_dense: int) -> dict:
    """One pool: the random and dense plans finetuned, the baselines run, all re-timed."""
    runs = {
        "random": q.run_arm(RANDOM, task, seed, s, tmp, extra=n_random - s.trials),
        "dense": q.run_arm(DENSE, task, seed, s, tmp, extra=n_dense - s.trials),
        **{
            a.key: q.run_arm(a, task, seed, s, tmp)
            for a in q.ARMS
            if a.key in ("uniform", "global")
        },
    }
    lat = q.remeasure(
        build_task(task), list(runs.values()), q.batch_of(task), s.passes, seed, s.timing
    )
    kinds = {"dense": "uniform", "random": "random"}
    return {
        "task": task,
        "seed": seed,
        "base_accuracy": runs["random"]["base_accuracy"],
        "base_latency_ms": runs["random"]["base_latency_ms"],
        "candidates": [
            {**r, "params": {}, "kind": kind}
            for key, kind in kinds.items()
            for r in runs[key]["records"]
        ],
        "runs": {k: {"records": runs[k]["records"]} for k in ("uniform", "global")},
        "lat": lat,
    }


def subset(pool: dict[str, Any], kinds: Sequence[str]) -> dict[str, Any]:
    """``pool`` with only the candidates of ``kinds``."""
    return {**pool, "candidates": [c for c in pool["candidates"] if c["kind"] in kinds]}


SUBSETS = {"dense uniform": ("uniform",), "random per-layer": ("random",), "both": KINDS}


def redraw(
    task: str, seed: int, s: q.Settings, tmp: Path, pool: dict[str, Any], draws: int
) -> None:
    """The plans of every subset's ceiling at the largest budget finetuned again under
    ``draws`` other search seeds; ``pool["redraws"]``: each plan's key to those accuracies."""
    picks = [c for kinds in SUBSETS.values() for c in ceiling_picks(subset(pool, kinds), s.trials)]
    distinct = list({plan_key(c["plan"]): c for c in picks}.values())
    again: dict[str, list[float]] = {plan_key(c["plan"]): [] for c in distinct}
    for k in range(1, draws + 1):
        # Another search seed: each trial's finetune (its data order) follows from it.
        for r in finetune_all(task, seed + 1000 * k, s, tmp, distinct)["records"]:
            again[plan_key(r["plan"])].append(r["accuracy"])
    pool["redraws"] = again


def perfect_front(pool: dict[str, Any]) -> float:
    """A bound no front of this pool's plans can pass: one model as fast as the pool's fastest
    plan (baselines included) and as accurate as its most accurate one (or the base model), so
    it dominates every plan of the pool."""
    recs = [
        r
        for r in [
            *pool["candidates"],
            *(x for run in pool["runs"].values() for x in run["records"]),
        ]
        if r["accuracy"] is not None
    ]
    top = max([pool["base_accuracy"], *(r["accuracy"] for r in recs)])
    fastest = min(pool["lat"][r["signature"]] for r in recs)
    return hv_of(pool, [{"accuracy": top, "signature": "fastest"}], {"fastest": fastest})


def screen(
    task: str, seed: int, s: q.Settings, tmp: Path, pool: dict[str, Any], variant: str = ""
) -> None:
    """Every distinct plan of ``pool`` screened as the default arm's search screens a candidate
    (its job: the same proxy slices, target and seed), in place: ``pool["screen"]`` maps each
    plan's key to its proxy, the proxy's standard error and its screen latency (ms). With a
    ``variant`` (``"key=value"``, a screen job setting such as ``steps=4`` or
    ``refit_head=false``) the proxies go to ``pool["variants"][variant]`` instead, with the first
    screen's latencies. The median worker seconds of a candidate's proxy (pruning, adapting,
    scoring: not timing) go to ``pool["variant_s"][variant]`` ("" for the default)."""
    job = screen_job(q.arm_config(q.ARMS[0], task, seed, s, tmp)) | _setting(variant)
    plans = list({plan_key(c["plan"]): c["plan"] for c in pool["candidates"]}.items())
    if variant:
        plans = [(k, plan) for k, plan in plans if k in pool["screen"]]
    got: dict[str, list[float]] = {}
    seconds: list[float] = []
    for i in range(0, len(plans), 16):  # batches of 16, as the search's screen tasks take them
        batch = plans[i : i + 16]
        chunk = [{"number": i + j, "plan": plan} for j, (_, plan) in enumerate(batch)]
        # Variants reuse the first screen's timings: only the proxy differs between them.
        done = screen_candidates(job | {"candidates": chunk, **({"timed": []} if variant else {})})
        for (key, _), r in zip(batch, done, strict=True):
            if r.proxy is not None and (variant or r.latency is not None):
                ms = pool["screen"][key][2] if variant else r.latency["median_ms"]
                got[key] = [r.proxy, r.proxy_se or 0.0, ms]
                seconds.append(r.seconds - r.stages.get("time", 0.0))  # the proxy's own cost
    pool.setdefault("variant_s", {})[variant] = statistics.median(seconds) if seconds else None
    if variant:
        pool.setdefault("variants", {})[variant] = got
    else:
        pool["screen"] = got


def _setting(variant: str) -> dict[str, Any]:
    """``"steps=4"`` -> ``{"steps": 4}``, ``"refit_head=false"`` -> ``{"refit_head": False}``."""
    if not variant:
        return {}
    key, _, value = variant.partition("=")
    # YAML's spellings of a bool (False, True) read as JSON's.
    return {key: json.loads(value.lower() if value.lower() in ("true", "false") else value)}


def screened_pool(pool: dict[str, Any]) -> dict[str, Any]:
    """``pool`` as ``benchmarks.selection.replay`` reads one: each finetuned candidate with its
    screen proxy and latency, numbered."""
    cands = []
    for n, c in enumerate(pool["candidates"]):
        got = pool["screen"].get(plan_key(c["plan"]))
        if got is None or c["accuracy"] is None:
            continue
        proxy, se, ms = got
        cands.append(
            {
                **c,
                "number": n,
                "proxy": proxy,
                "proxy_se": se,
                "latency_ms": ms,
                "uniform": c["kind"] == "uniform",
            }
        )
    return {**pool, "candidates": cands}


def _best_baseline(pools: list[dict[str, Any]], budget: int) -> list[float]:
    """Each pool's better baseline (the uniform sweep or TP global pruning) at ``budget``."""
    return [
        max(hv_of(p, p["runs"][k]["records"][:budget]) for k in ("uniform", "global"))
        for p in pools
    ]


def rule_rows(pools: list[dict[str, Any]], budgets: Sequence[int]) -> list[dict[str, Any]]:
    """The search's pick rule (``next_pick``) on each pool's screened plans, and the same rule
    with a perfect proxy (each plan's finetuned accuracy), against the better baseline."""
    out = []
    screened = [screened_pool(p) for p in pools]
    for b in budgets:
        best = _best_baseline(pools, b)
        rule = [hv_of(p, replay(p, next_pick, b)) for p in screened]
        perfect = [hv_of(p, replay(p, oracle_proxy(p, next_pick), b)) for p in screened]
        out.append(
            {
                "budget": b,
                "rule / best": _ratio(rule, best),
                "rule: pools ahead": f"{sum(r > x for r, x in zip(rule, best, strict=True))}/{len(pools)}",
                "rule, perfect proxy / best": _ratio(perfect, best),
                "per pool (rule)": ", ".join(_div(r, x) for r, x in zip(rule, best, strict=True)),
            }
        )
    return out


def variant_rows(pools: list[dict[str, Any]], budgets: Sequence[int]) -> list[dict[str, Any]]:
    """Per proxy variant screened on every pool (``screen --variants``; "default": the screen
    as shipped): how well it ranks finetuned accuracy over all the pool's plans (Kendall tau,
    median over pools; 'within bins': the mean tau inside six latency sextiles, which is what
    selection sees), the search's pick rule on it against the better baseline, and its cost."""
    shared = set.intersection(*(set(p.get("variants", {})) for p in pools))
    if not shared:
        return []
    out = []
    for name in ["", *sorted(shared)]:
        told = [p if not name else {**p, "screen": p["variants"][name]} for p in pools]
        screened = [screened_pool(p) for p in told]
        taus = [_tau(p["candidates"]) for p in screened]
        binned = [_binned_tau(p["candidates"]) for p in screened]
        row: dict[str, Any] = {
            "proxy": name or "default",
            "Kendall tau (median)": f"{statistics.median(taus):.3f}",
            "per pool": ", ".join(f"{t:.2f}" for t in taus),
            "within bins": f"{statistics.median(binned):.3f}",
        }
        for b in budgets:
            best = _best_baseline(pools, b)
            rule = [hv_of(p, replay(p, next_pick, b)) for p in screened]
            ahead = sum(r > x for r, x in zip(rule, best, strict=True))
            row[f"rule / best @{b}"] = f"{_ratio(rule, best)} ({ahead}/{len(pools)})"
        ms = [p["variant_s"][name] * 1000 for p in pools if p.get("variant_s", {}).get(name)]
        row["proxy ms / candidate"] = f"{statistics.median(ms):.0f}" if ms else "n/a"
        out.append(row)
    return out


def _tau(cands: Sequence[dict[str, Any]]) -> float:
    return float(kendalltau([c["proxy"] for c in cands], [c["accuracy"] for c in cands]).statistic)


def _binned_tau(cands: Sequence[dict[str, Any]], bins: int = 6) -> float:
    """The mean Kendall tau of proxy and finetuned accuracy inside each latency sextile."""
    ordered = sorted(cands, key=lambda c: c["latency_ms"])
    size = len(ordered) / bins
    parts = [ordered[round(k * size) : round((k + 1) * size)] for k in range(bins)]
    taus = [_tau(part) for part in parts if len(part) > 4]
    return statistics.mean(t for t in taus if t == t) if taus else float("nan")


def rows(pools: list[dict[str, Any]], budgets: Sequence[int]) -> list[dict[str, Any]]:
    """Per budget and subset: the ceiling (and re-drawn, where every pool has re-draws) against
    the better baseline, medians over pools, with the bound no plan of the pools can pass."""
    out = []
    bound = [perfect_front(p) for p in pools]
    for b in budgets:
        best = _best_baseline(pools, b)
        for name, kinds in SUBSETS.items():
            picks = [ceiling_picks(subset(p, kinds), b) for p in pools]
            top = [hv_of(p, k) for p, k in zip(pools, picks, strict=True)]
            row = {
                "budget": b,
                "plans": name,
                "best baseline": f"{statistics.median(best):.4f}",
                "ceiling": f"{statistics.median(top):.4f}",
                "ceiling / best": _ratio(top, best),
                "per pool": ", ".join(_div(t, x) for t, x in zip(top, best, strict=True)),
                "perfect front / best": _ratio(bound, best),
            }
            if all("redraws" in p for p in pools):
                again = [hv_of(p, redrawn_picks(p, k)) for p, k in zip(pools, picks, strict=True)]
                row["re-drawn / best"] = _ratio(again, best)
                row["re-drawn per pool"] = ", ".join(
                    _div(t, x) for t, x in zip(again, best, strict=True)
                )
            out.append(row)
    return out


def _ratio(values: list[float], best: list[float]) -> str:
    got = _div(statistics.median(values), statistics.median(best))
    return got if got == "n/a" else got + "x"


def _div(a: float, b: float) -> str:
    """``a / b`` to two places; "n/a" where the baseline has no hypervolume at all."""
    return f"{a / b:.2f}" if b > 0 else "n/a"


def main(argv: list[str] | None = None) -> Path | None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["build", "redraw", "screen", "report"])
    p.add_argument("--tasks", default="digits")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budgets", default="6,12")
    p.add_argument("--random", type=int, default=96, help="build: random per-layer plans")
    p.add_argument("--dense", type=int, default=16, help="build: dense uniform ratios")
    p.add_argument("--draws", type=int, default=2, help="redraw: other finetune seeds per plan")
    p.add_argument(
        "--steps",
        default="",
        help="screen: also screen with these short finetunes (search.screen.steps), e.g. 2,4,8",
    )
    p.add_argument(
        "--variants",
        default="",
        help="screen: also screen with these job settings, e.g. refit_head=false,steps=4",
    )
    p.add_argument("--pools", type=Path, default=POOLS)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    budgets = tuple(int(b) for b in args.budgets.split(","))
    args.variants = [
        *(f"steps={int(k)}" for k in args.steps.split(",") if k),
        *(v for v in args.variants.split(",") if v),
    ]
    tasks = args.tasks.split(",")
    args.pools.mkdir(parents=True, exist_ok=True)
    if args.what != "report":
        s = q.Settings(tuple(tasks), tuple(range(args.seeds)), budgets, 1)
        for task in tasks:
            for seed in range(args.seeds):
                _step(args, task, seed, s, args.pools / f"{task}-{seed}.json")
        return None
    sections = []
    for task in tasks:
        paths = [args.pools / f"{task}-{k}.json" for k in range(args.seeds)]
        pools = [json.loads(p.read_text()) for p in paths if p.exists()]  # those built so far
        got = rows(pools, budgets)
        sections.append(f"**{task}**, {len(pools)} pools\n\n" + table(got, list(got[-1])))
        if pools and all("screen" in p for p in pools):
            picked = rule_rows(pools, budgets)
            sections.append(
                f"**{task}**, the search's pick rule on the same plans, screened\n\n"
                + table(picked, list(picked[0]))
            )
            if got := variant_rows(pools, budgets):
                sections.append(
                    f"**{task}**, proxy variants (`screen --variants`) against the default"
                    "\n\n" + table(got, list(got[0]))
                )
    body = (
        "## Generator-free ceiling\n\n"
        "How far any per-layer channel allocation can beat the uniform sweep once finetuned "
        "(`python -m benchmarks.ceiling build`): per seed, "
        f"{args.random} plans of plain random per-layer search and a dense uniform sweep of "
        f"{args.dense} ratios, every one finetuned as a trial (1 epoch), every architecture "
        "re-timed paired against the base side by side. Ceiling: the best front any `budget` "
        "plans of a subset make (greedy, with every finetuned accuracy known); 're-drawn': those "
        "picks scored on the mean of other finetunes of the same plans (`redraw`), which takes "
        "the lucky draws a hindsight pick favours out. Ratios of medians against the better of "
        "the uniform sweep and TP global pruning per pool (`budget` trials each, as in the "
        "quality benchmark); 'per pool': each pool's own ratio.\n\n" + "\n\n".join(sections)
    )
    print(body)
    return write_section("ceiling", body, args.out)


def _unscreened(pool: dict[str, Any], variants: Sequence[str]) -> list[str]:
    """The screens ``pool`` lacks, the default one ("") first: the others reuse its timings."""
    todo = [] if "screen" in pool else [""]
    return todo + [v for v in variants if v not in pool.get("variants", {})]


def _step(args: argparse.Namespace, task: str, seed: int, s: q.Settings, path: Path) -> None:
    """``build`` a pool not built yet, or ``redraw`` / ``screen`` one not re-drawn / screened
    yet; written at once."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.what == "build":
            if path.exists():
                return
            pool = build(task, seed, s, Path(tmp), args.random, args.dense)
        else:
            pool = json.loads(path.read_text())
            if args.what == "redraw" and "redraws" not in pool:
                redraw(task, seed, s, Path(tmp), pool, args.draws)
            elif args.what == "screen" and (todo := _unscreened(pool, args.variants)):
                for variant in todo:
                    screen(task, seed, s, Path(tmp), pool, variant)
            else:
                return
    path.write_text(json.dumps(pool))
    print(f"ceiling: {path} ({args.what}) in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
