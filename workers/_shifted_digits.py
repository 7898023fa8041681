"""Built-in task ``shifted_digits``: scikit-learn's digits, enlarged to 12x12 and placed at a random
offset in a 16x16 canvas, classified by a plain VGG-style CNN (no shortcuts).

A second CPU-sized task next to ``digits``: another architecture family (every conv is its own
DepGraph group, so per-layer ratios are free) and data where position varies, so pruning costs
accuracy sooner. No download. The base model is trained once (~15 s on one core) and cached
like ``digits`` (by a hash of the options and MODEL_VERSION).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ._digits import digits_data, load_or_train, seeded
from ._tasks import Task

DEFAULTS = {
    "width": 24,
    "seed": 0,
    "val_fraction": 0.2,
    "batch_size": 64,
    "base_epochs": 10,
    "base_lr": 0.05,
    "canvas": 16,
    "digit": 12,
}
MODEL_VERSION = (
    2  # bump when ShiftedNet changes, so stale cached weights are not reused (2: seeded init)
)


def _cbr(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class ShiftedNet(nn.Module):
    """Three stages of two 3x3 convs (w, 2w, 4w channels), max-pooling between, an MLP head."""

    def __init__(self, width: int = 24, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_cbr(1, w),
            *_cbr(w, w),
            nn.MaxPool2d(2),
            *_cbr(w, 2 * w),
            *_cbr(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_cbr(2 * w, 4 * w),
            *_cbr(4 * w, 4 * w),
        )
        self.head = nn.Sequential(nn.Linear(4 * w, 4 * w), nn.ReLU())
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.fc(self.head(torch.flatten(x, 1)))


def shift(data: TensorDataset, canvas: int, digit: int, seed: int) -> TensorDataset:
    """Each 8x8 image resized to ``digit`` pixels, pasted at a seeded random offset in the canvas."""
    x, y = data.tensors
    big = nn.functional.interpolate(x, size=digit, mode="bilinear", align_corners=False)
    offsets = torch.randint(
        0, canvas - digit + 1, (len(x), 2), generator=torch.Generator().manual_seed(seed)
    )
    out = torch.zeros(len(x), 1, canvas, canvas)
    for i, (r, c) in enumerate(offsets.tolist()):
        out[i, :, r : r + digit, c : c + digit] = big[i]
    return TensorDataset(out, y)


def build_shifted_digits(options: Mapping[str, Any]) -> Task:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"task_options: unknown keys {unknown} for task 'shifted_digits'; known: {sorted(DEFAULTS)}"
        )
    opts = {**DEFAULTS, **options}
    if not 8 <= opts["digit"] <= opts["canvas"]:
        raise ValueError(
            f"task_options: digit {opts['digit']} must lie in [8, canvas={opts['canvas']}]"
        )
    train, val = digits_data(opts["seed"], opts["val_fraction"])
    train = shift(train, opts["canvas"], opts["digit"], opts["seed"])
    val = shift(val, opts["canvas"], opts["digit"], opts["seed"] + 1)
    gen = torch.Generator().manual_seed(opts["seed"])
    task = Task(
        model=seeded(opts["seed"], lambda: ShiftedNet(opts["width"])),
        example_inputs=train[0][0].unsqueeze(0),
        train_loader=DataLoader(train, batch_size=opts["batch_size"], shuffle=True, generator=gen),
        val_loader=DataLoader(val, batch_size=256),
    )
    load_or_train(task, opts, "shifted-digits", MODEL_VERSION)
    return task
