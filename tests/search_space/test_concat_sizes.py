"""Concatenations sized as the trace saw them: Torch-Pruning's own guess, walking back from each
piece, gave up on a deep chain of concatenations of slices (timm's DPN) and failed the trace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search_space import discover, uniform_plan
from workers import apply_plan


class DualPath(nn.Module):
    """DPN's block: one conv's output split by slicing into a residual part (summed) and a dense
    part (concatenated), so the block's output grows by ``dense`` channels."""

    def __init__(self, cin: int, res: int = 16, dense: int = 8, proj: bool = True) -> None:
        super().__init__()
        self.res = res
        self.proj = nn.Conv2d(cin, res + dense, 1) if proj else nn.Identity()
        self.body = nn.Sequential(
            nn.Conv2d(cin, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, res + dense, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, o = self.proj(x), self.body(x)
        r = self.res
        return torch.cat([s[:, :r] + o[:, :r], s[:, r:], o[:, r:]], 1)


class DualPathNet(nn.Module):
    def __init__(self, blocks: int = 12) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        rest = [DualPath(32 + 8 * i, proj=False) for i in range(blocks - 1)]
        self.blocks = nn.Sequential(DualPath(12), *rest)
        self.conv, self.head = nn.Conv2d(32 + 8 * (blocks - 1), 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.blocks(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.conv(h)).mean((2, 3)))


# Torch-Pruning's shape inference still walks the chain for its other rules, and warns so.
@pytest.mark.filterwarnings("ignore:Maximum recursive depth reached")
def test_a_deep_chain_of_sliced_concatenations_is_traced_and_searched():
    # Before: "could not be traced by Torch-Pruning: TypeError: unsupported operand type(s)
    # for +: 'int' and 'NoneType'", the whole model refused (as timm's dpn68 was).
    torch.manual_seed(0)
    model, x = DualPathNet().eval(), torch.randn(2, 3, 8, 8)
    found = discover(model, x, warn=False)
    assert {f"blocks.{i}.body.0" for i in range(12)} | {"stem", "conv"} <= set(found.names)
    assert found.group("stem").members == ("blocks.0.body.0", "blocks.0.proj", "stem")
    reasons = {e.name: e.reason for e in found.excluded}
    # The sliced convs are left out, saying why: the code slices at a width fixed when built.
    assert "pruning it breaks the model" in reasons["blocks.11.body.2"]
    assert reasons["blocks.0.proj"].startswith("pruned only with")
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert pruned.blocks[3].body[0].out_channels == 6 and pruned(x).shape == (2, 4)
