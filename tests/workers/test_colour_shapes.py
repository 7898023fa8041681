"""The third built-in task: generated colour shapes and a ResNet-20, trained and cached like digits."""

from __future__ import annotations

import pytest
import torch

from search_space import discover
from workers import build_task, evaluate

# No base training (0 epochs) and few images: these builds test the data, in a private cache.
TINY = {"train_size": 200, "val_size": 50, "base_epochs": 0}


@pytest.fixture(scope="module")
def task():
    # The default task, from the shared test cache: trained once (~80 s on one core), then loaded.
    return build_task("colour_shapes")


def _images(options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    task = build_task("colour_shapes", options)
    return task.train_loader.dataset.tensors


def test_data_is_deterministic_per_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path))
    x, y = _images(TINY)
    again_x, again_y = _images(TINY)
    assert torch.equal(x, again_x) and torch.equal(y, again_y)
    other_x, _ = _images({**TINY, "seed": 1})
    assert not torch.equal(x, other_x)
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_splits_have_the_right_shapes_and_balanced_classes(task):
    for loader, n in ((task.train_loader, 3500), (task.val_loader, 1000)):
        x, y = loader.dataset.tensors
        assert x.shape == (n, 3, 32, 32)
        counts = torch.bincount(y, minlength=10)
        assert len(counts) == 10 and int(counts.min()) >= 0.8 * n / 10  # balanced-ish, every class
    assert task.example_inputs.shape == (1, 3, 32, 32)


def test_base_model_learns_but_not_perfectly(task):
    score = evaluate(task.model, task)
    assert 0.8 < score < 0.995  # chance is 0.1; short of perfect, so pruning has accuracy to cost


def test_discover_finds_the_resnet20_groups(task):
    convs = [m for m in task.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 21  # stem, 18 block convs, 2 projection shortcuts
    found = discover(task.model, task.example_inputs)
    # Nine first convs of blocks, plus one coupled residual group per stage (the stem and
    # projections root them); the classifier is an output layer, never pruned.
    assert len(found.groups) == 12
    assert {"stem.0", "layer1.0.conv1", "layer3.2.conv1"} <= set(found.names)


def test_unknown_options_are_refused_by_name():
    with pytest.raises(ValueError, match="'widht'"):
        build_task("colour_shapes", {"widht": 8})
