"""Discovery on sequences and tokens: one-channel gates cut from the channels they scale, where
the channel dim is known, and the layers of a group left out all listed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from search_space import discover, uniform_plan
from workers import apply_plan

from .token_models import RMSNorm


class _AttentionPooling(nn.Module):
    """Tokens (B, T, C) pooled over T by a score per token, (B, T, 1), from a Linear(C, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid = nn.Linear(8, 32), nn.Linear(32, 32)
        self.score, self.head = nn.Linear(32, 1), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.mid(F.relu(self.emb(x))))
        w = torch.softmax(self.score(h), dim=1)
        return self.head((h * w).sum(1))


class _SequenceGate(nn.Module):
    """A Conv1d's (B, C, L) output scaled by a one-channel gate (B, 1, L) made from it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gate, self.head = (
            nn.Conv1d(8, 32, 3, padding=1),
            nn.Conv1d(32, 1, 1),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        return self.head((h * torch.sigmoid(self.gate(h))).mean(2))


def test_a_layer_scaled_by_a_one_channel_gate_on_tokens_or_sequences_is_pruned():
    # Torch-Pruning tied the C channels of "mid" (or "conv") to the one channel of the gate's
    # layer, so the group was rooted there, one channel wide, and left out: "mid" was in no
    # list at all, "conv" was "pruned only with 'gate'".
    cases = [(_AttentionPooling(), torch.randn(2, 6, 8), "mid", "score"),
             (_SequenceGate(), torch.randn(2, 8, 12), "conv", "gate")]  # fmt: skip
    for model, x, scaled, gate in cases:
        found = discover(model.eval(), x, warn=False)
        assert scaled in found.names
        assert {e.name: e.reason for e in found.excluded}[gate] == "only 1 output channel(s)"
        pruned = apply_plan(model, x, uniform_plan(found, 0.5))
        layer, gate_layer = pruned.get_submodule(scaled), pruned.get_submodule(gate)
        assert layer.weight.shape[0] == 16 and gate_layer.weight.shape[:2] == (1, 16)
        assert pruned(x).shape == (2, 10)


class _TokenFiLM(nn.Module):
    """Tokens scaled per channel by a (B, 1, C) vector: a per-channel scale, linked."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.cond, self.head = nn.Linear(8, 32), nn.Linear(8, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.cond(x.mean(1, keepdim=True))
        return self.head((self.emb(x) * g).mean(1))


class _SquareTransposed(nn.Module):
    """Tokens (B, T, C) with T == C turned to (B, C, T) and scaled per channel by (B, C, 1):
    the shape is the same after the transpose, the channel dim is not."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.cond, self.head = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x).transpose(1, 2)
        return self.head((h * self.cond(x.mean(1)).unsqueeze(2)).mean(2))


class _RMSBlock(nn.Module):
    """A pre-norm MLP block with a hand-written RMSNorm: a pooling over channels on tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm = nn.Linear(8, 32), RMSNorm(32)
        self.up, self.down, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        return self.head(h.mean(1))


@pytest.mark.parametrize(
    ("model", "shape", "layers"),
    [
        (_TokenFiLM, (2, 6, 8), ("emb", "cond")),
        (_SquareTransposed, (2, 16, 8), ("emb", "cond")),
        (_RMSBlock, (2, 6, 8), ("emb", "down")),  # and the norm's weight, a bare Parameter
    ],
    ids=["film", "square-transposed", "rmsnorm"],
)
def test_per_channel_scales_and_poolings_on_tokens_keep_their_channels_linked(model, shape, layers):
    # A scale per channel is not one channel: its layer is cut with the channels it scales.
    # After a transpose the channel dim is not known, and nothing is cut (here a wrong guess,
    # the last dim, would take the (B, C, 1) scale for a one-channel map).
    model, x = model().eval(), torch.randn(*shape)
    found = discover(model, x, warn=False)
    (group,) = [g for g in found.groups if layers[0] in g.members]
    assert set(layers) <= set(group.members)
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    widths = {
        name: p.shape[0]
        for name, p in pruned.named_parameters()
        if name.split(".")[0] in (*layers, "norm")
    }
    assert set(widths.values()) == {group.channels // 2}
    assert pruned(x).shape == (2, 10)


class _BilinearAfterLayer(nn.Module):
    """A kept group ("pre") read by two layers whose own group a Bilinear leaves out."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(16, 16)
        self.a, self.b = nn.Linear(16, 32), nn.Linear(16, 24)
        self.bil, self.fc = nn.Bilinear(32, 24, 20), nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pre(x))
        return self.fc(torch.relu(self.bil(torch.relu(self.a(h)), torch.relu(self.b(h)))))


def test_a_layer_whose_inputs_a_kept_group_cuts_is_still_listed_when_its_outputs_are_left():
    # "a" and "b" read "pre"'s channels, so they were members of a kept group, and the one of
    # them that is not the left-out group's root was in no list of what the search leaves.
    found = discover(_BilinearAfterLayer().eval(), torch.randn(2, 16), warn=False)
    assert found.names == ("pre",)
    reasons = {e.name: e.reason for e in found.excluded}
    (root,) = {"a", "b"} - {n for n, r in reasons.items() if r.startswith("pruned only with")}
    other = ({"a", "b"} - {root}).pop()
    assert reasons[other] == f"pruned only with {root!r}, which is left out (see it)"
