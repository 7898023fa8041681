"""The second built-in task: shifted digits and a plain CNN, trained and cached like digits."""

from __future__ import annotations

import pytest
import torch

from search_space import discover
from workers import accuracy, build_task, shift

SMALL = {"width": 8, "base_epochs": 3}  # seconds to train; the benchmark uses the defaults


def test_shifted_digits_builds_learns_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path))
    task = build_task("shifted_digits", SMALL)
    assert task.example_inputs.shape == (1, 1, 16, 16)
    assert accuracy(task.model, task.val_loader) > 0.5  # 10 classes: chance is 0.1
    assert len(list(tmp_path.glob("shifted-digits-*.safetensors"))) == 1
    again = build_task("shifted_digits", SMALL)  # loaded, not retrained: identical weights
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            task.model.state_dict().values(), again.model.state_dict().values(), strict=True
        )
    )
    found = discover(task.model, task.example_inputs)
    assert len(found.names) >= 6  # every conv its own group: no shortcuts couple them


def test_digits_land_whole_at_seeded_offsets():
    x = torch.ones(50, 1, 8, 8)
    data = torch.utils.data.TensorDataset(x, torch.zeros(50, dtype=torch.long))
    a, b = shift(data, 16, 12, seed=3).tensors[0], shift(data, 16, 12, seed=3).tensors[0]
    assert torch.equal(a, b) and a.shape == (50, 1, 16, 16)
    assert torch.allclose(
        a.sum(dim=(1, 2, 3)), torch.full((50,), 144.0)
    )  # the whole 12x12 digit, never cut
    assert len({tuple(img.nonzero()[0].tolist()) for img in a}) > 5  # offsets vary


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="unknown keys"):
        build_task("shifted_digits", {"widht": 8})
