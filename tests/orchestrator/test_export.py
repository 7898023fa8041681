"""The ONNX export check: ONNX Runtime against PyTorch on the example, every output compared,
to a tolerance relative to each output's scale (float32 keeps about 7 digits)."""

from __future__ import annotations

import torch
from torch import nn

from orchestrator import export_onnx


class Large(nn.Module):
    """Outputs in the millions, as an untrained or collapsed model's logits can be, and a
    second output at ordinary scale."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        with torch.no_grad():
            self.body[2].weight.mul_(1e6)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.body(x), "small": y * 2}


def test_outputs_in_the_millions_pass_within_their_own_precision(tmp_path):
    x, y = torch.randn(2, 64), torch.randn(2, 3)
    checked = export_onnx(Large(), (x, y), tmp_path / "m.onnx")
    assert checked["opset"] >= 13 and checked["max_abs_diff"] < 1e-3 * 1e7
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [i.name for i in graph.input] == ["input0", "input1"]
    assert [o.name for o in graph.output] == ["logits", "small"]
