"""Progress of long phases: one line per step where output is not a terminal (CI, job logs)."""

from __future__ import annotations

import logging

from workers import steps


def test_each_step_is_one_line_when_output_is_not_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="prunesearch"), steps(3, "registering m") as advance:
        advance("trial 4 as version 1")
        advance()
        advance("trial 9 as version 3")
    lines = [r.getMessage() for r in caplog.records if r.name == "prunesearch.progress"]
    assert lines == [
        "registering m: 1/3, trial 4 as version 1",
        "registering m: 2/3",
        "registering m: 3/3, trial 9 as version 3",
    ]


def test_nothing_is_said_where_nobody_asked(caplog):
    with caplog.at_level(logging.WARNING, logger="prunesearch"), steps(2, "x") as advance:
        advance("a")
        advance("b")
    assert not [r for r in caplog.records if r.name == "prunesearch.progress"]


def test_a_batch_of_steps_advances_at_once(caplog):
    with caplog.at_level(logging.INFO, logger="prunesearch"), steps(5, "screening") as advance:
        advance("12 s", n=2)
        advance(n=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "prunesearch.progress"]
    assert lines == ["screening: 2/5, 12 s", "screening: 5/5"]
