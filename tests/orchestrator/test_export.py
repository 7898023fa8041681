"""The ONNX export check: ONNX Runtime against PyTorch on the example, every output compared,
to a tolerance relative to each output's scale (float32 keeps about 7 digits)."""

from __future__ import annotations

import os

import pytest
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


class _TrackedInstanceNorm(nn.Module):
    """What torch's TorchScript exporter refuses at a dynamic batch size (its dynamo exporter
    does not); its forward writes a line to the process's stderr, as a library's C++ code can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.InstanceNorm2d(4, track_running_stats=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        os.write(2, b"a line of the model's own\n")
        return self.norm(self.conv(x)).mean((2, 3))


def test_what_the_torchscript_exporter_refuses_the_dynamo_exporter_writes(tmp_path, capfd):
    """Hugging Face's GPT-2 and Llama (transformers 4.57) were registered without ONNX: the
    TorchScript exporter failed ("unordered_map::at"). torch's dynamo exporter is taken where
    it fails. And torch printed the whole TorchScript graph to the process's stderr on every
    failed export (hundreds of lines a model): still not shown."""
    path = tmp_path / "m.onnx"
    checked = export_onnx(_TrackedInstanceNorm().eval(), torch.randn(2, 1, 6, 6), path)
    assert checked["exporter"] == "dynamo" and checked["max_abs_diff"] < 1e-4
    import onnx
    import onnxruntime

    assert checked["opset"] == onnx.load(str(path)).opset_import[0].version >= 18
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 6, 6)  # another batch size: the batch stays dynamic
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert got.shape == (5, 4)
    out, err = capfd.readouterr()
    assert "Torch IR graph" not in out + err and "%" not in out + err, (out + err)[:2000]
    assert "a line of the model's own" in err  # what else was written there is written back
    os.write(2, b"after the export\n")  # and the descriptor is the process's again
    assert capfd.readouterr().err == "after the export\n"


class _Histogram(nn.Module):
    """An op neither exporter has (``aten::histc``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.histc(x, bins=4).sum()


def test_a_model_neither_exporter_can_write_says_why_naming_both(tmp_path, capfd):
    with pytest.raises(RuntimeError, match="neither ONNX exporter") as caught:
        export_onnx(_Histogram().eval(), torch.randn(2, 3), tmp_path / "m.onnx")
    assert "TorchScript's: UnsupportedOperatorError" in str(caught.value)
    assert "histc" in str(caught.value) and "dynamo's: " in str(caught.value)
    out, err = capfd.readouterr()
    assert "Torch IR graph" not in out + err, (out + err)[:2000]
