"""torchvision's MobileNetV2 (``weights=None``) for ``benchmarks.quality --tasks
benchmarks.zoo_task:build``: a second model family outside the built-in tasks, as a user brings it.

Inverted residual blocks with depthwise convs, ReLU6 and BatchNorm, on scikit-learn's digits
upsampled to 32x32 and repeated over three channels (no download). ``width`` is torchvision's
``width_mult``. Nothing in prunesearch knows this module: the search must work on it unchanged.
The base model trains once per options and is cached (``workers.load_or_train``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torchvision

from benchmarks.mixed_task import cached_digits_task
from workers import Task

DEFAULTS = {"seed": 0, "width": 0.5, "base_epochs": 15, "base_lr": 0.05}


def build(options: Mapping[str, Any]) -> Task:
    return cached_digits_task(
        options,
        DEFAULTS,
        lambda opts: torchvision.models.mobilenet_v2(
            weights=None, num_classes=10, width_mult=float(opts["width"])
        ),
        ("zoo-mobilenet_v2", 1),
        size=32,
        channels=3,
    )
