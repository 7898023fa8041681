"""Screening: hundreds of candidates ranked cheaply (fidelity 0), in a study of their own.

1. ``group_profile``: the allocator's table (per-group importance and cost), a Ray task.
2. ``run_screen``: a study of its own (``<name>.screen``, in the search's storage, so a resumed
   search screens nothing twice) samples candidates on (proxy score, latency), where a sampler
   has hundreds of points to learn from; Ray tasks screen them in batches. Halfway, the groups'
   latency costs are refitted to what the target measured.
Selection (which candidates get finetuned) is ``_select``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
import ray
from optuna.trial import FrozenTrial, TrialState

from search_space import Profile, PruningPlan, fit_costs, suggest_plan
from workers import SCREEN_STAGES, ScreenResult, TrialStatus, steps

from ._sampler import OneReadTPESampler
from ._select import Candidate, denoised_latencies, plan_key
from ._study import fail_orphans
from ._table import ATTR as TABLE_ATTR
from ._table import batch_results, damage_profile, table_timings

Progress = Callable[[str], None]
SUFFIX = ".screen"  # the screening study's name: the search's name and this


@dataclass
class ScreenOutcome:
    candidates: list[Candidate]
    profile: Profile | None  # refitted to measured latencies when enough were measured
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class ScreenSetup:
    """What a screen needs from the search, as plain values and callables."""

    config: Any  # orchestrator Config
    study: optuna.Study  # the search's study: the screen's lives beside it
    space: Any  # SearchSpace
    discovery: Any
    profile: Profile | None
    job: dict[str, Any]  # the batch's common fields (task, seed, target, ...); candidates added
    submit: Callable[[dict[str, Any]], ray.ObjectRef]
    progress: Progress
    # What a candidate gets before it is scored, in words (workers.adapting): the first line says it.
    adapting: str = "re-estimate BatchNorm"


def group_profile(
    remote_profile: Any, job: dict[str, Any], base_ref: Any, discovery: Any
) -> Profile:
    return Profile.from_dict(ray.get(remote_profile.remote(job, base_ref, discovery)))


def screen_study(config: Any, study: optuna.Study) -> optuna.Study:
    n = config.search.screen.candidates
    sampler = OneReadTPESampler(
        seed=config.search.seed, constant_liar=True, n_startup_trials=max(10, n // 8)
    )
    return optuna.create_study(
        study_name=config.name + SUFFIX,
        storage=study._storage,
        sampler=sampler,
        directions=["maximize", "minimize"],
        load_if_exists=True,
    )


def run_screen(s: ScreenSetup) -> ScreenOutcome:
    """Screen until ``search.screen.candidates`` have finished (across resumes)."""
    cfg = s.config.search.screen
    sstudy = screen_study(s.config, s.study)
    fail_orphans(sstudy)
    if s.profile is not None and cfg.table:
        s = dataclasses.replace(s, profile=damage_profile(sstudy, s))
    seed_uniform(sstudy, s.space, cfg.candidates, s.config.search.trials)
    profile = _refit(s.profile, sstudy, cfg.candidates)
    left = cfg.candidates - len(_finished(sstudy))
    if left > 0:
        s.progress(
            f"screening {left} candidate(s): prune, {s.adapting}, score on training data, time"
        )
    t0 = time.monotonic()
    if left > 0:
        profile = _screen_batches(s, sstudy, profile, left)
    stats = _stats(sstudy) | {"screen_wall_s": round(time.monotonic() - t0, 2)}
    s.study.set_user_attr("screen", stats)  # the screen's cost, beside the study it fed
    return ScreenOutcome(candidates(sstudy, s.profile), profile, stats)


def _screen_batches(
    s: ScreenSetup, sstudy: optuna.Study, profile: Profile | None, left: int
) -> Profile | None:
    """Ask, screen in Ray batches and tell until ``left`` more have finished; returns the cost
    model, refitted once half the candidates are timed. A bar on a terminal, a line per batch
    elsewhere."""
    cfg, t0, in_flight, plans = s.config.search.screen, time.monotonic(), {}, _Plans(sstudy)
    share = _UniformShare(sstudy, s)
    shown = len(_finished(sstudy))
    with steps(cfg.candidates, "screening", "candidate") as advance:
        if shown:  # a resumed screen: the bar starts where it stopped
            advance(n=shown)
        while left > 0 or in_flight:
            while left > 0 and len(in_flight) < _concurrency(s.config):
                k = min(cfg.batch, left)
                fresh = [
                    (t, c)
                    for t in (share.ask() for _ in range(k))
                    if plans.route(t, c := _candidate(t, s, profile))
                ]
                if fresh:
                    cands = [c for _, c in fresh]
                    timed = _to_time(cands, cfg.time_share, _predicts(s, profile))
                    in_flight[s.submit(s.job | {"candidates": cands, "timed": timed})] = [
                        t for t, _ in fresh
                    ]
                left -= k
            if in_flight:
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    trials = in_flight.pop(ref)
                    for t, r in zip(
                        trials, batch_results(ref, [t.number for t in trials]), strict=True
                    ):
                        _tell(sstudy, t, r, profile if _predicts(s, profile) else None)
                        plans.settle(t)
            finished = len(_finished(sstudy))
            if finished > shown:
                advance(f"{time.monotonic() - t0:.0f} s", n=finished - shown)
                shown = finished
            if s.profile is not None and profile is s.profile:
                profile = _refit(s.profile, sstudy, cfg.candidates)
    return profile


def seed_uniform(sstudy: optuna.Study, space: Any, candidates: int, trials: int) -> list[float]:
    """A new screen starts with the uniform sweep itself: blend 0 at as many levels as there are
    finetuned trials (so as many latency bins), spread over the ratio range (criterion and
    rounding sampled), so that every bin can hold a uniform plan for selection to weigh the
    allocator's plans against. At most a third of the candidates. Returns the levels enqueued
    (none on a resumed screen, or when blend 0 is outside the space)."""
    if sstudy.trials or not _holds_uniform(space):
        return []
    low, high = space.ratio
    k = min(max(2, trials, candidates // 12), max(2, candidates // 3))
    steps = round((high - low) / space.step)
    levels = sorted({low + space.step * round(steps * (i + 1) / (k + 1)) for i in range(k)})
    params = {"alloc/blend": 0.0} if space.blend[1] > 0.0 else {}
    for level in levels:
        sstudy.enqueue_trial(
            {"alloc/level": round(level, 6), **params}, user_attrs={"seed": "uniform"}
        )
    return levels


def _predicts(s: ScreenSetup, profile: Profile | None) -> bool:
    """The cost model has been refitted to measured milliseconds: it can stand in for a timing."""
    return profile is not None and profile is not s.profile and profile.unit == "ms"


def _to_time(cands: list[dict[str, Any]], share: float, predicts: bool) -> list[int] | None:
    """Which of a batch's candidates are timed (None: every one): all until the cost model is
    refitted; then every one that drops a block, and ``share`` of the others, by number (every
    1/share-th: the same on a resume). Why blocks: fitted on half of 40 plans, the cost model
    ranked the other half's channel-only plans about as well as their short timings did
    (Kendall tau 0.98, 1.00, 0.91 against 0.91, 0.88, 0.93 on digits, shifted_digits,
    colour_shapes), plans that drop blocks worse (0.97 against 0.99, 0.81 against 0.92;
    RESULTS.md, cost-model)."""
    if not predicts or share >= 1.0:
        return None
    return [
        n
        for n, c in ((int(c["number"]), c) for c in cands)
        if c["plan"].get("drop") or math.floor((n + 1) * share) > math.floor(n * share)
    ]


PREDICTED = "predicted"  # a candidate's latency from the cost model (search.screen.time_share)


def _predicted(t: FrozenTrial | optuna.Trial) -> bool:
    return bool(t.user_attrs.get("timing", {}).get(PREDICTED))


class _UniformShare:
    """Asks the screen's next candidate, held to the uniform plan (blend 0 enqueued, the rest
    sampled) while uniform plans are fewer than ``search.screen.uniform_share`` of the screen.
    Counted over the whole study once, so a resumed screen keeps the share, then as it asks
    (reading every trial back per ask would cost a screen of n candidates n^2 trial reads)."""

    def __init__(self, sstudy: optuna.Study, s: ScreenSetup) -> None:
        cfg, space = s.config.search.screen, s.space
        # blend [0, 0]: every plan is uniform already, nothing to hold
        self._share = cfg.uniform_share if _holds_uniform(space) and space.blend[1] > 0.0 else 0.0
        allocation = space.granularity == "allocation"
        self._shares = {
            PER_LAYER: cfg.layer_share if allocation else 0.0,
            SUBSET: cfg.subset_share if allocation else 0.0,
        }
        trials = sstudy.get_trials(deepcopy=False)  # waiting seeds count: they will be screened
        self._study, self._n = sstudy, len(trials)
        self._uniform = sum(1 for t in trials if t.user_attrs.get("seed") in _UNIFORM_TAGS)
        self._counts = {
            f: sum(1 for t in trials if t.user_attrs.get(FAMILY) == f) for f in self._shares
        }

    def ask(self) -> optuna.Trial:
        sstudy = self._study
        if self._share > 0 and self._uniform < self._share * (self._n + 1):
            sstudy.enqueue_trial({"alloc/blend": 0.0}, user_attrs={"seed": "uniform-sampled"})
            self._n, self._uniform = self._n + 1, self._uniform + 1
        t = sstudy.ask()  # a waiting trial (counted already) or a new one, numbered last
        self._n = max(self._n, t.number + 1)
        if "seed" in t.user_attrs:
            return t
        for family, share in self._shares.items():
            if self._counts[family] < share * self._n:
                t.set_user_attr(FAMILY, family)  # read by _candidate, and on resume
                self._counts[family] += 1
                break
        return t


_UNIFORM_TAGS = ("uniform", "uniform-sampled")  # seeded levels; levels the sampler chose
# A candidate's family: of search.screen.layer_share, of search.screen.subset_share.
FAMILY, PER_LAYER, SUBSET = "family", "layer", "subset"


def _holds_uniform(space: Any) -> bool:
    """The uniform plan (blend 0) lies in ``space``'s allocation: the screen can seed and hold it."""
    return space.granularity == "allocation" and space.blend[0] == 0.0


def _concurrency(config: Any) -> int:
    want = config.search.concurrency
    return (
        max(1, int(ray.available_resources().get("CPU", 1) // config.resources.num_cpus))
        if want == "auto"
        else int(want)
    )


def _candidate(t: optuna.Trial, s: ScreenSetup, profile: Profile | None) -> dict[str, Any]:
    family = t.user_attrs.get(FAMILY)
    plan = suggest_plan(
        t, s.space, s.discovery, profile, per_layer=family == PER_LAYER, subset=family == SUBSET
    )
    t.set_user_attr("plan", plan.to_dict())
    return {"number": t.number, "plan": plan.to_dict()}


class _Plans:
    """Each plan screened or being screened, so that none is screened twice. A sampler of
    discrete levels asks for the same plan again now and then: that trial is told the first
    screening's result (its sampler learns what a rerun would teach it, at no cost), at once or
    when the first comes back."""

    def __init__(self, sstudy: optuna.Study) -> None:
        self._study = sstudy
        self._done: dict[str, FrozenTrial] = {}
        self._waiting: dict[str, list[optuna.Trial]] = {}  # plan in flight -> its copies
        self._told: dict[str, int] = {}  # plan told this run -> its trial's number, not yet read
        for t in sstudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            self._done.setdefault(plan_key(t.user_attrs["plan"]), t)

    def route(self, t: optuna.Trial, cand: dict[str, Any]) -> bool:
        """True: ``t``'s plan is new, screen it. False: a copy, told now or when its first is."""
        key = plan_key(cand["plan"])
        if key in self._told:
            self._read(key, self._told.pop(key))
        if key in self._done:
            self._copy(t, self._done[key])
        elif key in self._waiting:
            self._waiting[key].append(t)
        else:
            self._waiting[key] = []
            return True
        return False

    def settle(self, first: optuna.Trial) -> None:
        """``first`` has been told: tell its copies the same. The told trial is read back only
        when a copy waits for it, or when a later copy asks (a read of the study per tell cost
        the driver ~14 ms a candidate on SQLite)."""
        key = plan_key(first.user_attrs["plan"])
        copies = self._waiting.pop(key, [])
        if not copies:
            self._told[key] = first.number
            return
        told = self._read(key, first.number)
        for t in copies:
            self._copy(t, told)

    def _read(self, key: str, number: int) -> FrozenTrial:
        told = self._study.get_trials(deepcopy=False)[number]
        if told.state == TrialState.COMPLETE:
            self._done[key] = told
        return told

    def _copy(self, t: optuna.Trial, first: FrozenTrial) -> None:
        for key in ("signature", "params", "proxy_se", "score", "reason"):
            if key in first.user_attrs:
                t.set_user_attr(key, first.user_attrs[key])
        t.set_user_attr("seconds", 0.0)
        t.set_user_attr("duplicate_of", first.number)
        if first.state == TrialState.COMPLETE:
            self._study.tell(t, list(first.values))
        else:  # the same plan fails the same way
            self._study.tell(t, state=TrialState.FAIL)


def _tell(
    sstudy: optuna.Study, t: optuna.Trial, r: ScreenResult, model: Profile | None = None
) -> None:
    """Tell ``t`` its screen result; an untimed candidate takes ``model``'s latency."""
    t.set_user_attr("seconds", r.seconds)
    t.set_user_attr("stages", r.stages)
    if r.status == TrialStatus.COMPLETE and r.latency is None and model is not None:
        ms = model.predict(_ratios(t.user_attrs["plan"], model))
        r = dataclasses.replace(r, latency={"median_ms": ms, PREDICTED: True})
    if r.status != TrialStatus.COMPLETE or r.latency is None or r.proxy is None:
        t.set_user_attr("reason", r.reason or "no latency")
        sstudy.tell(t, state=TrialState.FAIL)
        return
    t.set_user_attr("signature", r.signature)
    t.set_user_attr("params", r.params)
    t.set_user_attr("proxy_se", r.proxy_se or 0.0)
    t.set_user_attr("score", r.score)
    t.set_user_attr("refit", r.refit)  # scored through the re-solved output layer (refit_head)
    # The timing's own figures, on record: how a candidate's screen latency came about.
    t.set_user_attr(
        "timing", {k: r.latency.get(k) for k in _TIMING_KEYS if r.latency.get(k) is not None}
    )
    sstudy.tell(t, [float(r.proxy), float(r.latency["median_ms"])])


_TIMING_KEYS = (
    PREDICTED,
    "ratio",
    "ratio_spread",
    "pairs",
    "reference_ms",
    "raw_median_ms",
    "drift",
    "cached",
)


_STAGE_WORDS = {"prune": "pruning", "adapt": "adapting", "score": "scoring", "time": "timing"}


def stage_shares(stats: dict[str, float]) -> str:
    """'pruning 28 %, adapting 16 %, ...': the screen's time by stage, as the progress line says
    it (what to cut when a screen is too slow: timing -> a looser ``precision`` on the target;
    adapting (BatchNorm re-estimated, and a short finetune, ``steps``, where there is one) and
    scoring -> ``bn_batches``/``score_batches``/``steps``)."""
    seconds = {k: float(stats.get(f"screen_{k}_s", 0.0)) for k in SCREEN_STAGES}
    total = sum(seconds.values())
    if total <= 0:
        return "no stage timed"
    return ", ".join(f"{_STAGE_WORDS[k]} {100 * v / total:.0f} %" for k, v in seconds.items())


def _finished(sstudy: optuna.Study) -> list[FrozenTrial]:
    states = (TrialState.COMPLETE, TrialState.FAIL)
    return [
        t
        for t in sstudy.get_trials(deepcopy=False, states=states)
        if not str(t.user_attrs.get("reason", "")).startswith("orphaned")
    ]


def candidates(sstudy: optuna.Study, profile: Profile | None = None) -> list[Candidate]:
    """The screened candidates, their latencies denoised on ``profile``'s cost model (fitted to
    the distinct plans' timings: a plan told twice counts once); an untimed candidate's is that
    model's prediction, fitted to every timing."""
    done = sstudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    firsts = [t for t in done if "duplicate_of" not in t.user_attrs]
    timed = [t for t in firsts if not _predicted(t)]
    plans = [t.user_attrs["plan"] for t in timed]
    measured = [t.values[1] for t in timed]
    denoised = dict(
        zip(
            (plan_key(p) for p in plans),
            denoised_latencies(plans, measured, profile),
            strict=True,
        )
    )
    guessed = [t.user_attrs["plan"] for t in firsts if _predicted(t)]
    if guessed and profile is not None:
        model = fit_costs(profile, [_ratios(p, profile) for p in plans], measured)
        if model.unit == "ms":  # refitted: else keep the latencies they were told
            denoised |= {plan_key(p): model.predict(_ratios(p, profile)) for p in guessed}
    return [
        Candidate(
            t.number,
            dict(t.params),
            t.user_attrs["plan"],
            t.values[0],
            denoised.get(plan_key(t.user_attrs["plan"]), t.values[1]),
            float(t.user_attrs.get("proxy_se") or 0.0),
            is_uniform(t.user_attrs["plan"]),
            measured_ms=t.values[1],
        )
        for t in done
    ]


def is_uniform(plan: dict[str, Any]) -> bool:
    """One ratio for every group, pruned group by group (Torch-Pruning's default recipe),
    whatever the space that sampled it."""
    p = PruningPlan.from_dict(plan)
    return not p.global_pruning and not p.drop and len(set(p.group_ratios().values())) <= 1


def _ratios(plan: dict[str, Any], profile: Profile) -> dict[str, float]:
    return PruningPlan.from_dict(plan).applied_ratios(profile.channels, profile.splits)


def _refit(profile: Profile | None, sstudy: optuna.Study, total: int) -> Profile | None:
    """Once half the candidates are timed, the groups' costs become milliseconds fitted to them
    (from the first half only, so a resumed search refits to the same numbers)."""
    done = sorted(
        (
            t
            for t in sstudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not _predicted(t)
        ),
        key=lambda t: t.number,
    )
    if profile is None or len(done) < max(2, total // 2):
        return profile
    first = done[: max(2, total // 2)]
    plans = [_ratios(t.user_attrs["plan"], profile) for t in first]
    more_plans, more_ms = table_timings(sstudy.user_attrs.get(TABLE_ATTR))
    return fit_costs(profile, plans + more_plans, [t.values[1] for t in first] + more_ms)


def _stats(sstudy: optuna.Study) -> dict[str, float]:
    done = _finished(sstudy)
    ok = [t for t in done if t.state == TrialState.COMPLETE]
    copies = [t for t in done if "duplicate_of" in t.user_attrs]  # told, not screened again
    table = sstudy.user_attrs.get(TABLE_ATTR) or {}
    in_table = len(table.get("points", [])) + int(table.get("failed", 0))
    cpu = sum(float(t.user_attrs.get("seconds") or 0.0) for t in done)
    cpu += float(table.get("seconds", 0.0))  # the damage table is screening too: its cost counts
    screened = len(done) - len(copies) + in_table
    stages = {
        f"screen_{stage}_s": round(
            sum(t.user_attrs.get("stages", {}).get(stage, 0.0) for t in done), 3
        )
        for stage in SCREEN_STAGES
    }
    return stages | {
        "screen_candidates": float(len(ok)),
        "screen_failed": float(len(done) - len(ok)),
        "screen_duplicates": float(len(copies)),
        "screen_table": float(in_table),
        # untimed: their latency the cost model's (search.screen.time_share)
        "screen_predicted": float(sum(1 for t in ok if _predicted(t))),
        # scored through the re-solved output layer (0 with refit_head on: the model has none)
        "screen_refit": float(sum(1 for t in ok if t.user_attrs.get("refit"))),
        "screen_cpu_s": round(cpu, 3),
        "screen_s_per_candidate": round(cpu / screened, 4) if screened else 0.0,
    }
