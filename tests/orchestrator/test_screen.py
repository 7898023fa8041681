"""The default search: a screen of many candidates, then the proxy-best of each latency bin finetuned."""

from __future__ import annotations

import dataclasses
import logging

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from orchestrator import (
    Candidate,
    ConfigError,
    config_from_dict,
    denoised_latencies,
    next_pick,
    plan_key,
    prepare,
    proxy_quality,
    run_search,
    screen_target,
    table_ratios,
)
from search_space import Profile, PruningPlan
from workers import Target

from ..e2e.helpers import quick_config, runs_of


def _cand(number: int, latency: float, proxy: float) -> Candidate:
    return Candidate(number, {"alloc/level": 0.1}, {"n": number}, proxy, latency)


def _picked(cand: Candidate, accuracy: float | None) -> optuna.trial.FrozenTrial:
    attrs = {"screen": {"number": cand.number, "proxy": cand.proxy, "latency_ms": cand.latency_ms}}
    if accuracy is None:  # asked, still running
        return create_trial(state=TrialState.RUNNING, user_attrs=attrs)
    return create_trial(
        values=[accuracy, cand.latency_ms],
        user_attrs=attrs,
        params={"x": 0.0},
        distributions={"x": FloatDistribution(0, 1)},
    )


def _grid() -> list[Candidate]:
    # Latencies 1..10 ms, two candidates each; the faster candidates score lower on the proxy.
    return [
        _cand(2 * i + j, 1.0 + i, 0.5 + 0.04 * i + 0.01 * j) for i in range(10) for j in range(2)
    ]


def test_picks_spread_over_the_latency_range_middle_first_and_take_the_proxy_best_of_a_bin():
    grid, trials = _grid(), []
    for _ in range(4):
        pick = next_pick(grid, trials, floor=0.0, bins=4)
        trials.append(_picked(pick, None))
    lat = [t.user_attrs["screen"]["latency_ms"] for t in trials]
    # Bins of 2.25 ms over 1..10 ms: a middle bin first, then the far ones, every bin once.
    assert 3.25 <= lat[0] < 7.75 and len({int((x - 1) / 2.25) for x in lat}) == 4
    first = next_pick(grid, [], floor=0.0, bins=4)
    assert first.proxy == max(c.proxy for c in grid if c.latency_ms == first.latency_ms)


def test_a_pick_that_finetuned_under_the_floor_rules_out_everything_as_fast():
    grid = _grid()
    first = next_pick(grid, [], floor=0.9, bins=4)
    bad = _picked(first, accuracy=0.5)  # under the floor of 0.9
    nxt = next_pick(grid, [bad], floor=0.9, bins=4)
    assert nxt.latency_ms > first.latency_ms
    # A good result rules out nothing: the next pick is the farthest gap, not just slower ones.
    assert next_pick(grid, [_picked(first, 0.95)], floor=0.9, bins=4).number != first.number


def test_a_faster_candidate_the_proxy_ranks_higher_stays_open_after_a_pick_under_the_floor():
    slow_bad, fast_good, fast_bad = _cand(0, 5.0, 0.3), _cand(1, 4.0, 0.6), _cand(2, 3.0, 0.2)
    bad = _picked(slow_bad, accuracy=0.5)  # under the floor of 0.9
    rest = [next_pick([slow_bad, fast_good, fast_bad], [bad], floor=0.9, bins=2)]
    rest.append(next_pick([slow_bad, fast_good, fast_bad], [bad, _picked(rest[0], 0.95)], 0.9, 2))
    assert [c.number for c in rest if c is not None] == [1]  # fast_bad: faster and no better


def _plan(ratio: float, criterion: str = "l1") -> dict:
    return PruningPlan(
        ratios={"a": ratio, "b": ratio}, units={"a": ("a",), "b": ("b",)}, criterion=criterion
    ).to_dict()


def test_a_plan_sampled_twice_is_finetuned_once_and_the_unpruned_plan_never():
    same = [Candidate(n, {}, _plan(0.3), 0.5, 5.0) for n in (0, 1)]
    other = Candidate(2, {}, _plan(0.3, "l2"), 0.4, 4.5)  # faster: not outclassed
    base = Candidate(3, {}, _plan(0.0), 0.9, 9.0)
    pool, trials = [*same, other, base], []
    while (pick := next_pick(pool, trials, floor=0.0, bins=2)) is not None:
        trials.append(_picked(pick, 0.95))
    assert sorted(t.user_attrs["screen"]["number"] for t in trials) == [0, 2]


def test_a_bin_keeps_its_uniform_plan_unless_another_leads_it_by_more_than_the_noise():
    def cand(number: int, proxy: float, se: float, uniform: bool) -> Candidate:
        return Candidate(number, {}, {"n": number}, proxy, 5.0, se, uniform)

    prior = cand(0, -0.50, 0.02, True)
    within_noise = cand(1, -0.48, 0.02, False)  # leads by 0.02 < hypot(0.02, 0.02)
    clear_lead = cand(2, -0.40, 0.02, False)
    assert next_pick([prior, within_noise], [], floor=0.0, bins=1).number == 0
    assert next_pick([prior, within_noise, clear_lead], [], floor=0.0, bins=1).number == 2
    # No uniform plan in the bin: the proxy-best, as before.
    assert next_pick([within_noise, clear_lead], [], floor=0.0, bins=1).number == 2


def test_noisy_slow_candidates_do_not_stretch_the_bins():
    grid = [
        *_grid(),
        _cand(99, 50.0, 1.0),
    ]  # timed 5x slower than the base: a noisy short measurement
    picks, trials = [], []
    for _ in range(4):
        pick = next_pick(grid, trials, floor=0.0, bins=4, slowest=11.0)
        picks.append(pick.latency_ms)
        trials.append(_picked(pick, None))
    assert len({min(3, int((p - 1) / 2.5)) for p in picks}) == 4  # bins of 2.5 ms, not of 12


def test_screen_timings_far_off_the_cost_model_are_pulled_into_its_band_the_rest_kept():
    """Two groups of 100 channels whose layers cost 2 and 1 ms at full width: 12 plans timed
    with a few percent of noise each, one of them 40 % slow (a preempted screen timing). The
    slow one is pulled back to the band the others make around the model; the others barely
    move."""
    profile = Profile.from_dict(
        {
            "groups": {"a": [float(i) for i in range(100)], "b": [float(i) for i in range(100)]},
            "layers": [["la", 2.0, "a", None], ["lb", 1.0, "b", None]],
        }
    )
    plans = [
        PruningPlan(
            ratios={"a": 0.05 * i, "b": 0.07 * (11 - i)}, units={"a": ("a",), "b": ("b",)}
        ).to_dict()
        for i in range(12)
    ]
    truth = [2.0 * (1 - 0.05 * i) + 1.0 * (1 - 0.07 * (11 - i)) for i in range(12)]
    noise = [1.02, 0.98, 1.01, 0.99, 1.03, 0.97, 1.40, 1.0, 1.02, 0.98, 1.01, 0.99]
    measured = [t * n for t, n in zip(truth, noise, strict=True)]
    out = denoised_latencies(plans, measured, profile)
    assert abs(out[6] / truth[6] - 1) < 0.05 < abs(measured[6] / truth[6] - 1)  # 40 % -> < 5 %
    assert all(
        abs(o / m - 1) < 0.04 for i, (o, m) in enumerate(zip(out, measured, strict=True)) if i != 6
    )
    assert denoised_latencies(plans, measured, None) == measured  # no cost model: as timed
    assert denoised_latencies(plans[:7], measured[:7], profile) == measured[:7]  # too few to fit


def test_proxy_quality_needs_three_finetuned_picks():
    grid = _grid()
    assert proxy_quality([_picked(grid[0], 0.5), _picked(grid[5], 0.6)]) == {}
    q = proxy_quality([_picked(c, 0.5 + c.proxy / 10) for c in grid[:5]])
    assert q["proxy_kendall_tau"] == pytest.approx(1.0) and q["proxy_pairs"] == 5


def test_screen_config_is_validated_with_the_field_and_the_fix():
    assert config_from_dict({"name": "x"}).search.screen.candidates > 0  # on by default
    assert config_from_dict({"name": "x"}).search.space.granularity == "allocation"
    assert config_from_dict({"name": "x"}).search.screen.table is False  # measured level: off
    assert config_from_dict({"name": "x"}).search.screen.uniform_share == 0.5  # measured: half
    assert config_from_dict({"name": "x"}).search.screen.steps == "auto"  # by BatchNorm or not
    assert config_from_dict({"name": "x"}).search.screen.refit_head is True
    assert config_from_dict({"name": "x"}).search.screen.timing_rounds == 2
    bad_values = (
        {"candidates": -1},
        {"batch": 0},
        {"bn_batches": 1.5},
        {"score_batches": True},
        {"table": "yes"},
        {"uniform_share": 1.5},
        {"uniform_share": "half"},
        {"layer_share": -0.1},
        {"subset_share": 2},
        {"steps": -1},
        {"steps": 2.5},
        {"steps": "many"},
        {"refit_head": "yes"},
        {"refit_head": 1},
        {"timing_rounds": 0},
        {"timing_rounds": 2.5},
    )
    for bad in bad_values:
        with pytest.raises(ConfigError, match=f"search.screen.{next(iter(bad))}"):
            config_from_dict({"name": "x", "search": {"screen": bad}})
    with pytest.raises(ConfigError, match="uniform_share 0.75 . layer_share 0.5 .* more than 1"):
        config_from_dict(
            {"name": "x", "search": {"screen": {"uniform_share": 0.75, "layer_share": 0.5}}}
        )
    with pytest.raises(ConfigError, match="subset_share 0.3 is more than 1; lower one"):
        config_from_dict(
            {"name": "x", "search": {"screen": {"uniform_share": 0.75, "subset_share": 0.3}}}
        )
    with pytest.raises(
        ConfigError, match="search.screen.candidate: unknown key; did you mean .candidates."
    ):
        config_from_dict({"name": "x", "search": {"screen": {"candidate": 5}}})


@pytest.fixture(scope="module")
def screened(ray_cluster, tmp_path_factory):
    """The default search (allocation + screen) on digits, small: 12 candidates, 3 finetuned,
    with the damage table on."""
    tmp = tmp_path_factory.mktemp("screen")
    config = quick_config(
        tmp,
        search__trials=3,
        search__screen={"candidates": 12, "batch": 4, "table": True},
        search__space={"ratio": [0.3, 0.9]},  # high ratios: proxy scores below 1 that vary
    )
    lines: list[str] = []
    bar = _Collect()
    logger = logging.getLogger("prunesearch.progress")
    logger.addHandler(bar)
    level, logger.level = logger.level, logging.INFO
    try:
        outcome = run_search(prepare(config), progress=lines.append)
    finally:
        logger.removeHandler(bar)
        logger.setLevel(level)
    return config, outcome, lines + bar.lines


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_default_search_finetunes_screened_picks_exactly_as_screened(screened):
    config, outcome, lines = screened
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    screen = optuna.load_study(study_name=config.name + ".screen", storage=config.storage)
    assert len([t for t in screen.trials if t.state == TrialState.COMPLETE]) == 12
    by_number = {t.number: t for t in screen.trials}
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3
    for t in done:
        source = by_number[t.user_attrs["screen"]["number"]]
        assert PruningPlan.from_dict(t.user_attrs["plan"]) == PruningPlan.from_dict(
            source.user_attrs["plan"]
        )
        assert "alloc/level" in t.params and "alloc/blend" in t.params
    assert len({t.user_attrs["screen"]["number"] for t in done}) == 3  # three different candidates
    assert any(line.startswith("screened 12 candidates") for line in lines)
    # Not a terminal here: the screen's bar is a line per batch of 4 that came back.
    counts = [line.split(",")[0] for line in lines if line.startswith("screening: ")]
    assert counts[-1] == "screening: 12/12" and 1 < len(counts) <= 3
    assert any(line.startswith("proxy vs finetuned accuracy over 3 trials") for line in lines)
    stats = study.user_attrs["screen"]
    assert stats["screen_candidates"] == 12 and stats["screen_cpu_s"] > 0
    # Where the screen's time went, by stage: each measured, within the whole.
    staged = [stats[f"screen_{k}_s"] for k in ("prune", "adapt", "score", "time")]
    assert all(v > 0 for v in staged) and sum(staged) <= stats["screen_cpu_s"] + 1e-3
    (line,) = [line for line in lines if line.startswith("screened 12 candidates")]
    assert "pruning" in line and "timing" in line and "%" in line
    # search.screen.timing_rounds (2): the short timing's stop rule looks after 2 rounds, then
    # every 2, so some candidate is done before 6 (the time_share test below runs 6).
    pairs = [t.user_attrs["timing"]["pairs"] for t in screen.trials if "timing" in t.user_attrs]
    assert pairs and all(p >= 2 and p % 2 == 0 for p in pairs) and min(pairs) < 6


def test_the_allocator_first_measures_each_group_alone_and_counts_its_cost(screened):
    """The damage table: the unpruned model and each of digits' 9 groups alone, screened and
    timed before any allocated candidate, kept in the screen study, and counted in the screen's
    cost (it is screening work). 12 candidates afford one ratio per group (3 would be 28)."""
    config, _, lines = screened
    screen = optuna.load_study(study_name=config.name + ".screen", storage=config.storage)
    table = screen.user_attrs["damage_table"]
    assert table["failed"] == 0 and len(table["points"]) == 1 + 9 and table["seconds"] > 0
    (base,) = [p for p in table["points"] if p[1] == 0.0]
    assert {ratio for _, ratio, _, _ in table["points"]} == {0.0, 0.5}
    assert len({group for group, ratio, _, _ in table["points"] if ratio > 0}) == 9
    assert all(ms > 0 for _, _, _, ms in table["points"])
    # Half of a group pruned and BatchNorm re-estimated does not score better than the unpruned
    # model by more than the slice's noise, and some group's half costs the loss clearly (at
    # least triples it: scored through the re-solved output layer, what a group alone costs is
    # small on digits, whose training slice the base fits almost exactly).
    proxies = [proxy for _, ratio, proxy, _ in table["points"] if ratio > 0]
    assert max(proxies) <= base[2] + 0.05 and min(proxies) < 3 * base[2] < 0
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    assert study.user_attrs["screen"]["screen_table"] == 10
    # Every screened candidate was scored through the re-solved output layer (refit_head).
    stats = study.user_attrs["screen"]
    assert stats["screen_refit"] == stats["screen_candidates"] > 0
    assert any(
        line.startswith("damage table: each of 9 groups pruned alone at 0.5") for line in lines
    )


def test_the_damage_table_never_costs_more_screenings_than_the_candidates():
    assert table_ratios(9, 96) == (0.25, 0.5, 0.75)  # 28 screenings
    assert table_ratios(9, 27) == (0.5,)  # 28 > 27: the middle ratio, 10 screenings
    assert table_ratios(40, 96) == (0.5,)
    assert table_ratios(96, 96) == ()  # not even one ratio: no table, first-order importances


def test_a_new_screen_starts_with_the_uniform_sweep(screened):
    """Every latency bin can hold a uniform plan: selection finetunes the allocator's plan only
    where the proxy ranks it above uniform's (the space contains the baseline, and so does the
    screen)."""
    config, _, _ = screened
    screen = optuna.load_study(study_name=config.name + ".screen", storage=config.storage)
    seeds = [t for t in screen.trials if t.user_attrs.get("seed") == "uniform"]
    # As many levels as finetuned trials (3: as many latency bins), at most a third of the 12.
    assert len(seeds) == 3 and all(t.params["alloc/blend"] == 0.0 for t in seeds)
    levels = sorted(t.params["alloc/level"] for t in seeds)
    assert 0.3 < levels[0] < levels[1] < levels[2] < 0.9  # spread over the ratio range
    for t, level in zip(sorted(seeds, key=lambda t: t.params["alloc/level"]), levels, strict=True):
        assert set(t.user_attrs["plan"]["ratios"].values()) == {level}  # one ratio everywhere


def test_the_parent_run_records_the_screen_and_the_proxy_quality(screened):
    config, _, _ = screened
    parents, _ = runs_of(config)
    metrics = parents[0].data.metrics
    assert (
        metrics["screen_candidates"] == 12
        and "proxy_kendall_tau" in metrics
        and "screen_cpu_s" in metrics
    )


def test_a_resumed_search_screens_nothing_twice(screened, tmp_path):
    config, _, _ = screened
    more = dataclasses.replace(config, search=dataclasses.replace(config.search, trials=4))
    lines: list[str] = []
    run_search(prepare(more), progress=lines.append)
    screen = optuna.load_study(study_name=config.name + ".screen", storage=config.storage)
    assert len(screen.trials) == 12
    assert not any(line.startswith(("screening ", "damage table")) for line in lines)
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    picked = [t.user_attrs["screen"]["number"] for t in study.trials if "screen" in t.user_attrs]
    # The resume adds the fourth finetuned trial and picks no candidate twice. It is a screened
    # pick unless selection has none left (every other candidate dominated or ruled out by a
    # pick under the floor): then the study samples it (ScreenedStudy.ask). With 12
    # candidates that happened in about 1 of 4 runs, before and after this session's changes.
    assert len(study.trials) == 4 and len(picked) >= 3 and len(set(picked)) == len(picked)


def test_a_plan_asked_for_again_is_told_the_first_screening_not_screened_twice(
    ray_cluster, tmp_path
):
    """Two distinct plans in the whole space: six candidates are two screenings and four copies,
    each copy told its first's proxy and latency."""
    config = quick_config(
        tmp_path,
        search__trials=2,
        search__screen={"candidates": 6, "batch": 2},
        search__space={
            "ratio": [0.3, 0.4],
            "step": 0.1,
            "blend": [0.0, 0.0],
            "criteria": ["l2"],
            "round_to": [1],
            "depth": 0,  # no residual block dropped: the two ratios are the whole space
        },
    )
    run_search(prepare(config), progress=lambda line: None)
    screen = optuna.load_study(study_name=config.name + ".screen", storage=config.storage)
    done = [t for t in screen.trials if t.state == TrialState.COMPLETE]
    copies = [t for t in done if "duplicate_of" in t.user_attrs]
    firsts = {t.number: t for t in done if "duplicate_of" not in t.user_attrs}
    assert len(done) == 6 and len(firsts) == 2 and len(copies) == 4
    for t in copies:
        first = firsts[t.user_attrs["duplicate_of"]]
        assert t.user_attrs["plan"] == first.user_attrs["plan"] and t.values == first.values
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    assert study.user_attrs["screen"]["screen_duplicates"] == 4
    picked = [t.user_attrs["plan"] for t in study.trials if "screen" in t.user_attrs]
    # Each plan finetuned once as a pick. Two picks when both plans stay open; one when the
    # selection rules close the other (the short timings rank the less-pruned plan as fast, so
    # it outclasses the other; or the first pick finetuned under the floor, which rules out
    # the faster plan): seen once in a fresh-clone run. Never the same plan twice.
    assert 1 <= len(picked) <= 2 and len({plan_key(p) for p in picked}) == len(picked)


def test_a_uniform_share_holds_that_share_of_the_screen_to_sampled_uniform_plans(
    ray_cluster, tmp_path
):
    """uniform_share 0.5: half the candidates are uniform plans (the seeds and more), the more
    at levels, criteria and roundings the screen's sampler chose, not the seeds' grid; and
    layer_share 0.3: three of the other five sample each group's ratio on its own; subset_share
    0.2: the last two sample which groups are pruned."""
    config = quick_config(
        tmp_path,
        search__trials=2,
        search__screen={
            "candidates": 10,
            "batch": 5,
            "uniform_share": 0.5,
            "layer_share": 0.3,
            "subset_share": 0.2,
        },
        search__space={"ratio": [0.2, 0.8]},
    )
    run_search(prepare(config), progress=lambda line: None)
    screen = optuna.load_study(study_name=config.name + ".screen", storage=config.storage)
    done = [t for t in screen.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 10
    held = [t for t in done if t.params.get("alloc/blend") == 0.0]
    sampled = [t for t in held if t.user_attrs.get("seed") == "uniform-sampled"]
    seeded = [t for t in held if t.user_attrs.get("seed") == "uniform"]
    # The sampler may also land on blend 0 by itself (one step of 21): at least half, and
    # exactly half held on purpose.
    assert len(seeded) == 2 and len(sampled) == 3 and len(held) >= 5
    for t in held:  # one ratio everywhere, whatever the sampler chose for level and criterion
        assert len(set(t.user_attrs["plan"]["ratios"].values())) == 1
    per_layer = [t for t in done if t.user_attrs.get("family") == "layer"]
    assert len(per_layer) == 3 and not {t.number for t in per_layer} & {t.number for t in held}
    for t in per_layer:  # a ratio parameter per group, no allocation level
        assert "alloc/level" not in t.params
        ratios = t.user_attrs["plan"]["ratios"]
        assert {f"ratio/{g}" for g in ratios} <= set(t.params)
    subset = [t for t in done if t.user_attrs.get("family") == "subset"]
    assert len(subset) == 2 and not {t.number for t in subset} & {t.number for t in held}
    for t in subset:  # a yes/no per group; a group left whole is pruned the least the space allows
        ratios = t.user_attrs["plan"]["ratios"]
        whole = {g for g in ratios if t.params[f"alloc/whole/{g}"]}
        assert "alloc/level" in t.params and {f"alloc/whole/{g}" for g in ratios} <= set(t.params)
        if whole != set(ratios):  # all of them whole: the plain allocation
            assert all(ratios[g] == 0.2 for g in whole)
    assert not any(k.startswith("alloc/whole/") for t in done if t not in subset for k in t.params)


def test_time_share_0_times_the_first_half_and_blocks_and_predicts_the_rest(ray_cluster, tmp_path):
    """time_share 0: once the cost model is refitted to the first half's timings, a candidate
    that drops no block takes the model's latency instead of a timing; one that drops a block
    is still timed. Finetuned picks are timed as every trial is."""
    config = quick_config(
        tmp_path,
        search__trials=2,
        search__screen={"candidates": 16, "batch": 4, "time_share": 0.0, "timing_rounds": 6},
        search__space={"ratio": [0.2, 0.8]},
    )
    outcome = run_search(prepare(config), progress=lambda line: None)
    screen = optuna.load_study(study_name=config.name + ".screen", storage=config.storage)
    done = [t for t in screen.trials if t.state == TrialState.COMPLETE]
    guessed = [t for t in done if t.user_attrs["timing"].get("predicted")]
    timed = [t for t in done if not t.user_attrs["timing"].get("predicted")]
    assert len(done) == 16 and guessed and len(timed) >= 8
    assert min(t.number for t in guessed) >= 8  # the first half is all timed: the fit's data
    assert not any(t.user_attrs["plan"].get("drop") for t in guessed)
    assert all("time" not in t.user_attrs["stages"] for t in guessed)
    span = [t.values[1] for t in timed]
    assert all(0.5 * min(span) <= t.values[1] <= 2 * max(span) for t in guessed)
    stats = optuna.load_study(study_name=config.name, storage=config.storage).user_attrs["screen"]
    assert stats["screen_predicted"] == len(
        [t for t in guessed if "duplicate_of" not in t.user_attrs]
    )
    assert all(r.latency.median_ms > 0 for r in outcome.results)  # the picks: timed as trials
    # timing_rounds 6 reached the bench: no timed candidate stopped before 6 rounds.
    assert all(
        t.user_attrs["timing"]["pairs"] >= 6 for t in timed if "pairs" in t.user_attrs["timing"]
    )
    assert any("pairs" in t.user_attrs["timing"] for t in timed)


def test_the_screens_short_timing_looks_at_its_spread_after_timing_rounds():
    full = Target()
    quick = screen_target(full)
    assert quick.pairs == 2 and quick.max_pairs == 24  # the default: 2 rounds, a cap of 4 x 6
    assert quick.precision == 0.03 and quick.min_seconds == 0.0 and quick.retries == 0
    assert screen_target(full, 6).pairs == 6 and screen_target(full, 40).max_pairs == 40


def test_a_rounded_plan_is_binned_at_its_timing_not_at_its_nominal_ratios():
    """With round_to 8, a 16-channel group planned at 0.1 loses 8 channels and one planned at 0.8
    loses 8 too: the cost model must read plans as pruned, or their exact timings get pulled
    to a latency they do not have (on colour_shapes, 6.5 ms pulled to 4.4)."""
    profile = Profile.from_dict(
        {
            "groups": {"a": [float(i) for i in range(16)], "b": [float(i) for i in range(64)]},
            "layers": [["la", 2.0, "a", None], ["lb", 1.0, "b", None]],
        }
    )
    units = {"a": ("a",), "b": ("b",)}
    plans = [
        PruningPlan(ratios={"a": 0.07 * i, "b": 0.06 * (11 - i)}, units=units, round_to=r)
        for i in range(12)
        for r in (1, 8)
    ]
    channels = {"a": 16, "b": 64}
    truth = [
        2.0 * (1 - p.applied_ratios(channels)["a"]) + (1 - p.applied_ratios(channels)["b"])
        for p in plans
    ]
    out = denoised_latencies([p.to_dict() for p in plans], truth, profile)
    assert out == pytest.approx(truth, rel=0.02)
    assert any(abs(p.ratios["a"] - p.applied_ratios(channels)["a"]) > 0.2 for p in plans)


def test_once_a_fast_pick_falls_under_the_floor_the_bins_re_span_the_range_above_it():
    grid, floor = _grid(), 0.9
    middle = _picked(_cand(101, 5.5, 0.9), 0.95)  # held the floor
    fast = _picked(_cand(100, 2.5, 0.0), 0.5)  # fell under it, proxy-worst: dominates nothing
    trials = [middle, fast]
    for _ in range(8):
        pick = next_pick(grid, trials, floor, bins=4)
        trials.append(_picked(pick, None))
    lat = [t.user_attrs["screen"]["latency_ms"] for t in trials[2:]]
    # Every pick above the cut at 2.5 ms, spread over 3..10 ms, although the 1-2 ms candidates
    # score better on the proxy than the failed pick did; not below it until nothing above is
    # left.
    assert min(lat) > 2.5 and max(lat) - min(lat) >= 5.0
    above = [c for c in grid if c.latency_ms > 2.5]
    rest = [_picked(c, 0.95) for c in above] + [middle, fast]
    assert next_pick(grid, rest, floor, bins=4).latency_ms <= 2.5


def test_a_failure_slower_than_a_pick_that_held_the_floor_cuts_nothing():
    grid, floor = _grid(), 0.9
    held = _picked(_cand(101, 3.0, 0.9), 0.95)

    def picks(fluke_accuracy: float) -> list[float]:
        fluke = _picked(_cand(100, 6.0, 0.0), fluke_accuracy)  # mid-range, proxy-worst
        out: list[Candidate] = []
        for _ in range(4):
            out.append(next_pick(grid, [fluke, held, *(_picked(p, None) for p in out)], floor, 4))
        return [p.latency_ms for p in out]

    # One bad finetune mid-range, slower than a pick that held: the same picks as a good one,
    # the fast end included.
    assert picks(0.5) == picks(0.95) and min(picks(0.5)) < 6.0


def test_a_candidate_beaten_on_both_counts_beyond_the_noise_is_never_picked():
    def cand(number: int, latency: float, proxy: float, se: float) -> Candidate:
        return Candidate(number, {}, {"n": number}, proxy, latency, se)

    fast_good = cand(0, 5.0, -0.2, 0.05)
    slow_poor = cand(1, 7.0, -1.2, 0.05)  # slower and 1.0 behind: outclassed
    slow_close = cand(2, 7.5, -0.25, 0.05)  # slower but within the noise: stays open
    picks, trials = [], []
    while (pick := next_pick([fast_good, slow_poor, slow_close], trials, 0.0, 3)) is not None:
        picks.append(pick.number)
        trials.append(_picked(pick, None))
    assert sorted(picks) == [0, 2]
