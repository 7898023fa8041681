"""How a night is planned from the nights before it (no cluster needed)."""

from __future__ import annotations

import datetime as dt

from orchestrator import Night, plan_night

DAY = dt.date(2026, 11, 20)


def night(date: str, state: str = "finished", base: str = "b1", target: str = "t1") -> Night:
    return Night(f"s-{date.replace('-', '')}", date, state, base, target, 0.05, 1.0)


def test_a_first_night_is_a_cold_start():
    plan = plan_night("s", DAY, "b1", "t1", [])
    assert (plan.study, plan.action, plan.previous) == ("s-20261120", "run", None)
    assert "cold start" in plan.message


def test_a_finished_night_is_not_run_again_and_an_unfinished_one_resumes():
    assert plan_night("s", DAY, "b1", "t1", [night("2026-11-20")]).action == "done"
    plan = plan_night(
        "s", DAY, "b1", "t1", [night("2026-11-19"), night("2026-11-20", state="running")]
    )
    assert plan.action == "resume" and plan.previous.study == "s-20261119"


def test_the_latest_finished_earlier_night_with_the_same_base_and_target_warm_starts():
    nights = [
        night("2026-11-17"),
        night("2026-11-18"),
        night("2026-11-19", state="partial"),
        night("2026-11-21"),
    ]
    plan = plan_night("s", DAY, "b1", "t1", nights)
    assert plan.previous.study == "s-20261118" and "warm start from s-20261118" in plan.message


def test_a_changed_base_model_or_target_starts_fresh_and_says_so():
    plan = plan_night("s", DAY, "b2", "t1", [night("2026-11-19")])
    assert (
        plan.previous is None
        and "base model changed since s-20261119 (hash b1 -> b2)" in plan.message
    )
    plan = plan_night("s", DAY, "b1", "t2", [night("2026-11-19")])
    assert plan.previous is None and "target changed" in plan.message
