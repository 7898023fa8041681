"""Concatenations sized as the trace saw them: Torch-Pruning's own guess, walking back from each
piece, gave up on a deep chain of concatenations of slices (timm's DPN) and failed the trace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search_space import discover, uniform_plan
from workers import apply_plan

from ..nets import GainedDense


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


class _Cache:
    """A key/value cache as Hugging Face's starts one: from an empty 1-D tensor, which ``cat``
    skips, concatenated with the first keys and values."""

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        empty = torch.tensor([], dtype=k.dtype)
        self.layers.append((torch.cat([empty, k], dim=-2), torch.cat([empty, v], dim=-2)))
        return self.layers[-1]


class _CachedLM(nn.Module):
    def __init__(self, cache: bool, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.cache, self.d, self.heads = cache, d, heads
        self.emb, self.qkv, self.proj = (
            nn.Embedding(10, d),
            GainedDense(d, 3 * d),
            GainedDense(d, d),
        )
        self.fc, self.head = nn.Linear(d, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> dict:
        h, cache = self.emb(x), _Cache()
        (b, t, _), d = h.shape, self.d
        q, k, v = (p.view(b, t, self.heads, -1).transpose(1, 2) for p in self.qkv(h).split(d, 2))
        if self.cache:
            k, v = cache.update(k, v)
        a = (torch.softmax(q @ k.transpose(-1, -2), -1) @ v).transpose(1, 2).reshape(b, t, d)
        h = h + self.proj(a)
        return {"logits": self.head(torch.relu(self.fc(h))), "cache": cache}


def test_a_cache_started_from_an_empty_tensor_is_traced_as_without_it():
    # Before: "could not be traced by Torch-Pruning: TypeError: unsupported operand type(s)
    # for +: 'int' and 'NoneType'" (GPT-2 with use_cache on): the empty piece, skipped by
    # cat, left Torch-Pruning one input for two pieces, and it could not size the keys.
    # Its embedding's group is left out (the dry run fails on the GainedDense layers), and saying
    # why then stopped at a split Torch-Pruning could not size ("int // None").
    torch.manual_seed(0)
    x = torch.randint(0, 10, (2, 5))
    cached, plain = (discover(_CachedLM(c).eval(), x, warn=False) for c in (True, False))
    assert cached.names == plain.names and "fc" in cached.names
    reasons = {e.name: e.reason for e in cached.excluded}
    assert reasons == {e.name: e.reason for e in plain.excluded}
    assert reasons["qkv"].startswith("GainedDense: multiplies its inputs by its own weight")
    assert reasons["emb"].startswith("pruning it breaks the model")
    model = _CachedLM(True).eval()
    pruned = apply_plan(model, x, uniform_plan(discover(model, x, warn=False), 0.5))
    assert pruned.fc.out_features == 16 and pruned(x)["logits"].shape == (2, 5, 10)


class _Stacked(nn.Module):
    """Two convs' maps stacked along the height: one map of the same 16 channels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 3, padding=1)
        self.c, self.head = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=self.dim)
        return self.head(torch.relu(self.c(h)).mean((2, 3)))


@pytest.mark.parametrize("dim", [2, -2])
def test_a_concatenation_along_no_channel_dim_keeps_the_channels_where_they_are(dim):
    # Before, with dim=-2: Torch-Pruning takes a negative dim for "any", mapped the channels
    # by the pieces' heights (a's channel 0 to c's 0, b's channel 0 to c's 8), and the dry
    # run left a and b out ("Sizes of tensors must match except in dimension 2"). A key
    # cache joined along the positions (B, heads, T, head dim) is such a concatenation: an
    # OPT with its cache on had k cut apart from v, the model's positions with it.
    torch.manual_seed(0)
    model, x = _Stacked(dim).eval(), torch.randn(2, 3, 8, 8)
    found = discover(model, x, warn=False)
    assert found.group("b").members == ("a", "b", "c")
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert pruned.a.out_channels == pruned.b.out_channels == pruned.c.in_channels == 8
    assert pruned(x).shape == (2, 4)
