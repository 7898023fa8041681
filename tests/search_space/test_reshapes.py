"""Reshapes Torch-Pruning took for flattens: EfficientViT's linear attention reshapes its fused
qkv 4-D to 4-D, and its discovery never ended."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from torch import nn
from torch.nn import functional as F

from search_space import discover


class LiteAttention(nn.Module):
    """EfficientViT's (MIT) multi-scale linear attention, as timm writes it: a fused qkv conv
    and its aggregated copy concatenated, reshaped by heads 4-D to 4-D, chunked, attended."""

    def __init__(self, c: int, dim: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.aggreg = nn.Sequential(
            nn.Conv2d(3 * c, 3 * c, 5, padding=2, groups=3 * c),
            nn.Conv2d(3 * c, 3 * c, 1, groups=3 * c // dim),
        )
        self.proj = nn.Conv2d(2 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(x)
        qkv = torch.cat([qkv, self.aggreg(qkv)], 1)
        q, k, v = qkv.reshape(b, -1, 3 * self.dim, h * w).transpose(-1, -2).chunk(3, dim=-1)
        out = F.relu(q) @ (F.relu(k).transpose(-1, -2) @ v)
        return self.proj(out.transpose(-1, -2).reshape(b, -1, h, w))


class LiteViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList([LiteAttention(16) for _ in range(4)])
        self.mlp = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 16, 1))
        self.flat = nn.Linear(16 * 4 * 4, 24)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        x = x + self.mlp(x)
        # A true flatten, kept mapped: C x H x W into the Linear's inputs, 16 apart.
        return self.head(F.relu(self.flat(F.adaptive_avg_pool2d(x, 4).flatten(1))))


def _discovered() -> dict[str, object]:
    torch.manual_seed(0)
    found = discover(LiteViT().eval(), torch.randn(2, 3, 8, 8), warn=False)
    return {
        "groups": {g.name: sorted(g.members) for g in found.groups},
        "excluded": {e.name: e.reason for e in found.excluded},
    }


def test_a_4d_to_4d_reshape_is_no_flatten_and_discovery_ends():
    # Before: Torch-Pruning's flatten maps on the qkv reshape (and on the matmuls' own
    # reshapes), sent round each block's concatenation, grew at every pass: with two blocks
    # discovery took 149 s, with these four it had not ended at 240 s (EfficientViT b0's
    # never did). In a child process, so that a regression fails, not hangs.
    code = "import json; from tests.search_space.test_reshapes import _discovered as d; "
    code += "print(json.dumps(d()))"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=True
    )
    found = json.loads(run.stdout.strip().splitlines()[-1])
    groups, excluded = found["groups"], found["excluded"]
    for i in range(4):  # qkv's channels are re-laid by heads: the route check or dry run says so
        why = excluded[f"blocks.{i}.qkv"]
        assert "pruning it breaks the model" in why or "elsewhere than Torch-Pruning" in why
        assert excluded[f"blocks.{i}.aggreg.0"].startswith("pruned only with")
    # The residual stream is searched, through both blocks and the true flatten into flat.
    (stream,) = [m for m in groups.values() if "stem" in m]
    assert {*(f"blocks.{i}.proj" for i in range(4)), "mlp.2", "flat"} <= set(stream)
    assert groups["mlp.0"] == ["mlp.0", "mlp.2"] and groups["flat"] == ["flat", "head"]
