"""The model registry: each front model as an MLflow PyTorch model, with aliases to deploy from.

At the end of a search every front trial's pruned model is rebuilt from its safetensors
artifact (no pickles), logged into its child run in MLflow's pt2 format (``torch.export``:
it loads without our code or the model's classes) and registered under one model name.
Two aliases move with each search: the fastest model within ``tracking.alias_drop`` of the
base accuracy (``fastest-within-1pct``) and the most accurate one (``most-accurate``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn

from search_space import copy_model
from workers import Task, load_pruned, steps

from ._card import model_card
from ._config import Config
from ._deploy import (
    Example,
    example_args,
    export_onnx,
    exportable,
    input_names,
    named_outputs,
)
from ._picks import MOST_ACCURATE, RUN_TAG, fastest_alias
from ._plots import kept_channels, kept_channels_figure
from ._writer import is_outage

_log = logging.getLogger("prunesearch.progress")


@dataclass(frozen=True)
class Registered:
    trial: int
    version: str
    accuracy: float
    latency_ms: float
    no_onnx: str | None = None  # registered now without an ONNX export: why


def register_front(
    config: Config,
    client: MlflowClient,
    children: Mapping[int, str],
    table: Sequence[Mapping[str, Any]],
    task: Task,
    base: Mapping[str, float],
    on_failure: Callable[[int, Exception], None] | None = None,
) -> list[Registered]:
    """Register each front trial's model (once per run, so a resumed search adds none twice).

    With ``on_failure``, a model that fails to register for a reason other than an MLflow
    outage is reported to it (trial number, error) and the rest are still registered: one
    model the registry refuses must not cost the others (a rerun retries it)."""
    name = config.tracking.model_name or config.name
    out = []
    # MLflow resolves a logged model's ``models:/m-...`` source through the *fluent* tracking
    # URI, even for a client bound to another one: point it at ours for the whole registration.
    with fluent_uri(client.tracking_uri):
        _ensure_model(client, name)
        known = {
            v.tags.get(RUN_TAG): v.version for v in client.search_model_versions(f"name = '{name}'")
        }
        new = sum(1 for row in table if children.get(row["trial"]) not in (None, *known))
        with steps(new, f"registering {name}", "model") as advance:
            for row in table:
                run_id = children.get(row["trial"])
                if run_id is None or (run_id not in known and not _has_weights(client, run_id)):
                    continue  # a run recovered after the driver died holds no weights to register
                version, no_onnx = known.get(run_id), None
                if version is None:
                    try:
                        version, no_onnx = _register(config, client, name, run_id, row, task, base)
                    except Exception as exc:
                        if on_failure is None or is_outage(exc):
                            raise
                        on_failure(int(row["trial"]), exc)
                        advance(f"trial {row['trial']} not registered")
                        continue
                    advance(f"trial {row['trial']} as version {version}")
                out.append(
                    Registered(
                        row["trial"],
                        version,
                        float(row["accuracy"]),
                        float(row["latency_ms"]),
                        no_onnx,
                    )
                )
        _set_aliases(client, name, out, base["accuracy"], config.tracking.alias_drop)
    return out


def _has_weights(client: MlflowClient, run_id: str) -> bool:
    return any(a.path == "model.safetensors" for a in client.list_artifacts(run_id))


@contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _ensure_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description=_model_description(name))


def _model_description(name: str) -> str:
    return (
        f"Pruned models from prunesearch, one version per front model (its description is its "
        f"model card). Aliases: `{MOST_ACCURATE}` (the most accurate) and `fastest-within-Xpct` "
        f"(the fastest within X accuracy points of the base; X is tracking.alias_drop). Load an "
        f"`nn.Module` with `orchestrator.load_module('models:/{name}@{MOST_ACCURATE}', base_model)`."
    )


def _register(
    config: Config,
    client: MlflowClient,
    name: str,
    run_id: str,
    row: Mapping[str, Any],
    task: Task,
    base: Mapping[str, float],
) -> tuple[str, str | None]:
    """The new version's number, and why it has no ONNX export (None: it has one, or
    onnxruntime is not installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "model.safetensors", tmp)
        model, _ = load_pruned(Path(path).read_bytes(), copy_model(task.model))
    example = _example(task)
    info, strict = _log_model(run_id, model, example)
    onnx = _log_extras(client, run_id, model, example, task, row)
    run = client.get_run(run_id)
    tags = {
        RUN_TAG: run_id,
        "trial": str(row["trial"]),
        "accuracy": f"{row['accuracy']:.4f}",
        "latency_ms": f"{row['latency_ms']:.4f}",
        "speedup": f"{row['speedup']:.3f}",
        "target": config.target.name,
        "search": config.name,
        "search_run": run.data.tags.get("mlflow.parentRunId", ""),
    }
    if strict:
        tags["pt2_export"] = strict
    if onnx and "skipped" in onnx:
        tags["onnx_skipped"] = onnx["skipped"]
    elif onnx:
        tags |= {
            "onnx_opset": str(onnx["opset"]),
            "onnx_max_abs_diff": f"{onnx['max_abs_diff']:.3g}",
            "onnx_exporter": onnx["exporter"],
        }
    version = client.create_model_version(
        name,
        info.model_uri,
        run_id=run_id,
        model_id=info.model_id,
        tags=tags,
        description=model_card(config, row, base, run, onnx),
    )
    return version.version, tags.get("onnx_skipped")


def _log_extras(
    client: MlflowClient,
    run_id: str,
    model: nn.Module,
    example: Example,
    task: Task,
    row: Mapping[str, Any],
) -> dict[str, Any] | None:
    """On the child run: what was pruned (kept channels per layer, a bar chart) and the ONNX
    export, checked with ONNX Runtime (None when onnxruntime is not installed; ``skipped``, why,
    when the export or its check fails: the model registers without it, as without the extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = kept_channels(task.model, model)
        title = f"trial {row['trial']}: kept channels per layer ({row['speedup']:.2f}x faster)"
        chart = Path(tmp) / "kept_channels.png"
        chart.write_bytes(kept_channels_figure(rows, title))
        client.log_artifact(run_id, str(chart))
        if importlib.util.find_spec("onnxruntime") is None:
            return None
        path = Path(tmp) / "model.onnx"
        try:
            onnx = export_onnx(model, example, path)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime has no float64 Conv, for one
            return {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        client.log_artifact(run_id, str(path), "onnx")
        return onnx


def _example(task: Task) -> Example:
    """Two rows of the example batch (of each input, for a model of several): a batch dimension
    > 1 lets the export keep it dynamic."""
    x = task.example_inputs
    if isinstance(x, Mapping):  # refused before the search (_preflight.check_example_inputs)
        raise TypeError(KEYWORD_INPUTS)

    def two(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:1], t[:1]]) if t.shape[0] < 2 else t[:2]

    return tuple(two(t) for t in x) if isinstance(x, (tuple, list)) else two(x)


KEYWORD_INPUTS = (
    "tracking.register: the task's example_inputs is a dict (keyword inputs), and a registered "
    "model (torch.export, ONNX) takes positional ones: set tracking.register: false, or have "
    "the model take its inputs positionally (example_inputs a tuple)"
)


def _signature(example: Example, output: Any) -> ModelSignature:
    """Every input and output as a tensor with a free batch dimension: what MLflow infers on its
    own only for a model of one tensor in and one out."""

    def spec(name: str, t: torch.Tensor) -> TensorSpec:
        return TensorSpec(t.detach().cpu().numpy().dtype, (-1, *t.shape[1:]), name)

    args = example_args(example)
    return ModelSignature(
        inputs=Schema([spec(n, t) for n, t in zip(input_names(args), args, strict=True)]),
        outputs=Schema([spec(n, t) for n, t in named_outputs(output)]),
    )


# What serving a pt2 model needs (MLflow adds itself). Stated, not inferred: MLflow's inference
# re-imports the model in a subprocess, measured at 18 of the 19.8 s that logging one digits model
# took here, and it named packages the model never imports (tqdm, colorama).
SERVING_PACKAGES = ("torch", "numpy", "pandas", "cloudpickle")


def pip_requirements() -> list[str]:
    """The serving packages pinned at this environment's versions (no local tag: ``+cpu`` is
    not on PyPI)."""
    return [f"{p}=={importlib.metadata.version(p).split('+')[0]}" for p in SERVING_PACKAGES]


def _log_model(run_id: str, model: nn.Module, example: Example) -> tuple[Any, str | None]:
    """MLflow's model info, and why the program logged is a strict export (None: MLflow's)."""
    args = tuple(a.cpu() for a in example_args(example))
    model, output = exportable(model, args)
    given = {}
    if len(args) > 1 or not isinstance(output, torch.Tensor):
        # MLflow infers a signature by serving the model, which takes one tensor in and out;
        # pt2 needs one: state it. (Such a model loads with mlflow.pytorch.load_model or
        # orchestrator.load_module; MLflow's generic pyfunc serving takes one tensor.)
        given["signature"] = _signature(args, output)
    arrays = tuple(a.numpy() for a in args)
    try:
        return _log_pt2(run_id, model, arrays, given), None
    except Exception as exc:
        graph = _strict_graph(model, args) if type(exc).__module__.startswith("torch") else None
        if graph is None:
            raise
        # MLflow's export is non-strict, and what it traced could not be saved (a Hugging Face
        # model's mask built under vmap: "Failed serializing node flat_apply"); a strict
        # export of the same model, unlifted to a plain graph of aten ops, exports again.
        why = f"strict: MLflow's export failed ({type(exc).__name__}: {str(exc)[:200]})"
        _log.info("registering: %s; logged a strict export instead", why)
        return _log_pt2(run_id, graph, arrays, given), why


def _log_pt2(run_id: str, model: nn.Module, arrays: tuple, given: Mapping[str, Any]) -> Any:
    # log_model only has a fluent form; the caller has pointed the fluent URI at our store.
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # torch.export says this of every recurrent layer (its kernels' weight list is
        # refreshed in forward) and of the hook form of weight_norm (the weight is recomputed
        # in forward); the export is right, and the user can do nothing about it.
        warnings.filterwarnings("ignore", message=r"The tensor attributes .* during export")
        return mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=arrays if len(arrays) > 1 else arrays[0],
            serialization_format="pt2",
            pip_requirements=pip_requirements(),
            **given,
        )


def _strict_graph(model: nn.Module, args: tuple[torch.Tensor, ...]) -> nn.Module | None:
    """``model`` exported strictly and unlifted into a graph module; None if that fails too."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, args, strict=True).module()
    except Exception:  # noqa: BLE001 - the first failure is the one the user is told
        return None


def _set_aliases(
    client: MlflowClient, name: str, models: Sequence[Registered], base_accuracy: float, drop: float
) -> None:
    if not models:
        return
    best = max(models, key=lambda m: (m.accuracy, -m.latency_ms))
    client.set_registered_model_alias(name, MOST_ACCURATE, best.version)
    good = [m for m in models if m.accuracy >= base_accuracy - drop]
    if good:
        fastest = min(good, key=lambda m: (m.latency_ms, -m.accuracy))
        client.set_registered_model_alias(name, fastest_alias(drop), fastest.version)


@dataclass
class Loaded:
    model: nn.Module
    example: Example  # the logged input example: one tensor, or a tuple of the model's inputs
    output: Any  # what the model returned on it: a tensor, or its several outputs
    tags: dict[str, str]


def fetch(uri: str, tracking_uri: str | None = None, out: str | None = None) -> Loaded:
    """Load a registered pruned model and run it on its logged input example.

    ``uri`` is ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN_ID/model``. The
    model is a ``torch.export`` program: it needs neither our code nor the model's classes, and
    nothing in it is unpickled (pickle loading is forced off while it loads).
    """
    from mlflow.models import Model

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    # A registered model can be large, and a silent download looks like a hang: MLflow's own
    # download bar (tqdm) on a terminal, a line elsewhere. (The CLI turns MLflow's bars off for
    # the rest of a run, where they would interleave with the search's lines.)
    terminal = sys.stderr.isatty()
    if not terminal:
        _log.info("downloading %s", uri)
    with fluent_uri(tracking_uri), tempfile.TemporaryDirectory() as tmp:
        with _env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if terminal else None):
            local = mlflow.artifacts.download_artifacts(uri, dst_path=out or tmp)
        # Whatever the environment says, a fetched model is never unpickled: MLflow then refuses
        # a pickle-format model, and loads a pt2 one only after checking every record of the
        # archive is JSON, text or tensors its ``weights_only`` loader accepts
        # (``torch.export.load`` itself would unpickle them with ``weights_only=False``).
        with _env("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false"):
            model = mlflow.pytorch.load_model(local)
        meta = Model.load(local)
        example = _fetched_example(meta.load_input_example(local), meta.signature)
        tags = _version_tags(MlflowClient(tracking_uri), uri)
    with torch.no_grad():
        output = model(*example_args(example))
    return Loaded(model, example, output, tags)


def _fetched_example(saved: Any, signature: ModelSignature | None) -> Example:
    """The logged input example as tensors. MLflow keeps no example of several inputs: then two
    rows of zeros shaped as the signature says (the export's dynamic batch starts at 2)."""
    if saved is not None:
        if isinstance(saved, Mapping):  # logged with a stated signature: keyed by input name
            values = tuple(torch.as_tensor(v) for v in saved.values())
            return values if len(values) > 1 else values[0]
        if isinstance(saved, (list, tuple)):
            return tuple(torch.as_tensor(v) for v in saved)
        return torch.as_tensor(saved)
    specs = signature.inputs.inputs if signature is not None and signature.inputs else []
    if not specs:
        raise ValueError("the registered model has neither an input example nor a signature")
    zeros = tuple(torch.from_numpy(np.zeros((2, *s.shape[1:]), dtype=s.type)) for s in specs)
    return zeros if len(zeros) > 1 else zeros[0]


@contextmanager
def _env(key: str, value: str | None) -> Iterator[None]:
    """``os.environ[key] = value`` inside the block (``None``: left as it is), restored after."""
    previous = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def _version_tags(client: MlflowClient, uri: str) -> dict[str, str]:
    if not uri.startswith("models:/"):
        return {}
    ref = uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, number = ref.rsplit("/", 1)
        version = client.get_model_version(name, number)
    return {"version": str(version.version), **dict(version.tags)}
