"""A Conv or Linear subclass's own per-output state (timm's ScaledStdConv2d ``gain``) is cut
with the output channels it belongs to."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from search_space import PruningPlan, discover, uniform_plan
from workers import apply_plan, load_pruned, save_pruned


class _GainConv(nn.Conv2d):
    """As timm's ScaledStdConv2d: the weight standardised per output channel, then scaled by a
    learned ``gain`` and a fixed per-channel ``boost`` buffer (both one per output channel)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)
        self.gain = nn.Parameter(torch.linspace(0.5, 2.0, cout).view(cout, 1, 1, 1))
        self.register_buffer("boost", torch.linspace(1.0, 3.0, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.boost.view(-1, 1, 1, 1)).view(-1),
            training=True,
            eps=1e-5,
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _ScaledLinear(nn.Linear):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale[:, None], self.bias)


class _NormFree(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # conv2 is plain: a standardised conv's output moves when its inputs are cut (its
        # weight is standardised over them), so it would not show the kept channels unchanged.
        self.conv1, self.conv2 = _GainConv(3, 16), nn.Conv2d(16, 16, 3, padding=1)
        self.fc1, self.head = _ScaledLinear(16, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x))).mean((2, 3))
        return self.head(F.relu(self.fc1(h)))


def _kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    b, a = before.flatten(1), after.flatten(1)
    return [i for i in range(len(b)) if any(torch.equal(b[i], r) for r in a)]


def test_per_output_state_of_conv_and_linear_subclasses_is_cut_with_their_channels(tmp_path):
    # Before: Torch-Pruning cut weight and bias only, each plan failed the dry run ("weight
    # should contain 8 elements not 16") and all three layers were left out.
    torch.manual_seed(0)
    model, x = _NormFree().eval(), torch.randn(2, 3, 8, 8)
    found = discover(model, x, warn=False)
    assert set(found.names) == {"conv1", "conv2", "fc1"}
    assert [e.name for e in found.excluded] == ["head"]
    plan = PruningPlan(
        ratios={"conv1": 0.5, "fc1": 0.25}, units={"conv1": ("conv1",), "fc1": ("fc1",)}
    )
    pruned = apply_plan(model, x, plan)
    conv_kept = _kept_rows(model.conv1.weight, pruned.conv1.weight)
    fc_kept = _kept_rows(model.fc1.weight, pruned.fc1.weight)
    assert (len(conv_kept), len(fc_kept)) == (8, 9)
    torch.testing.assert_close(pruned.conv1.gain, model.conv1.gain[conv_kept])
    torch.testing.assert_close(pruned.conv1.boost, model.conv1.boost[conv_kept])
    torch.testing.assert_close(pruned.fc1.scale, model.fc1.scale[fc_kept])
    assert isinstance(pruned.conv1.gain, nn.Parameter) and "conv1.boost" in dict(
        pruned.named_buffers()
    )
    # The kept channels compute what they did: the model equals the original with the cut
    # channels' outgoing weights zeroed.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.conv2.weight[:, [i for i in range(16) if i not in conv_kept]] = 0
        reference.head.weight[:, [i for i in range(12) if i not in fc_kept]] = 0
    torch.testing.assert_close(pruned(x), reference(x))
    loaded, _ = load_pruned(
        save_pruned(pruned, plan, tmp_path / "m.safetensors", base_model=model),
        copy.deepcopy(model),
    )
    torch.testing.assert_close(loaded(x), pruned(x))


def test_a_uniform_plan_prunes_a_norm_free_net_and_its_gradients_follow():
    torch.manual_seed(0)
    model, x = _NormFree().eval(), torch.randn(2, 3, 8, 8)
    found = discover(model, x, warn=False)
    pruned = apply_plan(model, x, uniform_plan(found, 0.5))
    assert pruned.conv1.gain.shape == (8, 1, 1, 1) and pruned.fc1.scale.shape == (6,)
    pruned.train()
    pruned(x).sum().backward()  # every parameter fits its layer's new width
    assert all(p.grad is not None for p in pruned.parameters())


class _Transposed(nn.Linear):
    """Per-output state stored with the channels on its last dim: not recognised as such."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout)
        self.scale = nn.Parameter(torch.ones(1, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * self.scale


class _Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.head = _Transposed(6, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc1(x)))


def test_state_of_another_shape_is_left_and_the_layer_is_left_out_with_why():
    with pytest.warns(UserWarning, match="no prunable groups"):
        found = discover(_Odd().eval(), torch.randn(2, 6), warn=False)
    reasons = {e.name: e.reason for e in found.excluded}
    assert found.names == () and "pruning it breaks the model" in reasons["fc1"]
