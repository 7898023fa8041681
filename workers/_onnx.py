"""A model written as ONNX: by the TorchScript exporter, else by torch's dynamo exporter.

The TorchScript exporter is quick (well under a second for the models here) and writes the
opset asked for, but cannot export much of today's Hugging Face code (GPT-2 and Llama in
transformers 4.57 fail with "unordered_map::at": their masks are built under ``vmap``). The
dynamo exporter (``torch.onnx.export(dynamo=True)``, built on ``torch.export`` and onnxscript)
exports those, in seconds, at its own opset (18 or later: converting its graph down to 17
wrote a ``Split`` ONNX Runtime refuses). So the first is tried first, and the second where it
fails and onnxscript is installed (the ``onnx`` extra brings it).
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

TORCHSCRIPT, DYNAMO = "torchscript", "dynamo"


def write_onnx(
    model: nn.Module,
    args: tuple[Any, ...],
    destination: str | Path | io.BytesIO,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int | None = None,
) -> str:
    """Write ``model`` on ``args`` as ONNX to ``destination``; the exporter that wrote it.
    Raises, naming both exporters' errors, where neither can."""
    common = {
        "input_names": list(input_names),
        "output_names": list(output_names) if output_names else None,
        "dynamic_axes": {k: dict(v) for k, v in dynamic_axes.items()} if dynamic_axes else None,
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated
            dest = destination if isinstance(destination, io.BytesIO) else str(destination)
            torch.onnx.export(model, args, dest, opset_version=opset, dynamo=False, **common)
        return TORCHSCRIPT
    except Exception as exc:
        if importlib.util.find_spec("onnxscript") is None:
            raise
        first = exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, args, None, dynamo=True, verbose=False, **common)
    except Exception as exc:
        raise RuntimeError(
            f"neither ONNX exporter could export the model: TorchScript's: "
            f"{type(first).__name__}: {_first_line(first)}; dynamo's: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    written = program.model_proto.SerializeToString()
    if isinstance(destination, io.BytesIO):
        destination.seek(0)
        destination.truncate()  # whatever the first exporter wrote before it failed
        destination.write(written)
    else:
        Path(destination).write_bytes(written)
    return DYNAMO


def onnx_opset(destination: str | Path | io.BytesIO) -> int:
    """The default-domain opset a written ONNX model declares."""
    import onnx

    raw = (
        destination.getvalue()
        if isinstance(destination, io.BytesIO)
        else Path(destination).read_bytes()
    )
    proto = onnx.load_from_string(raw)
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"
