"""Selection replay: how well the search's pick rule spends a budget of finetuned trials, measured
offline on pools where *every* screened candidate was finetuned.

    python -m benchmarks.selection build --tasks digits --seeds 5     # the pools (slow, once)
    python -m benchmarks.selection replay --tasks digits --seeds 5    # the rule on them (seconds)
    python -m benchmarks.selection redraw --tasks digits --seeds 5    # finetune noise (minutes, once)

``build``, per task and seed: the product's default arm (its screen: the candidates, their proxy
and screen latency), then every distinct screened plan finetuned exactly as a pick would be, the
uniform sweep and TP global pruning, and every architecture re-timed side by side (as
``benchmarks.quality`` does). One JSON file per pool in ``--pools``.

``replay``: the product's ``next_pick`` run against a pool as the search would run it (picks
made while ``concurrency`` trials are still finetuning, results told as they land), read at each
budget by the quality benchmark's hypervolume; beside it the baselines' own hypervolume and the
ceiling (the best front any ``budget`` candidates of the pool make, found greedily). A rule
tried here costs seconds instead of a 40-minute benchmark run; what it shows is then checked
with ``benchmarks.quality``, whose runs are the measure of record.

``redraw``: the plans that make a pool's ceiling (at the largest budget) finetuned again under
``--draws`` other search seeds (same plan, same architecture, another finetune), kept in the
pool. ``replay`` then reports how much a finetune's accuracy varies between seeds, and the
ceiling *re-drawn*: those picks scored on the other draws' mean. The first-draw ceiling knows
every candidate's lucky finetune, which no rule can; the re-drawn one takes that luck out (a
lower bound of what an oracle of the plans' true quality would reach). Beside it, 'perfect
proxy, bins': the pick rule with each candidate's proxy replaced by its finetuned accuracy, the
most the proxy could give it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState, create_trial

from orchestrator import (
    Candidate,
    Point,
    denoised_latencies,
    hypervolume,
    next_pick,
    plan_key,
    prepare,
    run_search,
)
from search_space import Profile, PruningPlan, discover
from workers import build_task, profile_groups

from . import quality as q
from ._results import RESULTS, table, write_section

POOLS = Path(tempfile.gettempdir()) / "prunesearch-pools"
Rule = Callable[[Sequence[Candidate], Sequence[FrozenTrial], float, int, float | None], Any]


# -- build -----------------------------------------------------------------------------------
def build_pool(task: str, seed: int, s: q.Settings, tmp: Path) -> dict[str, Any]:
    default = q.run_arm(q.ARMS[0], task, seed, s, tmp)
    name = q.arm_config(q.ARMS[0], task, seed, s, tmp).name
    sstudy = optuna.load_study(study_name=name + ".screen", storage=f"sqlite:///{tmp}/{name}.db")
    cands = screened(sstudy)
    distinct = list({plan_key(c["plan"]): c for c in cands}.values())
    pool = finetune_all(task, seed, s, tmp, distinct)
    by_plan = {plan_key(r["plan"]): r for r in pool["records"]}
    for c in cands:
        r = by_plan.get(plan_key(c["plan"]))
        r = r or {}
        c["accuracy"], c["signature"] = r.get("accuracy"), r.get("signature")
        c["trial_latency_ms"] = r.get("latency_ms")  # the full paired protocol's figure
    runs = {
        "default": default,
        "pool": pool,
        **{
            a.key: q.run_arm(a, task, seed, s, tmp)
            for a in q.ARMS
            if a.key in ("uniform", "global")
        },
    }
    lat = q.remeasure(
        build_task(task), list(runs.values()), q.batch_of(task), s.passes, seed, s.timing
    )
    return {
        "task": task,
        "seed": seed,
        "profile": pool_profile({"task": task, "seed": seed}).to_dict(),
        "base_accuracy": default["base_accuracy"],
        "base_latency_ms": default.get("base_latency_ms"),
        "candidates": cands,
        "runs": {k: {"records": r["records"]} for k, r in runs.items() if k != "pool"},
        "lat": lat,
    }


def screened(sstudy: optuna.Study) -> list[dict[str, Any]]:
    return [
        {
            "number": t.number,
            "params": dict(t.params),
            "plan": t.user_attrs["plan"],
            "proxy": t.values[0],
            "latency_ms": t.values[1],
            "proxy_se": float(t.user_attrs.get("proxy_se") or 0.0),
            "score": t.user_attrs.get("score"),  # the task's metric on the scoring slice
            "uniform": _uniform(t.user_attrs["plan"]),
        }
        for t in sstudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ]


def _uniform(plan: dict[str, Any]) -> bool:
    p = PruningPlan.from_dict(plan)
    return not p.global_pruning and not p.drop and len(set(p.group_ratios().values())) <= 1


def finetune_all(
    task: str, seed: int, s: q.Settings, tmp: Path, cands: list[dict[str, Any]]
) -> dict[str, Any]:
    """Every candidate finetuned as a pick is: its plan fixed, its params enqueued."""
    arm = q.Arm("pool", "pool", "random", q.SEARCH_SPACE, anchors=0, screen=0)
    config = q.arm_config(arm, task, seed, s, tmp, len(cands))
    study = optuna.create_study(
        study_name=config.name, storage=config.storage, directions=["maximize", "minimize"]
    )
    for c in cands:
        study.enqueue_trial(c["params"], user_attrs={"plan": c["plan"]})
    run_search(prepare(config), progress=lambda line: None)
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    return {
        "records": [
            {
                "accuracy": t.values[0],
                "latency_ms": t.values[1],
                "plan": t.user_attrs["plan"],
                "signature": t.user_attrs["signature"],
                "number": t.number,
            }
            for t in study.trials
            if t.state == TrialState.COMPLETE
        ]
    }


# -- replay ----------------------------------------------------------------------------------
def replay(
    pool: dict[str, Any], rule: Rule, budget: int, concurrency: int = 2, denoise: bool = True
) -> list[dict[str, Any]]:
    """The picks ``rule`` makes in a search of ``budget`` trials, ``concurrency`` at a time: a
    pick sees the trials before it, the last ``concurrency - 1`` of them still running. The
    candidates' latencies denoised as the search does (``denoised_latencies``), or raw."""
    first = {plan_key(c["plan"]): c for c in reversed(pool["candidates"])}
    plans = [c["plan"] for c in first.values()]
    measured = [c["latency_ms"] for c in first.values()]
    profile = pool_profile(pool) if denoise else None
    latency = dict(zip(first, denoised_latencies(plans, measured, profile), strict=True))
    cands = [
        Candidate(
            c["number"],
            c["params"],
            c["plan"],
            c["proxy"],
            latency[plan_key(c["plan"])],
            c["proxy_se"],
            c["uniform"],
            measured_ms=c["latency_ms"],
        )
        for c in pool["candidates"]
        if c["accuracy"] is not None
    ]
    acc = {c["number"]: c for c in pool["candidates"]}
    floor = max(0.0, pool["base_accuracy"] - 0.10)
    picks: list[Candidate] = []
    for i in range(budget):
        trials = [
            _trial(k, c, acc[c.number]["accuracy"], running=i - k < concurrency)
            for k, c in enumerate(picks)
        ]
        pick = rule(cands, trials, floor, budget, pool.get("base_latency_ms"))
        if pick is None:
            break
        picks.append(pick)
    return [
        {
            "number": k,
            "accuracy": acc[c.number]["accuracy"],
            "signature": acc[c.number]["signature"],
        }
        for k, c in enumerate(picks)
    ]


_PROFILES: dict[tuple[str, int], Profile] = {}


def redraw(
    task: str, seed: int, s: q.Settings, tmp: Path, pool: dict[str, Any], draws: int
) -> None:
    """Finetune the plans that make ``pool``'s ceiling at the largest budget again under
    ``draws`` other seeds, in place: ``pool["redraws"]`` maps each plan's key to its accuracies
    on those draws. Only those plans: the re-drawn ceiling scores no others (the greedy ceiling
    at a smaller budget is a prefix of the one at the largest)."""
    distinct = list({plan_key(c["plan"]): c for c in ceiling_picks(pool, max(s.budgets))}.values())
    again: dict[str, list[float]] = {plan_key(c["plan"]): [] for c in distinct}
    for k in range(1, draws + 1):
        # Another search seed: each trial's seed (its finetune's data order) follows from it.
        records = finetune_all(task, seed + 1000 * k, s, tmp, distinct)["records"]
        for r in records:
            again[plan_key(r["plan"])].append(r["accuracy"])
    pool["redraws"] = again


def oracle_proxy(pool: dict[str, Any], rule: Rule) -> Rule:
    """``rule`` with every candidate's proxy replaced by its finetuned accuracy (no noise)."""
    accuracy = {c["number"]: c["accuracy"] for c in pool["candidates"]}

    def perfect(screened, trials, floor, bins, slowest):
        told = [replace(c, proxy=accuracy[c.number], proxy_se=0.0) for c in screened]
        return rule(told, trials, floor, bins, slowest)

    return perfect


def finetune_sd(pool: dict[str, Any]) -> float | None:
    """The median over the re-drawn plans of the standard deviation of their finetuned
    accuracy (all draws)."""
    if "redraws" not in pool:
        return None
    first = {
        plan_key(c["plan"]): c["accuracy"] for c in pool["candidates"] if c["accuracy"] is not None
    }
    sds = [statistics.stdev([first[k], *v]) for k, v in pool["redraws"].items() if v and k in first]
    return statistics.median(sds) if sds else None


def pool_profile(pool: dict[str, Any]) -> Profile:
    """The allocator's profile of the pool's base model (the MACs cost model the search fits),
    as the search computes it: kept in the pool, or computed once per task and seed."""
    if "profile" in pool:
        return Profile.from_dict(pool["profile"])
    key = (pool["task"], int(pool["seed"]))
    if key not in _PROFILES:
        task = build_task(pool["task"])
        found = discover(task.model, task.example_inputs)
        _PROFILES[key] = profile_groups(task, task.model, found, seed=key[1])
    return _PROFILES[key]


def _trial(k: int, c: Candidate, accuracy: float, running: bool) -> FrozenTrial:
    attrs = {"screen": {"number": c.number, "proxy": c.proxy, "latency_ms": c.latency_ms}}
    if running:
        t = create_trial(state=TrialState.COMPLETE, values=[0.0, 0.0], user_attrs=attrs)
        t.state, t.values = TrialState.RUNNING, None
    else:
        t = create_trial(
            state=TrialState.COMPLETE, values=[accuracy, c.latency_ms], user_attrs=attrs
        )
    t.number = k
    return t


def hv_of(
    pool: dict[str, Any], records: list[dict[str, Any]], more: dict[str, float] | None = None
) -> float:
    """Hypervolume of ``records`` at the pool's paired latencies (``more``: latencies of
    signatures the pool never timed)."""
    lat = {**pool["lat"], **more} if more else pool["lat"]
    pts = [
        Point(i, r["accuracy"], lat[r["signature"]] / lat["base"]) for i, r in enumerate(records)
    ]
    return hypervolume(pts, 1.0, pool["base_accuracy"] - q.FLOOR)


def ceiling_picks(pool: dict[str, Any], budget: int) -> list[dict[str, Any]]:
    """Greedy best front of ``budget`` pool candidates (each step adds the most hypervolume)."""
    recs = [c for c in pool["candidates"] if c["accuracy"] is not None]
    chosen: list[dict[str, Any]] = []
    for _ in range(budget):
        chosen.append(max(recs, key=lambda r: hv_of(pool, [*chosen, r])))
    return chosen


def ceiling(pool: dict[str, Any], budget: int, redrawn: bool = False) -> float:
    """The hypervolume of ``ceiling_picks``; ``redrawn``: those same picks scored on their
    re-drawn finetunes' mean accuracy (``redrawn_picks``)."""
    chosen = ceiling_picks(pool, budget)
    return hv_of(pool, redrawn_picks(pool, chosen) if redrawn else chosen)


def redrawn_picks(pool: dict[str, Any], picks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``picks`` with each accuracy the mean of its plan's re-draws (the first draw's where a
    plan has none)."""
    again = pool["redraws"]
    return [
        {**c, "accuracy": statistics.fmean(again.get(plan_key(c["plan"])) or [c["accuracy"]])}
        for c in picks
    ]


def replay_rows(
    pools: list[dict[str, Any]], rule: Rule, budgets: Sequence[int]
) -> list[dict[str, Any]]:
    rows = []
    for b in budgets:
        ours = [hv_of(p, replay(p, rule, b)) for p in pools]
        raw = [hv_of(p, replay(p, rule, b, denoise=False)) for p in pools]
        real = [hv_of(p, p["runs"]["default"]["records"][:b]) for p in pools]
        base = {
            k: [hv_of(p, p["runs"][k]["records"][:b]) for p in pools] for k in ("uniform", "global")
        }
        best = [max(base["uniform"][i], base["global"][i]) for i in range(len(pools))]
        picks = [ceiling_picks(p, b) for p in pools]
        top = [hv_of(p, k) for p, k in zip(pools, picks, strict=True)]
        perfect = [hv_of(p, replay(p, oracle_proxy(p, rule), b)) for p in pools]
        rows.append(
            {
                "budget": b,
                "replayed rule": f"{statistics.median(ours):.4f}",
                "on raw screen latencies": f"{statistics.median(raw):.4f}",
                "default arm (real run)": f"{statistics.median(real):.4f}",
                "uniform": f"{statistics.median(base['uniform']):.4f}",
                "TP global": f"{statistics.median(base['global']):.4f}",
                "ceiling": f"{statistics.median(top):.4f}",
                "perfect proxy, bins": f"{statistics.median(perfect):.4f}",
                "rule / best baseline": f"{statistics.median(ours) / statistics.median(best):.2f}x",
                "seeds ahead": f"{sum(o > b_ for o, b_ in zip(ours, best, strict=False))}/{len(pools)}",
                "raw / best baseline": f"{statistics.median(raw) / statistics.median(best):.2f}x",
                "raw: seeds ahead": f"{sum(o > b_ for o, b_ in zip(raw, best, strict=False))}/{len(pools)}",
                "ceiling / best baseline": f"{statistics.median(top) / statistics.median(best):.2f}x",
                **_redrawn(pools, picks, best),
            }
        )
    return rows


def _redrawn(
    pools: list[dict[str, Any]], picks: list[list[dict[str, Any]]], best: list[float]
) -> dict[str, str]:
    """The re-drawn ceiling's columns (``picks``: each pool's ceiling), where every pool has
    its re-draws."""
    if not all("redraws" in p for p in pools):
        return {}
    again = [hv_of(p, redrawn_picks(p, k)) for p, k in zip(pools, picks, strict=True)]
    sds = [finetune_sd(p) for p in pools]
    return {
        "ceiling re-drawn / best baseline": f"{statistics.median(again) / statistics.median(best):.2f}x",
        "finetune sd (accuracy)": f"{statistics.median(sds):.4f}",
    }


def _build_step(
    task: str, seed: int, s: q.Settings, tmp: Path, path: Path, draws: int
) -> dict[str, Any] | None:
    """A new pool, or None where ``path`` holds one already."""
    return None if path.exists() else build_pool(task, seed, s, tmp)


def _redraw_step(
    task: str, seed: int, s: q.Settings, tmp: Path, path: Path, draws: int
) -> dict[str, Any] | None:
    """The pool at ``path`` with its re-draws, or None where it has them already."""
    pool = json.loads(path.read_text())
    if "redraws" in pool:
        return None
    redraw(task, seed, s, tmp, pool, draws)
    return pool


def main(argv: list[str] | None = None) -> Path | None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["build", "replay", "redraw"])
    p.add_argument("--draws", type=int, default=2, help="redraw: other finetune seeds per plan")
    p.add_argument("--tasks", default="digits")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budgets", default="6,12")
    p.add_argument("--pools", type=Path, default=POOLS)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    budgets = tuple(int(b) for b in args.budgets.split(","))
    tasks = args.tasks.split(",")
    args.pools.mkdir(parents=True, exist_ok=True)
    if args.what != "replay":
        step = _build_step if args.what == "build" else _redraw_step
        s = q.Settings(tuple(tasks), tuple(range(args.seeds)), budgets, 1)
        for task in tasks:
            for seed in range(args.seeds):
                path = args.pools / f"{task}-{seed}.json"
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    pool = step(task, seed, s, Path(tmp), path, args.draws)
                if pool is not None:
                    path.write_text(json.dumps(pool))
                    print(f"selection: {path} ({args.what}) in {time.perf_counter() - t0:.0f} s")
        return None
    sections = []
    for task in tasks:
        pools = [
            json.loads((args.pools / f"{task}-{s}.json").read_text()) for s in range(args.seeds)
        ]
        rows = replay_rows(pools, next_pick, budgets)
        sections.append(f"**{task}**, {len(pools)} pools\n\n" + table(rows, list(rows[0])))
    body = (
        "## Selection replay\n\n"
        "The search's pick rule (`next_pick`) replayed on pools where every screened candidate "
        "was finetuned (`python -m benchmarks.selection build`), concurrency 2, at each budget of "
        "finetuned trials; hypervolume as in the quality benchmark (latencies re-timed side by "
        "side, paired against the base). 'replayed rule': on the latencies the search bins by "
        "(screen timings denoised on the fitted cost model, `denoised_latencies`); 'on raw "
        "screen latencies': the same rule on the screen timings as measured. 'default arm (real "
        "run)': the product's own run that made the pool. Ceiling: the best front any `budget` "
        "candidates of the pool make (greedy). 'Perfect proxy, bins': the rule with every "
        "candidate's proxy replaced by its finetuned accuracy. 'Ceiling re-drawn': the ceiling's "
        "picks scored on the mean of other finetunes of the same plans (`redraw`, other seeds), "
        "so a lucky finetune no rule could foresee is taken out; 'finetune sd': the median "
        "standard deviation of a re-drawn plan's finetuned accuracy. Cells: medians over the "
        "pools; ratios of medians against the better of the uniform sweep and TP global pruning "
        "per pool.\n\n" + "\n\n".join(sections)
    )
    print(body)
    return write_section("selection", body, args.out)


if __name__ == "__main__":
    main()
