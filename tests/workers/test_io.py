from __future__ import annotations

import copy

import pytest
import torch

from search_space import uniform_plan
from workers import PrunedModelError, apply_plan, load_pruned, read_plan, save_pruned
from workers._digits import DigitsNet


@pytest.fixture(scope="module")
def pruned(digits_task, digits_discovery):
    plan = uniform_plan(digits_discovery, 0.4, criterion="l2", round_to=8)
    return apply_plan(digits_task.model, digits_task.example_inputs, plan), plan


def test_save_load_round_trips_to_bit_identical_outputs(tmp_path, digits_task, pruned):
    model, plan = pruned
    path = save_pruned(model, plan, tmp_path / "m.safetensors", base_model=digits_task.model)
    loaded, loaded_plan = load_pruned(path, copy.deepcopy(digits_task.model))
    assert loaded_plan == plan
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert read_plan(path) == plan
    # The channel counts came back, not just the tensors.
    assert loaded.stem[0].out_channels == model.stem[0].out_channels < digits_task.model.stem[0].out_channels


def test_loading_never_unpickles(tmp_path, digits_task, pruned):
    model, plan = pruned
    path = save_pruned(model, plan, tmp_path / "m.safetensors", base_model=digits_task.model)
    assert b"pickle" not in path.read_bytes()[:8] and path.read_bytes()[8:9] == b"{"  # safetensors' JSON header


def test_a_tampered_file_is_refused(tmp_path, digits_task, pruned):
    model, plan = pruned
    path = save_pruned(model, plan, tmp_path / "m.safetensors", base_model=digits_task.model)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the last tensor
    with pytest.raises(PrunedModelError, match="changed after saving"):
        load_pruned(bytes(data), copy.deepcopy(digits_task.model))


def test_a_file_for_another_base_model_is_refused(tmp_path, digits_task, pruned):
    model, plan = pruned
    path = save_pruned(model, plan, tmp_path / "m.safetensors", base_model=digits_task.model)
    with pytest.raises(PrunedModelError, match="different base model"):
        load_pruned(path, DigitsNet(width=16))


def test_garbage_is_refused(tmp_path, digits_task):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(PrunedModelError, match="not a prunesearch pruned-model file"):
        load_pruned(path, copy.deepcopy(digits_task.model))
