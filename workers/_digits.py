"""Built-in task ``digits``: scikit-learn's 8x8 handwritten digits and a small residual CNN.

No download: the data ships inside scikit-learn. The base model is trained once and cached
(by a hash of the options and this file's model definition) so later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ._latency import fixed_threads
from ._progress import epoch_progress
from ._tasks import Task, cache_dir
from ._train import accuracy, finetune

_log = logging.getLogger("prunesearch.base")

DEFAULTS = {
    "width": 32,
    "seed": 0,
    "val_fraction": 0.2,
    "batch_size": 64,
    "base_epochs": 12,
    "base_lr": 0.05,
}
# Bump when DigitsNet or its training changes, so stale cached weights are not reused. 2: the
# initial weights are seeded (before, each training drew them from whatever the process's
# generator held, so every machine cached another base model).
MODEL_VERSION = 2


class Block(nn.Module):
    """A ResNet basic block: two 3x3 convs and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsNet(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.layer1 = nn.Sequential(Block(w, w, 1), Block(w, w, 1))
        self.layer2 = nn.Sequential(Block(w, 2 * w, 2), Block(2 * w, 2 * w, 1))
        self.layer3 = nn.Sequential(Block(2 * w, 4 * w, 2))
        self.head = nn.Sequential(nn.Linear(4 * w, 2 * w), nn.ReLU())
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


def digits_data(seed: int, val_fraction: float) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=data.target)
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va])


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under the global generator seeded with ``seed``, which is then left as it was:
    a base model's initial weights, and so the weights trained from them, depend on its options
    alone, not on what the process drew before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_digits(options: Mapping[str, Any]) -> Task:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"task_options: unknown keys {unknown} for task 'digits'; known: {sorted(DEFAULTS)}"
        )
    opts = {**DEFAULTS, **options}
    train, val = digits_data(opts["seed"], opts["val_fraction"])
    gen = torch.Generator().manual_seed(opts["seed"])
    train_loader = DataLoader(train, batch_size=opts["batch_size"], shuffle=True, generator=gen)
    val_loader = DataLoader(val, batch_size=256)
    task = Task(
        model=seeded(opts["seed"], lambda: DigitsNet(opts["width"])),
        example_inputs=train[0][0].unsqueeze(0),
        train_loader=train_loader,
        val_loader=val_loader,
    )
    load_or_train(task, opts)
    return task


def load_or_train(
    task: Task, opts: Mapping[str, Any], prefix: str = "digits", version: int = MODEL_VERSION
) -> None:
    """Train ``task.model`` once per ``opts`` and model ``version`` (``opts`` holds ``seed``,
    ``base_epochs`` and ``base_lr``; all of it keys the cache), then load it from ``cache_dir()``
    as ``<prefix>-<key>.safetensors``: a task module's way to train its base model only once."""
    key = hashlib.sha256(json.dumps({**opts, "v": version}, sort_keys=True).encode()).hexdigest()[
        :12
    ]
    path = cache_dir() / f"{prefix}-{key}.safetensors"
    if path.exists():
        task.model.load_state_dict(load_file(path))
        task.model.eval()
        _log.info("base model: %s, cached in %s", prefix, path)
        return
    torch.manual_seed(opts["seed"])
    _log.info(
        "base model: training %s for %s epochs (once; then cached in %s)",
        prefix,
        opts["base_epochs"],
        path,
    )
    # A fixed thread count: float sums split across threads round differently, so a model trained
    # after something lowered this process's threads (a screen, a Ray task) would get other bits
    # for the same options, and which file the cache keeps would depend on who trained first.
    with (
        fixed_threads(os.cpu_count() or 1),
        epoch_progress(opts["base_epochs"], f"{prefix} base model") as on_epoch,
    ):
        finetune(
            task.model, task, epochs=opts["base_epochs"], lr=opts["base_lr"], on_epoch=on_epoch
        )
    task.model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in task.model.state_dict().items()}, tmp)
    os.replace(tmp, path)  # atomic: concurrent workers never read a half-written file


__all__ = ["DigitsNet", "build_digits", "accuracy"]
