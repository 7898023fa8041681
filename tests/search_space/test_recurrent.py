"""Recurrent layers (LSTM, GRU, RNN): hidden units pruned as one layer, exactly.

Removing hidden unit ``k`` from a recurrent layer computes what the unpruned layer computes
when nothing reads unit ``k``: its column of every ``weight_hh`` (the recurrence) and of the
next layer's ``weight_ih`` set to zero. The pruned layer's outputs and final states must equal
that masked layer's on the kept units, for every cell type, depth and direction.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from search_space import RecurrentPruner, discover, uniform_plan
from workers import apply_plan, load_pruned, save_pruned

CELLS = (nn.LSTM, nn.GRU, nn.RNN)
SHAPES = [(1, False), (3, False), (1, True), (2, True)]  # (num_layers, bidirectional)


def _masked(rnn: nn.RNNBase, units: list[int]) -> nn.RNNBase:
    """``rnn`` with nothing reading ``units``: what pruning them must compute on the rest."""
    out = copy.deepcopy(rnn)
    hidden, dirs = rnn.hidden_size, 2 if rnn.bidirectional else 1
    with torch.no_grad():
        for name, param in out.named_parameters():
            if name.startswith("weight_hh"):
                param[:, units] = 0
            elif name.startswith("weight_ih") and not name.startswith("weight_ih_l0"):
                param[:, [u + d * hidden for d in range(dirs) for u in units]] = 0
    return out


def _states(value):
    return list(value) if isinstance(value, tuple) else [value]


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("layers,bidirectional", SHAPES)
def test_pruned_hidden_units_compute_what_the_layer_computes_without_them(
    cell, layers, bidirectional
):
    torch.manual_seed(0)
    rnn = cell(6, 10, num_layers=layers, batch_first=True, bidirectional=bidirectional).eval()
    x = torch.randn(3, 5, 6)
    units, dirs = [1, 4, 7], 2 if bidirectional else 1
    idxs = [u + d * 10 for d in range(dirs) for u in units]
    keep = [k for k in range(10) if k not in units]
    channels = [k + d * 10 for d in range(dirs) for k in keep]

    reference_out, reference_states = _masked(rnn, units)(x)
    pruned = RecurrentPruner().prune_out_channels(copy.deepcopy(rnn), idxs)
    out, states = pruned(x)

    assert pruned.hidden_size == 7 and RecurrentPruner().get_out_channels(pruned) == 7 * dirs
    torch.testing.assert_close(out, reference_out[..., channels])
    for got, want in zip(_states(states), _states(reference_states), strict=True):
        torch.testing.assert_close(got, want[..., keep])  # every layer's final state


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.__name__)
def test_pruned_input_features_are_the_inputs_it_no_longer_reads(cell):
    torch.manual_seed(0)
    rnn = cell(6, 8, num_layers=2, batch_first=True, bidirectional=True).eval()
    x = torch.randn(3, 5, 6)
    x[..., [0, 3]] = 0.0  # inputs the pruned layer no longer reads contribute nothing
    pruned = RecurrentPruner().prune_in_channels(copy.deepcopy(rnn), [0, 3])
    assert pruned.input_size == 4
    torch.testing.assert_close(pruned(x[..., [1, 2, 4, 5]])[0], rnn(x)[0])


def test_a_direction_losing_other_units_than_its_twin_is_refused():
    rnn = nn.GRU(4, 6, bidirectional=True)
    with pytest.raises(AssertionError, match="same units from each direction"):
        RecurrentPruner().prune_out_channels(rnn, [0, 7])  # unit 0 forward, unit 1 backward


class TextNet(nn.Module):
    """Token ids -> embedding -> recurrent layer -> a hidden Linear -> logits."""

    def __init__(self, cell=nn.LSTM, *, layers=2, bidirectional=False, read_state=False):
        super().__init__()
        self.read_state = read_state
        self.embed = nn.Embedding(40, 12)
        self.rnn = cell(12, 16, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.hidden = nn.Linear(16 * (2 if bidirectional else 1), 12)
        self.head = nn.Linear(12, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, states = self.rnn(self.embed(tokens))
        if self.read_state:
            h = states[0] if isinstance(states, tuple) else states
            feature = torch.cat([h[-2], h[-1]], 1) if self.rnn.bidirectional else h[-1]
        else:
            feature = out[:, -1]
        return self.head(torch.relu(self.hidden(feature)))


def _discover(model: nn.Module, tokens: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedding is listed as left out
        return discover(model, tokens)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bidirectional,read_state", [(False, False), (False, True), (True, False)])
def test_a_recurrent_layer_roots_a_group_and_a_plan_prunes_it_and_reloads(
    cell, bidirectional, read_state, tmp_path
):
    torch.manual_seed(0)
    model = TextNet(cell, bidirectional=bidirectional, read_state=read_state).eval()
    tokens = torch.randint(0, 40, (4, 9))
    discovery = _discover(model, tokens)
    groups = {g.name: g for g in discovery.groups}
    assert groups["rnn"].members == ("hidden", "rnn")
    assert groups["rnn"].channels == 16 * (2 if bidirectional else 1)

    plan = uniform_plan(discovery, 0.5)
    pruned = apply_plan(model, tokens, plan, discovery=discovery)
    assert pruned.rnn.hidden_size == 8
    assert pruned.hidden.in_features == 8 * (2 if bidirectional else 1)
    assert pruned(tokens).shape == (4, 5)

    path = save_pruned(pruned, plan, tmp_path / "m.safetensors", base_model=model)
    loaded, _ = load_pruned(path, copy.deepcopy(model))
    torch.testing.assert_close(loaded(tokens), pruned(tokens))


def test_final_states_of_a_bidirectional_layer_leave_its_group_out_with_why():
    model = TextNet(nn.LSTM, bidirectional=True, read_state=True).eval()
    discovery = _discover(model, torch.randint(0, 40, (4, 9)))
    assert "rnn" not in {g.name for g in discovery.groups}
    reason = {e.name: e.reason for e in discovery.excluded}["rnn"]
    assert "bidirectional" in reason and "output[:, -1]" in reason


def test_an_lstm_with_a_projection_is_left_out_with_why():
    model = TextNet(nn.LSTM).eval()
    model.rnn = nn.LSTM(12, 16, num_layers=2, batch_first=True, proj_size=8)
    model.hidden = nn.Linear(8, 12)
    discovery = _discover(model, torch.randint(0, 40, (4, 9)))
    assert "rnn" not in {g.name for g in discovery.groups}
    assert "proj_size" in {e.name: e.reason for e in discovery.excluded}["rnn"]
