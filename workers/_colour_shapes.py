"""Built-in task ``colour_shapes``: generated 32x32 RGB images of shapes, some finely striped,
on cluttered noisy backgrounds, classified by a CIFAR-style ResNet-20.

A third CPU-sized task, where per-layer pruning allocation matters: the class is a shape (read
by the late, class-level layers) crossed with a texture (solid, or stripes 1.5-2.5 pixels
wide, which only the early full-resolution layers can resolve), so neither end of the network
can be pruned hard for free. No download and no files: the images are drawn from a seeded
``torch.Generator``. The base model is trained once and cached like ``digits`` (by a hash of
the options and MODEL_VERSION).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ._digits import Block as BasicBlock  # the same residual block as digits (same state-dict keys)
from ._digits import load_or_train, seeded
from ._tasks import Task

# train_size 3500, not 4000: one finetune epoch then stays under ~6 s on one CPU core, and the
# 12 base epochs (with their validation passes) under ~90 s.
DEFAULTS = {
    "width": 8,
    "seed": 0,
    "train_size": 3500,
    "val_size": 1000,
    "batch_size": 64,
    "base_epochs": 12,
    "base_lr": 0.1,
    "noise": 0.12,
}
# Bump when ColourShapesNet or the images change, so stale cached weights are not reused.
MODEL_VERSION = 2  # 2: the initial weights are seeded (workers._digits.seeded)

SHAPES = ("disc", "square", "triangle", "cross", "ring")
SIZE = 32
CHUNK = 1024  # images drawn at once


class ColourShapesNet(nn.Module):
    """ResNet-20 (He et al. 2016, CIFAR variant): a stem conv, three stages of three blocks at
    w, 2w, 4w channels (32, 16, 8 pixels), global average pooling and a linear classifier."""

    def __init__(self, width: int = 8, classes: int = 2 * len(SHAPES)) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.layer1 = _stage(w, w, 1)
        self.layer2 = _stage(w, 2 * w, 2)
        self.layer3 = _stage(2 * w, 4 * w, 2)
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _stage(cin: int, cout: int, stride: int, blocks: int = 3) -> nn.Sequential:
    return nn.Sequential(
        BasicBlock(cin, cout, stride), *(BasicBlock(cout, cout, 1) for _ in range(blocks - 1))
    )


def _uniform(gen: torch.Generator, n: int, low: float, high: float, *extra: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, *extra, generator=gen)


def _shape_distance(
    shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """Signed distance in pixels (negative inside) of each image's shape, in its own rotated
    frame (u, v). Computed for every shape and selected, so a batch is one vectorised pass."""
    d = torch.sqrt(u * u + v * v)
    box = torch.maximum(u.abs(), v.abs())
    # Triangle: the largest of three half-plane distances (normals 120 degrees apart).
    normals = (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)
    tri = torch.stack([u * math.cos(a) + v * math.sin(a) for a in normals])
    bar_u = torch.maximum(u.abs() - r, v.abs() - 0.3 * r)
    bar_v = torch.maximum(v.abs() - r, u.abs() - 0.3 * r)
    all_shapes = torch.stack(
        [
            d - r,  # disc
            box - 0.85 * r,  # square, shrunk so its area is close to the disc's
            tri.amax(0) - 0.55 * r,  # triangle
            torch.minimum(bar_u, bar_v),  # cross
            (d - 0.7 * r).abs() - 0.3 * r,  # ring
        ]
    )
    return all_shapes.gather(0, shape.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)


def _background(gen: torch.Generator, n: int, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """A two-colour gradient, darker than the shapes on average but overlapping them (so a few
    shapes are faint), plus small blobs of any colour: clutter at the scale of the stripes, so
    edges alone do not give the texture away."""
    c0 = 0.6 * torch.rand(n, 3, 1, 1, generator=gen)
    c1 = 0.6 * torch.rand(n, 3, 1, 1, generator=gen)
    angle = _uniform(gen, n, 0, 2 * math.pi).view(n, 1, 1)
    t = ((xx - SIZE / 2) * torch.cos(angle) + (yy - SIZE / 2) * torch.sin(angle)) / SIZE + 0.5
    img = c0 + (c1 - c0) * t.clamp(0, 1).unsqueeze(1)
    for _ in range(4):
        cy, cx = _uniform(gen, n, 0, SIZE).view(n, 1, 1), _uniform(gen, n, 0, SIZE).view(n, 1, 1)
        rad = _uniform(gen, n, 0.8, 2.5).view(n, 1, 1)
        alpha = (rad - torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) + 0.5).clamp(0, 1).unsqueeze(1)
        img = img + alpha * (torch.rand(n, 3, 1, 1, generator=gen) - img)
    return img


def generate(n: int, seed: int, noise: float) -> TensorDataset:
    """``n`` images (N, 3, 32, 32) in [0, 1] and labels 0..9, balanced: label = 2 * shape + striped."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randperm(n, generator=gen) % (2 * len(SHAPES))
    # Drawn in chunks from one generator: memory stays bounded for any train_size.
    chunks = [_draw(gen, labels[i : i + CHUNK], noise) for i in range(0, n, CHUNK)]
    images = torch.cat(chunks) if chunks else torch.empty(0, 3, SIZE, SIZE)
    return TensorDataset(images, labels)


def _draw(gen: torch.Generator, labels: torch.Tensor, noise: float) -> torch.Tensor:
    n = len(labels)
    shape, striped = labels // 2, (labels % 2).float().view(n, 1, 1)
    pixels = torch.arange(SIZE, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(pixels, pixels, indexing="ij")
    img = _background(gen, n, yy, xx)
    r = _uniform(gen, n, 6.0, 11.0).view(n, 1, 1)
    cy, cx = (_uniform(gen, n, 0, 1, 2) * (SIZE - 2 * r.view(n, 1)) + r.view(n, 1)).unbind(1)
    rot = _uniform(gen, n, 0, 2 * math.pi).view(n, 1, 1)
    dy, dx = yy - cy.view(n, 1, 1), xx - cx.view(n, 1, 1)
    u, v = dx * torch.cos(rot) + dy * torch.sin(rot), -dx * torch.sin(rot) + dy * torch.cos(rot)
    # Coverage with a one-pixel antialiased edge: small shapes keep their outline.
    alpha = (0.5 - _shape_distance(shape, u, v, r)).clamp(0, 1).unsqueeze(1)
    # Stripes: a period of 3-5 px at a random angle (finer aliases into noise), alternating the
    # fill with a blend towards its complement, so the stripes are seldom invisible.
    period = _uniform(gen, n, 3.0, 5.0).view(n, 1, 1)
    phi = _uniform(gen, n, 0, math.pi).view(n, 1, 1)
    wave = (torch.sin(2 * math.pi * (u * torch.cos(phi) + v * torch.sin(phi)) / period) > 0).float()
    fill = 0.4 + 0.6 * torch.rand(n, 3, 1, 1, generator=gen)
    contrast = _uniform(gen, n, 0.35, 1.0).view(n, 1, 1, 1)
    colour = fill + (striped * wave).unsqueeze(1) * contrast * (1 - 2 * fill)
    img = img + alpha * (colour - img)
    img = img + noise * torch.randn(img.shape, generator=gen)
    return img.clamp(0, 1)


def build_colour_shapes(options: Mapping[str, Any]) -> Task:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"task_options: unknown keys {unknown} for task 'colour_shapes'; known: {sorted(DEFAULTS)}"
        )
    opts = {**DEFAULTS, **options}
    for key in ("train_size", "val_size"):
        if opts[key] < 1:
            raise ValueError(f"task_options: {key} must be at least 1, got {opts[key]}")
    # One draw split in two: train and val come from the same distribution and never share an image.
    total = opts["train_size"] + opts["val_size"]
    images, labels = generate(total, opts["seed"], opts["noise"]).tensors
    cut = opts["train_size"]
    train = TensorDataset(images[:cut], labels[:cut])
    val = TensorDataset(images[cut:], labels[cut:])
    gen = torch.Generator().manual_seed(opts["seed"])
    task = Task(
        model=seeded(opts["seed"], lambda: ColourShapesNet(opts["width"])),
        example_inputs=train[0][0].unsqueeze(0),
        train_loader=DataLoader(train, batch_size=opts["batch_size"], shuffle=True, generator=gen),
        val_loader=DataLoader(val, batch_size=256),
    )
    load_or_train(task, opts, "colour-shapes", MODEL_VERSION)
    return task
