"""From the registry to something that runs: a real ``nn.Module``, an ONNX file, a pt2 archive.

Three load paths, three different objects:

- ``load_module(uri, base_model)``: a ``torch.nn.Module`` of the base model's own classes, in
  eval mode, rebuilt from the version's ``model.safetensors`` (plain tensors plus the plan as
  JSON, no pickles) on a copy of the task's base model. It evaluates, finetunes and exports like
  any model; it needs the task's code and base model (``workers.build_task``).
- ``prunesearch fetch`` / ``mlflow.pytorch.load_model(uri)``: the registered MLflow model, a
  ``torch.export`` program (pt2) unlifted into a graph module. It runs without our code, but its
  ``.eval()``/``.train()`` raise ``NotImplementedError``: not for finetuning.
- ``prunesearch export URI --format onnx``: the ONNX file checked at registration against the
  PyTorch output (opset and the largest difference are tags of the model version).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from torch import nn

from search_space import PruningPlan, copy_model
from workers import TORCHSCRIPT, load_pruned, onnx_opset, tensors, write_onnx

from ._picks import RUN_TAG

ONNX_OPSET = 17
ONNX_ARTIFACT = "onnx/model.onnx"  # on the version's child run
# The largest |ONNX Runtime - PyTorch| accepted, times max(1, the output's largest |value|).
ONNX_TOLERANCE = 1e-3
FORMATS = ("onnx", "pt2")


def model_version(client: MlflowClient, uri: str) -> ModelVersion | None:
    """The registry entry a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI names."""
    if not uri.startswith("models:/"):
        return None
    ref = uri.removeprefix("models:/").rstrip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, number = ref.rsplit("/", 1)
    return client.get_model_version(name, number)


def source_run(client: MlflowClient, uri: str) -> str:
    """The child run (one trial) a model URI comes from."""
    if uri.startswith("runs:/"):
        return uri.removeprefix("runs:/").split("/", 1)[0]
    version = model_version(client, uri)
    if version is None:
        raise ValueError(
            f"{uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID"
        )
    return version.tags.get(RUN_TAG) or version.run_id


def load_module(
    uri: str, base_model: nn.Module, tracking_uri: str | None = None
) -> tuple[nn.Module, PruningPlan]:
    """A real ``nn.Module`` (eval mode) and its plan, from a registered version or a trial run.

    ``base_model`` is the task's unpruned model (``workers.build_task(config.task).model``); it is
    copied, not changed. A base model other than the search's is refused (fingerprints differ).
    """
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run_id = source_run(client, uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "model.safetensors", tmp)
        model, plan = load_pruned(Path(path).read_bytes(), copy_model(base_model))
    return model.eval(), plan


# One example batch: the model's one input, or its several positional inputs in order.
Example = torch.Tensor | tuple[torch.Tensor, ...]


def example_args(example: Example) -> tuple[torch.Tensor, ...]:
    return example if isinstance(example, tuple) else (example,)


def input_names(example: Example) -> list[str]:
    """``input`` for a model of one input, ``input0``, ``input1``, ... for several."""
    args = example_args(example)
    return ["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]


def named_outputs(output: Any) -> list[tuple[str, torch.Tensor]]:
    """A model's output tensors, in order, named: ``output`` for one tensor, a dict's keys (a
    key holding several tensors numbered after it), ``output0``, ``output1``, ... otherwise."""
    if isinstance(output, torch.Tensor):
        return [("output", output)]
    if isinstance(output, Mapping):
        named = []
        for key, value in output.items():
            found = tensors(value)
            named += [
                (str(key) if len(found) == 1 else f"{key}{i}", t) for i, t in enumerate(found)
            ]
        return named
    return [(f"output{i}", t) for i, t in enumerate(tensors(output))]


class _Plain(nn.Module):
    """``model`` with its dataclass records (a model library's ``Output(logits=..., ...)``)
    returned as dicts of their fields: torch.export, ONNX and MLflow's schema find tensors in
    tuples, lists and dicts only, and a record's schema came out empty ("Creating Schema with
    empty inputs is not allowed"), so no such model was registered."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

        def forward(*args: Any) -> Any:
            return _plain(model(*args))

        # The model's own parameters, not *args: MLflow gives torch.export one dynamic batch
        # per named input, and *args took them all as one ("inputs[0] is a tuple").
        forward.__signature__ = inspect.signature(model.forward)  # type: ignore[attr-defined]
        self.forward = forward


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, (type, dict)):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        # A field left None (a loss computed only when labels are passed) is no output.
        return {k: _plain(v) for k, v in fields.items() if v is not None}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_plain(v) for v in value)
    return value


def exportable(model: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[nn.Module, Any]:
    """``model`` as an export takes it (in eval mode, on the CPU, records as dicts), with its
    output on ``args``."""
    model = model.eval().cpu()
    with torch.no_grad():
        output = model(*args)
    plain = _plain(output)
    if len(tensors(plain)) == len(tensors(output)):  # no record: a pytree walk sees into it all
        return model, output
    return _Plain(model).eval(), plain


def export_onnx(
    model: nn.Module, example: Example, path: str | Path, opset: int = ONNX_OPSET
) -> dict[str, Any]:
    """Write ``model`` as ONNX (dynamic batch) and check it with ONNX Runtime against PyTorch on
    ``example`` (its one input, or a tuple of its inputs; every output is compared). Returns the
    opset and the largest absolute difference; raises past tolerance."""
    import onnxruntime as ort

    args = tuple(a.cpu() for a in example_args(example))
    model, output = exportable(model, args)
    want = named_outputs(output)
    ins, outs = input_names(args), [name for name, _ in want]
    with _without_graph_dumps():  # what the TorchScript exporter prints where it fails
        exporter = write_onnx(
            model,
            args,
            path,
            input_names=ins,
            output_names=outs,
            dynamic_axes={name: {0: "batch"} for name in ins + outs},
            opset=opset,
        )
    if exporter != TORCHSCRIPT:  # the dynamo exporter writes its own opset
        opset = onnx_opset(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(outs, {name: a.numpy() for name, a in zip(ins, args, strict=True)})
    diff = 0.0
    for g, (name, w) in zip(got, want, strict=True):
        # Relative to the output's scale: float32 keeps ~7 digits, so outputs in the millions
        # (an untrained or collapsed model's logits) differ by more than 1e-3 and are fine.
        scale = max(1.0, float(np.max(np.abs(w.numpy()))) if w.numel() else 1.0)
        d = float(np.max(np.abs(g - w.numpy()))) if w.numel() else 0.0
        if not d <= ONNX_TOLERANCE * scale:
            raise ValueError(
                f"ONNX export differs from PyTorch by {d:.3g} on output {name!r} "
                f"(> {ONNX_TOLERANCE} x its largest magnitude {scale:.3g})"
            )
        diff = max(diff, d)
    return {"opset": opset, "max_abs_diff": diff, "exporter": exporter}


# What torch's TorchScript exporter writes (from C++, to standard output) when an export fails:
# the whole graph, one line per value, up to its return line and the blank line after it.
_GRAPH_DUMP = re.compile(r"^Torch IR graph at exception.*?^  return \(.*?\n\n?", re.S | re.M)


@contextlib.contextmanager
def _without_graph_dumps() -> Iterator[None]:
    """Leave out the graph torch dumps when an ONNX export fails (the error says what failed;
    the version's tag ``onnx_skipped`` keeps it): every model a registration could not export
    printed hundreds of lines. torch 2.14's switch for that log is always on (its
    ``setup_onnx_logging`` tests a function, not its result), and C++ writes it to standard
    output, so file descriptors 1 and 2 themselves are caught for the export; anything else
    written there is written back."""
    with _caught(1, sys.stdout), _caught(2, sys.stderr):
        yield


@contextlib.contextmanager
def _caught(fd: int, stream: Any) -> Iterator[None]:
    if stream is not None:
        stream.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no such descriptor (a daemon closed it): nothing to catch
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            caught.seek(0)
            kept = _GRAPH_DUMP.sub("", caught.read().decode(errors="replace"))
            if kept and stream is not None:
                stream.write(kept)
                stream.flush()


def export_model(uri: str, fmt: str, out: str | Path, tracking_uri: str | None = None) -> Path:
    """Copy a registered model out in a deployment format: ``onnx`` (the file checked at
    registration) or ``pt2`` (the ``torch.export`` archive MLflow holds)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r}; choose one of {', '.join(FORMATS)}")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if fmt == "onnx":
            run_id = source_run(client, uri)
            if ONNX_ARTIFACT not in _artifacts(client, run_id):
                raise ValueError(
                    f"{uri}: no ONNX export on its run (registered without onnxruntime, or the "
                    "export failed: the version's tag 'onnx_skipped' says why); use --format pt2"
                )
            got = Path(client.download_artifacts(run_id, ONNX_ARTIFACT, tmp))
        else:
            import mlflow

            from ._registry import fluent_uri

            with fluent_uri(client.tracking_uri):  # MLflow resolves models:/m-... fluently
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        uri, dst_path=tmp, tracking_uri=tracking_uri, registry_uri=tracking_uri
                    )
                )
            got = next(local.rglob("*.pt2"), None)
            if got is None:
                raise ValueError(f"{uri}: not a pt2 model (no .pt2 file in it)")
        shutil.copyfile(got, out)
    return out


def _artifacts(client: MlflowClient, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, "onnx")}
