"""A torchvision model on your own images: an ``ImageFolder`` layout, no download.

    data/train/<class>/*.png   data/val/<class>/*.png

Config: ``task: examples.imagefolder_task:build`` with ``task_options: {data: data, checkpoint:
base.pt}``. ``checkpoint`` is your trained base model's ``state_dict``; when the file does not
exist yet, this example trains a few epochs and saves it there, so the Ray workers (which build
the task again) load it instead of training.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from workers import Task, finetune


def build(options: Mapping[str, Any]) -> Task:
    root, size = Path(options["data"]), int(options.get("size", 32))
    preprocess = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    train = datasets.ImageFolder(str(root / "train"), preprocess)
    val = datasets.ImageFolder(str(root / "val"), preprocess)
    task = Task(
        model=torchvision.models.resnet18(weights=None, num_classes=len(train.classes)),
        example_inputs=torch.zeros(1, 3, size, size),  # one batch the model accepts
        train_loader=DataLoader(train, batch_size=32, shuffle=True),
        val_loader=DataLoader(val, batch_size=64),
    )
    checkpoint = Path(options.get("checkpoint", root / "base.pt"))
    if checkpoint.exists():
        task.model.load_state_dict(torch.load(checkpoint, weights_only=True))
    else:
        torch.manual_seed(int(options.get("seed", 0)))
        finetune(task.model, task, epochs=int(options.get("epochs", 3)), lr=0.05)
        torch.save(task.model.state_dict(), checkpoint)
    task.model.eval()
    return task
