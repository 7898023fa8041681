from __future__ import annotations

from workers import scan_groups, upper_bounds


def test_scan_prunes_each_group_alone_and_drops_grow_with_the_ratio(digits_task):
    table = scan_groups("digits", {}, None, ["stem.0", "layer1.0.conv1"], [0.25, 0.75])
    assert set(table) == {"stem.0", "layer1.0.conv1"}
    for row in table.values():
        assert set(row) == {"0.25", "0.75"} and all(0 <= a <= 1 for a in row.values())
    # Removing three quarters of the stem's channels hurts more than a quarter (no finetuning).
    assert table["stem.0"]["0.75"] < table["stem.0"]["0.25"]


def test_upper_bounds_take_the_worst_group_of_a_unit():
    table = {
        "a": {"0.25": 0.97, "0.5": 0.95, "0.75": 0.5},
        "b": {"0.25": 0.97, "0.5": 0.80, "0.75": 0.3},
        "c": {"0.25": 0.2, "0.5": 0.1, "0.75": 0.0},
    }
    bounds = upper_bounds(
        table, base_accuracy=0.98, units={"a": ["a"], "ab": ["a", "b"], "c": ["c"]}, max_drop=0.05
    )
    assert bounds == {
        "a": 0.5,
        "ab": 0.25,
        "c": 0.25,
    }  # c is fragile everywhere: kept at the smallest ratio
