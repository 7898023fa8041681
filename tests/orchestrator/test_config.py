from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator import ConfigError, load_config
from orchestrator._config import apply_overrides, config_from_dict

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_demo_config_loads_with_its_documented_values():
    c = load_config(ROOT / "examples" / "digits.yaml")
    assert c.name == "digits-demo" and c.task == "digits"
    assert c.search.trials == 24 and c.search.concurrency == 2 and c.search.sampler == "tpe"
    assert c.search.space.granularity == "layer" and c.search.space.round_to == (1, 8)
    assert c.target.batch_size == 1 and c.target.threads == 1
    assert c.storage == "sqlite:///optuna.db" and c.tracking.uri == "sqlite:///mlflow.db"


def test_overrides_set_nested_values_with_yaml_types(tmp_path):
    path = write(tmp_path, {"name": "x"})
    c = load_config(path, ["search.trials=8", "search.space.round_to=[16]", "constraints.max_latency_ms=0.5",
                           "tracking.uri=null"])
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


BAD = [
    ({"search": {"trails": 3}}, "search.trails: unknown key; did you mean 'trials'"),
    ({"serach": {}}, "serach: unknown key; did you mean 'search'"),
    ({"search": {"trials": "many"}}, "search.trials: expected int"),
    ({"search": {"trials": 0}}, "search.trials: 0 must be >= 1"),
    ({"search": {"concurrency": 0}}, "search.concurrency"),
    ({"search": {"sampler": "tpee"}}, "did you mean 'tpe'"),
    ({"search": {"space": {"ratio": [0.2, 1.2]}}}, "search.space.ratio"),
    ({"search": {"space": {"criteria": ["l3"]}}}, "unknown criterion 'l3'"),
    ({"search": {"space": {"granularity": "stage"}}}, "search.space.granularity"),
    ({"search": {"space": {"round_to": [0]}}}, "search.space.round_to"),
    ({"finetune": {"lr": 0}}, "finetune.lr"),
    ({"finetune": {"epochs": -1}}, "finetune.epochs"),
    ({"target": {"dtype": "fp16"}}, "only measured on cuda"),
    ({"target": {"batchsize": 4}}, "target.batchsize: unknown key; did you mean 'batch_size'"),
    ({"target": {"batch_size": []}}, "target.batch_size: an empty list"),
    ({"target": []}, "target: an empty list"),
    ({"target": [{"name": "a"}, {"name": "a", "batch_size": 8}]}, "two targets are named 'a'"),
    ({"target": {"name": "edge box"}}, "target.name: 'edge box'"),
    ({"constraints": {"max_latency_ms": -1}}, "constraints.max_latency_ms"),
    ({"constraints": {"min_accuracy": 2}}, "constraints.min_accuracy"),
    ({"storage": "optuna.db"}, "storage: 'optuna.db' is not a URL"),
    ({"name": "bad name!"}, "name: 'bad name!'"),
    ({"search": ["trials"]}, "search: expected a mapping"),
    ({"resources": {"num_gpus": "one"}}, "resources.num_gpus: expected float"),
    ({"storage": "postgresql://h/db", "tracking": {"uri": "postgresql://h/db"}}, "name the same database"),
    ({"tracking": {"uri": "https://bot:s3cret@mlflow.example.com"}}, "set MLFLOW_TRACKING_USERNAME"),
    ({"tracking": {"alias_drop": 1.5}}, "tracking.alias_drop"),
    ({"tracking": {"model_name": "my model"}}, "tracking.model_name"),
]


@pytest.mark.parametrize("patch, message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_configs_name_the_field_and_the_fix(tmp_path, patch, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {"name": "x", **patch}))
    assert message in str(err.value)


def test_missing_name_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="name: missing"):
        load_config(write(tmp_path, {"task": "digits"}))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="write key.path=value"):
        load_config(write(tmp_path, {"name": "x"}), ["search.trials"])


def test_a_target_list_and_batch_size_list_make_one_primary_and_extra_targets():
    config = config_from_dict({"name": "t", "target": [
        {"name": "cpu", "batch_size": [1, 32], "threads": 2},
        {"name": "gpu", "device": "cuda", "dtype": "fp16", "resources": {"t4": 1}},
    ]})
    assert config.target.name == "cpu-b1" and config.target.batch_size == 1 and config.target.threads == 2
    assert [(t.name, t.batch_size) for t in config.extra_targets] == [("cpu-b32", 32), ("gpu", 1)]
    assert config.extra_targets[1].resources == {"t4": 1}
    # The plain form round-trips: what goes to MLflow builds the same config again.
    assert config_from_dict(config.to_dict()) == config
