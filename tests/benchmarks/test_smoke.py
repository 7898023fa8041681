"""Each benchmark script runs on a tiny setting and writes its section."""

from __future__ import annotations

import dataclasses
import re

import pytest

from benchmarks import latency


def test_latency_benchmark_writes_its_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    latency.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert "<!-- begin latency -->" in text and "## Latency measurement" in text
    assert "| digits-cnn | 0.5 |" in text
    assert "Machine:" in text and "Command:" in text
    # A second run replaces its section instead of appending another.
    latency.main(["--tiny", "--out", str(out)])
    assert out.read_text().count("<!-- begin latency -->") == 1


def test_early_stop_benchmark_writes_its_section(tmp_path, ray_cluster):
    from benchmarks import early_stop

    out = tmp_path / "RESULTS.md"
    early_stop.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert "## Early rejection and early stopping" in text
    assert "| all rules off |" in text and "| defaults (all on) |" in text
    assert "Finetune time saved:" in text


def test_orchestration_benchmark_runs_both_sides_on_one_workload(tmp_path, ray_cluster):
    from benchmarks import orchestration

    out = tmp_path / "RESULTS.md"
    orchestration.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert "| prunesearch |" in text and "| Ray Tune + OptunaSearch |" in text
    assert "Wall-time ratio Ray Tune / prunesearch:" in text


def test_demo_benchmark_runs_the_example_config_in_each_variant(tmp_path, ray_cluster):
    from benchmarks import demo

    out = tmp_path / "RESULTS.md"
    demo.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert "## The demo's wall time" in text and "`examples/digits.yaml`" in text
    for label in demo.VARIANTS:
        assert f"| {label} |" in text
    # The variant before the screen screened nothing; the one as shipped did.
    rows = {
        line.split("|")[1].strip(): line.split("|")
        for line in text.splitlines()
        if line.startswith("| ")
    }
    assert float(rows["before the screen (per-layer TPE)"][4]) == 0.0
    # What a screened candidate costs against a finetuned trial: a real fraction where there was a
    # screen (cheaper than the trial), none where there was not.
    shipped = rows["as shipped (screen, allocation, depth)"]
    assert float(shipped[6]) > 0.0
    assert 0.0 < float(shipped[7].split()[0]) < 1.0
    assert rows["before the screen (per-layer TPE)"][7].strip() == "n/a"
    assert "As shipped / before the screen:" in text


def test_cost_model_benchmark_ranks_each_latency_source_against_a_re_timing(tmp_path):
    from benchmarks import cost_model

    out = tmp_path / "RESULTS.md"
    cost_model.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert "## The screen's latency sources" in text
    # digits has residual blocks: both families of plans are ranked.
    assert "| digits | channels only |" in text and "| digits | drop up to 3 blocks |" in text


def test_quality_benchmark_scores_every_arm_at_every_budget(tmp_path, ray_cluster):
    from benchmarks import quality

    out = tmp_path / "RESULTS.md"
    quality.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert "## Search quality" in text and "Hypervolume reference: latency 1.0 (base)" in text
    for budget in (1, 2):
        for arm in (
            "prunesearch (default)",
            "random search",
            "uniform (TP default)",
            "TP global pruning",
            "uniform + screen",
        ):
            assert (
                text.count(f"| digits | {budget} | {arm} |") == 2
            )  # finetune- and compute-matched
    assert "Default vs the best baseline (median hypervolume):" in text
    assert "### Compute-matched" in text and "| digits | " in text.split("### The screen")[1]


def test_quality_uniform_sweep_prefixes_are_evenly_spaced_sweeps():
    from benchmarks.quality import MAX_RATIO, sweep_params

    ratios = [p["ratio/all"] for p in sweep_params(12, global_pruning=False)]
    assert len(set(ratios)) == 12
    for n in (3, 6, 12):  # a smaller budget reads the first n trials: they must be a sweep too
        prefix = sorted(ratios[:n])
        assert prefix[-1] == MAX_RATIO
        assert all(
            abs(b - a - MAX_RATIO / n) <= 0.0051
            for a, b in zip([0.0, *prefix], prefix, strict=False)
        )


def test_scaling_benchmark_times_discovery_and_every_sampler(tmp_path):
    from benchmarks import scaling

    out = tmp_path / "RESULTS.md"
    scaling.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert "## Scaling" in text and "| resnet18 | 11.7 | " in text
    for sampler in ("tpe", "nsga2", "random"):
        assert f"| {sampler} | " in text
    assert "| gp | skipped |" in text  # the tiny setting leaves GP out: one ask costs seconds


def test_screen_driver_benchmark_asks_alike_with_both_samplers(tmp_path):
    from benchmarks import screen_driver

    out = tmp_path / "RESULTS.md"
    screen_driver.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert "## The screen's driver" in text
    row = next(line for line in text.splitlines() if line.startswith("| 40 |"))
    assert row.endswith("| yes |")  # the one-read sampler drew Optuna's TPE's samples


def test_screen_timing_benchmark_times_each_plan_both_ways(tmp_path):
    from benchmarks import screen_timing

    out = tmp_path / "RESULTS.md"
    screen_timing.main(["--tiny", "--rounds", "6", "--section", "st", "--out", str(out)])
    text = out.read_text()
    assert "<!-- begin st -->" in text and "## The screen's short timing" in text
    assert "group, 6 rounds: tau" in text  # a third protocol: 6 rounds before the stop rule
    cells = next(line for line in text.splitlines() if line.startswith("| digits |")).split("|")
    taus = [float(cells[i]) for i in (4, 7, 10)]  # pairs, group, 6 rounds: tau with the reference
    assert all(-1.0 <= t <= 1.0 for t in taus)
    assert cells[-2].strip().endswith("x")  # the cost ratio of the protocols


def test_screen_criteria_benchmark_prunes_each_plan_both_ways_to_the_same_model(tmp_path):
    from benchmarks import screen_criteria

    out = tmp_path / "RESULTS.md"
    screen_criteria.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert "<!-- begin screen-criteria -->" in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| digits |")]
    assert [r[2].strip() for r in rows] == ["l1", "taylor"]
    assert all(r[-2].strip() == "yes" for r in rows)  # identical pruned models both ways


def test_recovery_benchmark_writes_its_section(tmp_path, ray_cluster):
    from benchmarks import recovery

    out = tmp_path / "RESULTS.md"
    recovery.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert (
        "## Recovery methods" in text and "| all methods |" in text and "| oneshot only |" in text
    )


def test_quality_default_arm_runs_the_product_defaults_and_baselines_have_no_screen(tmp_path):
    from benchmarks.quality import ARMS, MODES, arm_config
    from orchestrator import SearchConfig

    configs = {arm.key: arm_config(arm, "digits", 0, MODES["quick"], tmp_path) for arm in ARMS}
    ours, rand = configs["default"].search, configs["random"].search
    assert (
        ours.sampler == "tpe"
        and ours.screen == SearchConfig().screen
        and ours.screen.candidates > 0
    )
    assert ours.space.granularity == SearchConfig().space.granularity == "allocation"
    assert rand.sampler == "random" and rand.anchors == 0 and rand.screen.candidates == 0
    assert rand.space.granularity == "layer" and rand.space.criteria == ours.space.criteria
    assert (
        configs["uniform"].search.screen.candidates == 0
        and configs["global"].search.screen.candidates == 0
    )
    assert configs["uniform-screen"].search.screen.candidates > 0
    assert configs["uniform-screen"].search.space.granularity == "uniform"
    assert arm_config(ARMS[1], "digits", 0, MODES["quick"], tmp_path, trials=20).search.trials == 20
    # A model family outside the repository runs through the same arms as a module:build task.
    mixed = arm_config(ARMS[0], "benchmarks.mixed_task:build", 0, MODES["quick"], tmp_path)
    assert mixed.task == "benchmarks.mixed_task:build" and mixed.name.startswith("q-benchmarks-")
    # --vary-base: seed k prunes the base model trained with seed k; by default, the task's one.
    assert configs["default"].task_options == {}
    varied = dataclasses.replace(MODES["quick"], vary_base=True)
    assert arm_config(ARMS[0], "digits", 3, varied, tmp_path).task_options == {"seed": 3}


def test_results_show_the_command_without_where_it_was_written():
    from benchmarks._results import _shown

    assert _shown(["--full", "--out", "/tmp/x.md", "--seeds", "3"]) == ["--full", "--seeds", "3"]
    assert _shown(["--out=/tmp/x.md", "--tiny"]) == ["--tiny"]


def _pool() -> dict:
    """A pool of 12 screened candidates, every one finetuned: faster ones lose accuracy."""

    def plan(r: float) -> dict:
        return {"ratios": {"g": r}, "units": {"g": ["g"]}, "criterion": "l2", "round_to": 1}

    cands = []
    for i in range(12):
        r = round(0.05 * (i + 1), 2)
        cands.append(
            {
                "number": i,
                "params": {"alloc/level": r},
                "plan": plan(r),
                "proxy": -r * r,
                "latency_ms": 1.0 - r,
                "proxy_se": 0.0,
                "uniform": i % 3 == 0,
                "accuracy": 0.99 - 0.2 * r * r,
                "signature": f"s{i}",
            }
        )
    lat = {"base": 1.0} | {f"s{i}": 1.0 - 0.05 * (i + 1) for i in range(12)}
    # One group whose cost is the whole latency: the cost model fits the timings exactly.
    profile = {"groups": {"g": [0.1, 0.2]}, "layers": [["conv", 1.0, "g", None]], "intercept": 0.0}
    return {
        "candidates": cands,
        "lat": lat,
        "base_accuracy": 0.99,
        "base_latency_ms": 1.0,
        "profile": profile,
    }


def test_selection_replay_runs_the_products_pick_rule_within_the_ceiling():
    from benchmarks.selection import ceiling, hv_of, replay
    from orchestrator import next_pick

    pool = _pool()
    picks = replay(pool, next_pick, 4)
    assert len(picks) == 4 and len({p["signature"] for p in picks}) == 4  # none finetuned twice
    assert 0 < hv_of(pool, picks) <= ceiling(pool, 4) + 1e-12
    everything = [c for c in pool["candidates"]]
    assert ceiling(pool, 12) == hv_of(pool, everything)  # all of them: the whole pool's front


def test_a_perfect_proxy_and_re_drawn_finetunes_bound_what_a_rule_can_reach():
    from benchmarks.selection import ceiling, finetune_sd, hv_of, oracle_proxy, replay, replay_rows
    from orchestrator import next_pick
    from orchestrator import plan_key as key

    pool = _pool()
    every = pool["candidates"]
    pool["runs"] = {"default": {"records": every[:3]}, "uniform": {"records": every[::4]}}
    pool["runs"]["global"] = pool["runs"]["uniform"]
    # The perfect proxy picks as the rule would on a pool whose proxy were the finetuned accuracy.
    for c in every[-4:]:
        c["proxy"] = -c["proxy"]  # wrong for the four fastest
    perfect = replay(pool, oracle_proxy(pool, next_pick), 3)
    truthful = {**pool, "candidates": [{**c, "proxy": c["accuracy"]} for c in every]}
    assert perfect == replay(truthful, next_pick, 3) != replay(pool, next_pick, 3)
    assert hv_of(pool, perfect) <= ceiling(pool, 3) + 1e-12
    assert (
        finetune_sd(pool) is None
        and "finetune sd (accuracy)" not in replay_rows([pool], next_pick, [3])[0]
    )
    # A second finetune of every plan, 0.02 worse: the first draw's ceiling was that lucky.
    pool["redraws"] = {key(c["plan"]): [c["accuracy"] - 0.02] for c in pool["candidates"]}
    assert ceiling(pool, 3, redrawn=True) < ceiling(pool, 3)
    assert abs(finetune_sd(pool) - 0.02 / 2**0.5) < 1e-9  # the sd of two draws 0.02 apart
    row = replay_rows([pool], next_pick, [3])[0]
    assert row["finetune sd (accuracy)"] == "0.0141"
    assert float(row["ceiling re-drawn / best baseline"].rstrip("x")) > 0


def test_the_generator_free_ceiling_reads_each_kind_of_plan_and_both(tmp_path):
    import json

    from benchmarks import ceiling
    from orchestrator import plan_key as key

    pool = _pool()
    # Every third candidate is a dense-sweep plan, the rest random per-layer plans; the
    # baselines are four of the uniform ones.
    for i, c in enumerate(pool["candidates"]):
        c["kind"] = "uniform" if i % 3 == 0 else "random"
    uniform = [c for c in pool["candidates"] if c["kind"] == "uniform"]
    pool["runs"] = {"uniform": {"records": uniform}, "global": {"records": uniform[:2]}}
    pool["task"], pool["seed"] = "digits", 0
    got = {r["plans"]: r for r in ceiling.rows([pool], [4])}
    assert set(got) == {"dense uniform", "random per-layer", "both"}
    # The bound dominates every plan of the pool, so no subset's ceiling passes it.
    bound = float(got["both"]["perfect front / best"].rstrip("x"))
    assert bound >= max(float(r["ceiling / best"].rstrip("x")) for r in got.values())
    # Hindsight over the four uniform plans the baseline finetuned is the baseline's front.
    assert got["dense uniform"]["ceiling / best"] == "1.00x"
    both, alone = (float(got[k]["ceiling"]) for k in ("both", "random per-layer"))
    assert both >= alone > 0 and "re-drawn / best" not in got["both"]
    # Re-drawn 0.02 worse everywhere: the same picks score less than their lucky first draw.
    pool["redraws"] = {key(c["plan"]): [c["accuracy"] - 0.02] for c in pool["candidates"]}
    row = next(r for r in ceiling.rows([pool], [4]) if r["plans"] == "both")
    assert float(row["re-drawn / best"].rstrip("x")) < float(row["ceiling / best"].rstrip("x"))
    # The report reads the pools from disk and writes its own section.
    (tmp_path / "digits-0.json").write_text(json.dumps(pool))
    out = tmp_path / "RESULTS.md"
    argv = ["report", "--seeds", "1", "--budgets", "4", "--pools", str(tmp_path), "--out", str(out)]
    ceiling.main(argv)
    text = out.read_text()
    assert "## Generator-free ceiling" in text and "| 4 | both |" in text
    assert "pick rule" not in text  # no pool screened yet: no replay of the rule
    # Screened (each plan's own proxy and latency): the rule is replayed on the pool and the
    # report shows it, within the ceiling; a perfect proxy is the same rule on the accuracies.
    pool["screen"] = {
        key(c["plan"]): [c["proxy"], c["proxy_se"], c["latency_ms"]] for c in pool["candidates"]
    }
    (row,) = ceiling.rule_rows([pool], [4])
    assert (
        0
        < float(row["rule / best"].rstrip("x"))
        <= float(got["both"]["ceiling / best"].rstrip("x"))
    )
    assert float(row["rule, perfect proxy / best"].rstrip("x")) > 0
    (tmp_path / "digits-0.json").write_text(json.dumps(pool))
    ceiling.main(argv)
    assert "the search's pick rule on the same plans, screened" in out.read_text()
    assert "proxy variants" not in out.read_text()  # no variant screened: no variant table
    # A variant whose proxy is the finetuned accuracy itself ranks perfectly; the default
    # proxy here is exact too (both fall with the ratio), so both rows say tau 1.
    pool["variants"] = {
        "steps=4": {
            k: [c["accuracy"], 0.0, c["latency_ms"]]
            for k, c in ((key(c["plan"]), c) for c in pool["candidates"])
        }
    }
    pool["variant_s"] = {"": 0.05, "steps=4": 0.08}
    rows = {r["proxy"]: r for r in ceiling.variant_rows([pool], [4])}
    assert (
        set(rows) == {"default", "steps=4"} and rows["steps=4"]["Kendall tau (median)"] == "1.000"
    )
    assert rows["steps=4"]["proxy ms / candidate"] == "80" and "rule / best @4" in rows["steps=4"]
    (tmp_path / "digits-0.json").write_text(json.dumps(pool))
    ceiling.main(argv)
    assert "proxy variants (`screen --variants`)" in out.read_text()


def test_the_ceiling_screens_every_plan_as_the_search_screens_a_candidate(tmp_path):
    from benchmarks import ceiling
    from benchmarks.quality import MODES
    from orchestrator import plan_key as key
    from search_space import discover
    from workers import build_task

    task = build_task("digits")
    names = list(discover(task.model, task.example_inputs).names)
    mild, deep = (
        {"ratios": {"all": r}, "units": {"all": names}, "criterion": "l2", "round_to": 1}
        for r in (0.2, 0.6)
    )
    pool = {"candidates": [{"plan": mild}, {"plan": deep}, {"plan": mild}]}  # one plan twice
    ceiling.screen("digits", 0, MODES["tiny"], tmp_path, pool)
    assert set(pool["screen"]) == {key(mild), key(deep)}  # screened once each
    (p_mild, _, ms_mild), (p_deep, _, ms_deep) = (pool["screen"][key(p)] for p in (mild, deep))
    # Minus the loss on the training slice: the deeper cut loses more before any finetune.
    assert p_deep < p_mild <= 0 and ms_mild > 0 and ms_deep > 0
    # A short finetune first (search.screen.steps): another proxy for the same plans, timed once.
    ceiling.screen("digits", 0, MODES["tiny"], tmp_path, pool, "steps=2")
    tuned = pool["variants"]["steps=2"]
    assert set(tuned) == set(pool["screen"]) and tuned[key(deep)][0] > p_deep  # steps recover
    assert (
        tuned[key(deep)][2] == ms_deep and pool["variant_s"]["steps=2"] > pool["variant_s"][""] > 0
    )


def test_demo_history_runs_the_demo_of_two_commits_as_a_user_does(tmp_path):
    from benchmarks import demo_history

    out = tmp_path / "RESULTS.md"
    demo_history.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert "## `make demo` against an earlier commit's" in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| today's")]
    rows += [line.split("|") for line in text.splitlines() if line.startswith("| earlier (")]
    assert len(rows) == 2
    for row in rows:  # each side ran its search to a front and a positive wall time
        assert float(row[2]) > 0 and 0 < float(row[4]) < 1 and int(row[5]) >= 1
    assert re.search(r"Today's / earlier: \*\*[0-9.]+x\*\*", text)


def test_demo_history_reads_what_a_run_printed():
    from benchmarks.demo_history import read_output

    out = (
        "base model: training digits for 12 epochs (once; then cached in x)\n"
        "Pareto front of digits-demo (4 models; stopped by trials; hypervolume 0.0445):\n"
    )
    assert read_output(out) == {"front": 4, "hypervolume": 0.0445, "trained": True}
    assert read_output("no front")["front"] == 0


def test_the_zoo_task_names_an_unknown_option_before_training():
    from benchmarks.zoo_task import build

    with pytest.raises(ValueError, match=r"unknown keys \['depth'\]; known: \[.*'width'"):
        build({"depth": 3})
