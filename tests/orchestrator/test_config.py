from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator import apply_overrides, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_demo_config_loads_with_its_documented_values():
    c = load_config(ROOT / "examples" / "digits.yaml")
    assert c.name == "digits-demo" and c.task == "digits"
    assert c.search.trials == 24 and c.search.concurrency == 2 and c.search.sampler == "tpe"
    assert c.search.space.granularity == "allocation" and c.search.space.round_to == (1, 8)
    assert c.search.screen.candidates == 96
    assert c.target.batch_size == 1 and c.target.threads == 1
    assert c.storage == "sqlite:///optuna.db" and c.tracking.uri == "sqlite:///mlflow.db"


def test_overrides_set_nested_values_with_yaml_types(tmp_path):
    path = write(tmp_path, {"name": "x"})
    c = load_config(
        path,
        [
            "search.trials=8",
            "search.space.round_to=[16]",
            "constraints.max_latency_ms=0.5",
            "tracking.uri=null",
        ],
    )
    assert c.search.trials == 8
    assert c.search.space.round_to == (16,)
    assert c.constraints.max_latency_ms == 0.5
    assert c.tracking.uri is None


def test_overrides_do_not_mutate_the_input():
    raw = {"name": "x", "search": {"trials": 3}}
    apply_overrides(raw, ["search.trials=5"])
    assert raw["search"]["trials"] == 3


def test_config_is_frozen():
    c = config_from_dict({"name": "x"})
    with pytest.raises(AttributeError):
        c.search.trials = 3  # type: ignore[misc]


# Malformed configs (typos, wrong types, out-of-range and contradictory values, missing name,
# file or YAML) are a table in tests/reliability/test_bad_input.py, run through the CLI.


def test_a_target_list_and_batch_size_list_make_one_primary_and_extra_targets():
    config = config_from_dict(
        {
            "name": "t",
            "target": [
                {"name": "cpu", "batch_size": [1, 32], "threads": 2},
                {"name": "gpu", "device": "cuda", "dtype": "fp16", "resources": {"t4": 1}},
            ],
        }
    )
    assert (
        config.target.name == "cpu-b1"
        and config.target.batch_size == 1
        and config.target.threads == 2
    )
    assert [(t.name, t.batch_size) for t in config.extra_targets] == [("cpu-b32", 32), ("gpu", 1)]
    assert config.extra_targets[1].resources == {"t4": 1}
    # The plain form round-trips: what goes to MLflow builds the same config again.
    assert config_from_dict(config.to_dict()) == config


def test_anchors_default_to_four_and_zero_turns_them_off():
    assert config_from_dict({"name": "x"}).search.anchors == 4
    assert config_from_dict({"name": "x", "search": {"anchors": 0}}).search.anchors == 0
    assert config_from_dict({"name": "x", "search": {"anchors": 8}}).search.anchors == 8


@pytest.mark.parametrize(
    "value, message",
    [
        (
            -1,
            r"search\.anchors: -1 must lie in \[0, 64\] \(uniform-ratio first trials; 0 turns them off\)",
        ),
        (65, r"search\.anchors: 65 must lie in \[0, 64\]"),
        (True, r"search\.anchors: expected int, got True"),
        ("four", r"search\.anchors: expected int, got 'four'"),
    ],
)
def test_bad_anchors_are_refused_naming_the_field_and_the_fix(value, message):
    from orchestrator import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_from_dict({"name": "x", "search": {"anchors": value}})


def test_anchors_can_be_set_on_the_command_line(tmp_path):
    c = load_config(write(tmp_path, {"name": "x"}), ["search.anchors=2"])
    assert c.search.anchors == 2
