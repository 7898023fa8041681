"""The base model cache (``workers.load_or_train``): one set of bits per options."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from workers import CACHE_VAR, Task, build_task, load_or_train, state_digest


def _task() -> Task:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16 * 16, 4),
    )
    x, y = torch.randn(256, 3, 16, 16), torch.randint(0, 4, (256,))
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(x, y)
    return Task(
        model=model,
        example_inputs=x[:1],
        train_loader=DataLoader(data, batch_size=64, shuffle=True, generator=gen),
        val_loader=DataLoader(data, batch_size=256),
    )


def test_the_cached_base_model_does_not_depend_on_the_callers_thread_setting(tmp_path, monkeypatch):
    """A screen or a Ray task lowers the process's threads; a base model trained after that must
    still be the same model, bit for bit, and the caller's setting comes back."""
    opts = {"seed": 0, "base_epochs": 2, "base_lr": 0.05}
    states, before = [], torch.get_num_threads()
    for threads in (1, 2):
        monkeypatch.setenv(CACHE_VAR, str(tmp_path / f"t{threads}"))
        torch.set_num_threads(threads)
        task = _task()
        load_or_train(task, opts, "tiny", version=1)
        assert torch.get_num_threads() == threads
        assert list((tmp_path / f"t{threads}").glob("tiny-*.safetensors"))  # cached
        states.append(task.model.state_dict())
    torch.set_num_threads(before)
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k


def test_a_built_in_base_model_does_not_depend_on_what_the_process_drew_before(
    tmp_path, monkeypatch
):
    """Its initial weights are seeded from its options: every machine, and every process, that
    trains the same options caches the same model (it used to take whatever the global
    generator held, so each session benchmarked another digits model)."""
    states = []
    for draw in (1, 2):
        monkeypatch.setenv(CACHE_VAR, str(tmp_path / f"d{draw}"))
        torch.manual_seed(draw)  # what the process drew before differs
        task = build_task("digits", {"base_epochs": 1, "width": 8})
        states.append(state_digest(task.model))
    assert states[0] == states[1]
