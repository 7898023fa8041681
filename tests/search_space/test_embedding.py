"""Embedding layers root groups: their width (``embedding_dim``) is pruned, exactly.

Removing dimension ``k`` of an embedding computes what the unpruned model computes when
nothing reads ``k``: its column of the embedding set to zero. The pruned model's outputs must
equal that masked model's, whatever reads the embedding (a Linear, a Conv1d over the sequence,
an LSTM), and an output layer tied to the embedding stays one parameter with it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from search_space import PruningPlan, discover, uniform_plan
from workers import apply_plan, load_pruned, save_pruned

TOKENS = torch.randint(1, 60, (3, 9))


class Pooled(nn.Module):
    """Bag of embeddings: the mean over tokens, then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(60, 24, padding_idx=0)
        self.hidden = nn.Linear(24, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.embed(tokens).mean(1))))


class Convolved(nn.Module):
    """A 1-D conv over the sequence reads the embedding as its channels."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(60, 24)
        self.conv = nn.Conv1d(24, 16, 3)
        self.out = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(self.embed(tokens).transpose(1, 2)).amax(2))


class Recurrent(nn.Module):
    """An LSTM reads the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(60, 24)
        self.rnn = nn.LSTM(24, 16, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq, _ = self.rnn(self.embed(tokens))
        return self.out(seq[:, -1])


class TiedLM(nn.Module):
    """The output layer shares the embedding's weight; a residual MLP between (GPT-2's tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(60, 24)
        self.up, self.down = nn.Linear(24, 32), nn.Linear(32, 24)
        self.out = nn.Linear(24, 60, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.out(h + self.down(torch.relu(self.up(h))))


class Bagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(60, 24)
        self.out = nn.Linear(24, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(tokens))


def _discover(model: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return discover(model, TOKENS)


def _zeroed(model: nn.Module, pruned: nn.Module) -> nn.Module:
    """``model`` with every embedding column the pruned model dropped set to zero: which
    columns stayed is read off the pruned weight (each kept column is an original one)."""
    masked = copy.deepcopy(model)
    before, after = model.embed.weight, pruned.embed.weight
    kept = [
        next(j for j in range(before.shape[1]) if torch.equal(before[:, j], after[:, i]))
        for i in range(after.shape[1])
    ]
    gone = [j for j in range(before.shape[1]) if j not in kept]
    with torch.no_grad():
        masked.embed.weight[:, gone] = 0
    return masked


@pytest.mark.parametrize("family", [Pooled, Convolved, Recurrent, TiedLM])
def test_a_pruned_embedding_computes_what_the_model_computes_without_its_columns(family, tmp_path):
    torch.manual_seed(0)
    model = family().eval()
    discovery = _discover(model)
    group = {g.name: g for g in discovery.groups}["embed"]
    assert (group.kind, group.channels) == ("Embedding", 24)
    assert "embed" not in {e.name for e in discovery.excluded}

    plan = uniform_plan(discovery, 0.5)
    pruned = apply_plan(model, TOKENS, plan, discovery=discovery)
    assert pruned.embed.embedding_dim == pruned.embed.weight.shape[1] == 12
    assert pruned.embed.padding_idx == model.embed.padding_idx
    with torch.no_grad():
        if family is TiedLM:  # the residual stream is the embedding's: everything is pruned
            assert pruned.out.weight is pruned.embed.weight
            assert pruned(TOKENS).shape == model(TOKENS).shape
        else:  # only the embedding's group: the rest computes on what stayed
            only = PruningPlan(ratios={"embed": 0.5}, units={"embed": ("embed",)})
            alone = apply_plan(model, TOKENS, only, discovery=discovery)
            torch.testing.assert_close(alone(TOKENS), _zeroed(model, alone)(TOKENS))

    path = save_pruned(pruned, plan, tmp_path / "m.safetensors", base_model=model)
    loaded, _ = load_pruned(path, copy.deepcopy(model))
    torch.testing.assert_close(loaded(TOKENS), pruned(TOKENS))


def test_an_embedding_bag_is_left_out_with_why():
    discovery = _discover(Bagged().eval())
    reason = {e.name: e.reason for e in discovery.excluded}["embed"]
    assert reason.startswith("EmbeddingBag: not pruned") and "Torch-Pruning" in reason
    assert "embed" not in discovery.names
