"""A model family outside the built-in tasks, for ``benchmarks.quality --tasks benchmarks.mixed_task:build``.

What the built-in tasks lack, in one small network on scikit-learn's digits upsampled to 16x16:
a grouped conv, a depthwise-separable residual block with squeeze-and-excitation, a dense concat
of two branches, and a multi-head self-attention block over the spatial positions. ``norm: none``
builds it without BatchNorm (the screen's proxy is then the plain post-prune loss).

The search must work on it unchanged: nothing in prunesearch knows this module. The base model
trains once per options and is cached beside the built-in tasks' (``workers.load_or_train``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from workers import Task, load_or_train

DEFAULTS = {"seed": 0, "width": 32, "norm": "batch", "base_epochs": 12, "base_lr": 0.05}


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


class MixedNet(nn.Module):
    def __init__(self, width: int = 32, norm: str = "batch", classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), _norm(norm, w), nn.ReLU())
        self.grouped = nn.Sequential(  # grouped conv: channels pruned in whole groups
            nn.Conv2d(w, 2 * w, 3, padding=1, stride=2, groups=4), _norm(norm, 2 * w), nn.ReLU()
        )
        self.dw = nn.Sequential(  # depthwise-separable, residual, with squeeze-and-excitation
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w), _norm(norm, 2 * w), nn.ReLU()
        )
        self.pw = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 1), _norm(norm, 2 * w))
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(2 * w, w // 2, 1),
            nn.ReLU(),
            nn.Conv2d(w // 2, 2 * w, 1),
            nn.Sigmoid(),
        )
        self.branch_a = nn.Sequential(nn.Conv2d(2 * w, w, 3, padding=1), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(2 * w, w, 1), nn.ReLU())
        self.proj = nn.Conv2d(4 * w, 2 * w, 1, stride=2)  # dense concat: input and both branches
        self.attn = nn.MultiheadAttention(2 * w, num_heads=4, batch_first=True)
        self.fc = nn.Linear(2 * w, classes)
        if norm != "batch":
            # Without normalisation PyTorch's default init shrinks the signal layer by layer and
            # SGD never leaves chance; He init keeps its scale (He et al., 2015).
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.stem(x))
        y = self.pw(self.dw(x))
        x = torch.relu(x + y * self.se(y))
        x = self.proj(torch.cat([x, self.branch_a(x), self.branch_b(x)], dim=1))
        tokens = x.flatten(2).transpose(1, 2)  # (batch, positions, channels)
        attended, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.fc((tokens + attended).mean(dim=1))


def digits_data(
    seed: int, size: int = 16, channels: int = 1
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits upsampled to ``size`` x ``size``, repeated over ``channels``, split
    80/20 stratified by ``seed`` (no download)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, channels, 1, 1)
    y = torch.tensor(data.target, dtype=torch.long)
    tr, va = train_test_split(
        list(range(len(y))), test_size=0.2, random_state=seed, stratify=data.target
    )
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va])


def build(options: Mapping[str, Any]) -> Task:
    return cached_digits_task(
        options,
        DEFAULTS,
        lambda opts: MixedNet(int(opts["width"]), str(opts["norm"])),
        ("mixed", 2),
    )


def cached_digits_task(
    options: Mapping[str, Any],
    defaults: Mapping[str, Any],
    make_model: Callable[[Mapping[str, Any]], nn.Module],
    cache: tuple[str, int],
    size: int = 16,
    channels: int = 1,
) -> Task:
    """A benchmark task on ``digits_data``: ``options`` checked against ``defaults`` and merged,
    the model made by ``make_model(opts)`` and trained once per options, then cached under
    ``cache`` (file prefix, model version; ``workers.load_or_train``)."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"task_options: unknown keys {unknown}; known: {sorted(defaults)}")
    opts = {**defaults, **options}
    torch.manual_seed(int(opts["seed"]))
    train, val = digits_data(int(opts["seed"]), size, channels)
    gen = torch.Generator().manual_seed(int(opts["seed"]))
    task = Task(
        model=make_model(opts),
        example_inputs=train[0][0].unsqueeze(0),
        train_loader=DataLoader(train, batch_size=64, shuffle=True, generator=gen),
        val_loader=DataLoader(val, batch_size=256),
    )
    load_or_train(task, opts, *cache)
    return task


def build_plain(options: Mapping[str, Any]) -> Task:
    """The same family without BatchNorm (``norm: none``), as a task reference of its own
    (``benchmarks.mixed_task:build_plain``): the screen's proxy there has no statistics to
    re-estimate, which is where ``search.screen.steps`` is measured. Trained at a lower rate and
    for longer than with BatchNorm: without it, SGD at 0.05 diverges."""
    return build({"norm": "none", "base_lr": 0.02, "base_epochs": 20, **options})
