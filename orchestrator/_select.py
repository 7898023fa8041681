"""Selection: which screened candidates get finetuned, one latency bin at a time.

``ScreenedStudy`` is the search's study as the finetune loop sees it: each ask enqueues
``next_pick``, the proxy-best open candidate of the emptiest latency bin (above the cut where
the floor gave way). ``proxy_quality`` says afterwards how well the proxy ranked finetuned
accuracy.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search_space import Profile, PruningPlan, fit_costs


@dataclass(frozen=True)
class Candidate:
    """A screened candidate: its parameters in the space, its plan, its proxy score and latency."""

    number: int
    params: dict[str, Any]
    plan: dict[str, Any]
    proxy: float
    latency_ms: float
    proxy_se: float = 0.0  # the proxy's standard error (across the scoring slice's batches)
    uniform: bool = False  # one ratio for every group: the baseline recipe
    measured_ms: float | None = None  # the screen's own timing, when latency_ms is denoised

    # Worked out once per candidate, not on every pick (a pick scans every open candidate).
    @cached_property
    def key(self) -> str:
        return plan_key(self.plan)

    @cached_property
    def prunes_nothing(self) -> bool:
        return _prunes_nothing(self.plan)


class ScreenedStudy:
    """The finetune loop's ``ask`` when a screen ran: each ask first enqueues the next screened
    pick into the search's study (once no other enqueued trial waits: warm-start and sensitivity
    seeds go first), then asks the study. When no candidate is left, the study's own sampler
    takes over. Only ``ask``: everything else goes to the study itself."""

    def __init__(
        self,
        study: optuna.Study,
        screened: Sequence[Candidate],
        floor: float,
        budget: int,
        base_latency_ms: float | None = None,
    ) -> None:
        self._study, self._candidates, self._floor, self._budget = (
            study,
            list(screened),
            floor,
            budget,
        )
        self._slowest = base_latency_ms

    def ask(self, *args: Any, **kwargs: Any) -> optuna.Trial:
        if not self._study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            pick = next_pick(
                self._candidates,
                self._study.get_trials(deepcopy=False),
                self._floor,
                self._budget,
                self._slowest,
            )
            if pick is not None:
                attrs = {
                    "plan": pick.plan,
                    "screen": {
                        "number": pick.number,
                        "proxy": pick.proxy,
                        "latency_ms": pick.latency_ms,
                        "measured_ms": pick.measured_ms,
                    },
                }
                self._study.enqueue_trial(pick.params, user_attrs=attrs)
        return self._study.ask(*args, **kwargs)


def next_pick(
    screened: Sequence[Candidate],
    trials: Sequence[FrozenTrial],
    floor: float,
    bins: int,
    slowest: float | None = None,
) -> Candidate | None:
    """The next candidate to finetune: the proxy-best of the latency bin holding fewest picks
    (spread out: see below), among the candidates still open (``open_candidates``). Screen
    latencies throughout, so both sides were timed alike.

    The bins span the open candidates' latencies up to ``slowest`` (the base model's): a
    candidate timed slower than that (a noisy short measurement) falls in the last bin instead
    of stretching every bin; they hold no candidate another outclasses (``outclassed``), and
    they start above the cut (``above_the_cut``) while any candidate is left there."""
    picked = [t for t in trials if "screen" in t.user_attrs]
    beaten = outclassed(screened)
    pool = [c for c in open_candidates(screened, picked, floor) if c.number not in beaten]
    pool = above_the_cut(pool, picked, floor)
    if not pool:
        return None
    lo, hi = min(c.latency_ms for c in pool), max(c.latency_ms for c in pool)
    if slowest is not None and lo < slowest:
        hi = min(hi, slowest)
    width = (hi - lo) / max(1, bins) or 1.0

    def bin_of(latency: float) -> int:
        return min(bins - 1, max(0, int((latency - lo) / width)))

    load = [0] * max(1, bins)
    for t in picked:
        lat = float(t.user_attrs["screen"]["latency_ms"])
        if lat >= lo:
            load[bin_of(lat)] += 1
    members: dict[int, list[Candidate]] = {}
    for c in pool:
        members.setdefault(bin_of(c.latency_ms), []).append(c)
    least = min(load[b] for b in members)
    # Among the least-picked bins, the one farthest from every picked bin and from both ends of the
    # range: the first pick is the middle, then the gaps are halved, so any prefix of the picks
    # spans the range, as a uniform sweep's would. Not the fastest first: the fastest candidates
    # are the likeliest to finetune under the floor, and each that does only moves the range up.
    occupied = [b for b in range(len(load)) if load[b] > least] + [-1, bins]
    chosen = max(
        (b for b in members if load[b] == least),
        key=lambda b: (min(abs(b - o) for o in occupied), -b),
    )
    return _best_of_bin(members[chosen])


def open_candidates(
    screened: Sequence[Candidate], picked: Sequence[FrozenTrial], floor: float
) -> list[Candidate]:
    """The candidates a pick may still take: not picked, not the plan of a pick (the same plan
    sampled twice), not a plan that prunes nothing (the base model, already the reference), and
    not ruled out by a pick that finetuned under ``floor``: such a pick rules out every candidate
    at least as fast *and* no better on the proxy. Not every faster one: plans that spread the
    same saving differently can finetune far apart, and the proxy is what tells them apart."""
    by_number = {c.number: c for c in screened}
    taken = {int(t.user_attrs["screen"]["number"]) for t in picked}
    plans = {by_number[n].key for n in taken if n in by_number}
    failed = [
        (float(t.user_attrs["screen"]["latency_ms"]), float(t.user_attrs["screen"]["proxy"]))
        for t in picked
        if t.state == TrialState.COMPLETE and t.values and t.values[0] < floor
    ]
    return [
        c
        for c in screened
        if c.number not in taken
        and c.key not in plans
        and not c.prunes_nothing
        and not any(c.latency_ms <= lat and c.proxy <= proxy for lat, proxy in failed)
    ]


def outclassed(screened: Sequence[Candidate]) -> set[int]:
    """The candidates (numbers) some other candidate beats on both counts: at least as fast,
    and ahead on the proxy by more than both proxies' standard errors together.

    Why: a bin is otherwise funded whatever is in it, and where a screen's sampler left only
    poor plans (on colour_shapes the slowest bins held mostly ``round_to: 8`` plans, whose
    rounding costs accuracy and saves little time) its proxy-best was finetuned and landed
    behind a faster pick (2 of 12 picks on one seed). A lead within the noise is no evidence, so
    such a candidate stays open."""
    order = sorted(screened, key=lambda c: (c.latency_ms, -c.proxy))
    beaten, best = set(), -math.inf  # best: the highest proxy - se among faster candidates
    for c in order:
        if best > c.proxy + c.proxy_se:
            beaten.add(c.number)
        best = max(best, c.proxy - c.proxy_se)
    return beaten


def above_the_cut(
    pool: Sequence[Candidate], picked: Sequence[FrozenTrial], floor: float
) -> list[Candidate]:
    """``pool`` without the candidates as fast as a pick that finetuned under ``floor`` and was
    faster than every pick that held it (the cut), unless no other candidate is left.

    Why: a model under the floor adds nothing to the front's hypervolume, and the fast end of
    a screen is where they are (on colour_shapes, 4 of 12 picks spread evenly over the range
    finetuned to 0.34-0.80 against a floor of 0.84, all faster than every pick that held it).
    Once a pick shows where the floor gives way, the bins re-span the range above it, so the
    budget goes where models count. Only a failure faster than every success cuts: one plan
    that finetuned badly in the middle of the range says little about its neighbours."""
    told = [
        (float(t.user_attrs["screen"]["latency_ms"]), t.values[0])
        for t in picked
        if t.state == TrialState.COMPLETE and t.values
    ]
    held = min((lat for lat, acc in told if acc >= floor), default=math.inf)
    failed = [lat for lat, acc in told if acc < floor and lat < held]
    if not failed:
        return list(pool)
    above = [c for c in pool if c.latency_ms > max(failed)]
    return above or list(pool)


# How far (robust standard deviations of the residuals) a screen timing may stray from the cost
# model before it is clipped. See ``denoised_latencies``.
STRAY = 0.5


def denoised_latencies(
    plans: Sequence[dict[str, Any]], measured: Sequence[float], profile: Profile | None
) -> list[float]:
    """Each screened plan's latency for selection: its screen timing, held within ``STRAY``
    robust standard deviations of the cost model (``fit_costs``) fitted to every screen timing.

    Why: a screen times each candidate briefly, and a few timings land far off (on digits,
    Kendall tau 0.77-0.87 with the candidates re-timed side by side; 10 % of them more than 10 %
    off), which puts them in the wrong latency bin. The cost model, fitted to all of them, ranks
    better (0.87-0.89) but has errors of its own: a plan's timing is kept where it agrees with
    the model, and pulled to the model's band where it does not. Replayed on fully finetuned
    digits pools (``benchmarks/selection.py``), bins on these latencies gave a higher
    hypervolume than on the raw timings (RESULTS.md). The timings as measured without a
    profile (no cost model), with fewer than 8 plans, or when the model predicts no time."""
    if profile is None or len(plans) < 8:
        return list(measured)
    ratios = [
        PruningPlan.from_dict(p).applied_ratios(profile.channels, profile.splits) for p in plans
    ]
    model = fit_costs(profile, ratios, measured)
    predicted = [model.predict(r) for r in ratios]
    if min(predicted) <= 0 or min(measured) <= 0:
        return list(measured)
    residual = [math.log(m / p) for m, p in zip(measured, predicted, strict=True)]
    centre = statistics.median(residual)
    sigma = 1.4826 * statistics.median(abs(r - centre) for r in residual)
    lo, hi = centre - STRAY * sigma, centre + STRAY * sigma
    return [p * math.exp(min(max(r, lo), hi)) for p, r in zip(predicted, residual, strict=True)]


def plan_key(plan: dict[str, Any]) -> str:
    return json.dumps(plan, sort_keys=True, default=str)


def _prunes_nothing(plan: dict[str, Any]) -> bool:
    try:
        parsed = PruningPlan.from_dict(plan)
    except (KeyError, TypeError, ValueError):  # not a plan this version reads: judge it by trial
        return False
    return not parsed.drop and not any(r > 0 for r in parsed.group_ratios().values())


def _best_of_bin(members: Sequence[Candidate]) -> Candidate:
    """The proxy-best candidate, unless it leads the bin's best uniform plan by no more than the
    noise of the two proxies (their standard errors combined): then the uniform plan. The
    allocator's plans outnumber the uniform ones, so the best of them wins the noise more often
    than not; a lead that noise could explain is not evidence against the known recipe."""

    def rank(c: Candidate) -> tuple[float, float, int]:
        return (c.proxy, -c.latency_ms, -c.number)

    best = max(members, key=rank)
    uniform = [c for c in members if c.uniform]
    if best.uniform or not uniform:
        return best
    prior = max(uniform, key=rank)
    noise = math.hypot(best.proxy_se, prior.proxy_se)
    return best if best.proxy - prior.proxy > noise else prior


def proxy_quality(trials: Sequence[FrozenTrial]) -> dict[str, float]:
    """Kendall tau and Spearman rho between the proxy and finetuned accuracy over the finetuned
    picks (empty with fewer than 3, or when either side does not vary)."""
    from scipy.stats import kendalltau, spearmanr

    pairs = [
        (float(t.user_attrs["screen"]["proxy"]), t.values[0])
        for t in trials
        if "screen" in t.user_attrs and t.state == TrialState.COMPLETE and t.values
    ]
    if len(pairs) < 3 or len({p for p, _ in pairs}) < 2 or len({a for _, a in pairs}) < 2:
        return {}
    proxy, acc = zip(*pairs, strict=True)
    tau, rho = kendalltau(proxy, acc).statistic, spearmanr(proxy, acc).statistic
    return {
        "proxy_kendall_tau": round(float(tau), 4),
        "proxy_spearman": round(float(rho), 4),
        "proxy_pairs": float(len(pairs)),
    }
