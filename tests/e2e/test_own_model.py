"""The README's "Your own model": a torchvision model on an ImageFolder made here, checked by
``prunesearch check`` from the project root without PYTHONPATH, as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch.nn.utils import parametrize

from orchestrator import MOST_ACCURATE, fetch, load_module, prepare, run_search
from orchestrator.cli import main
from workers import TrialStatus, build_task, evaluate

from .helpers import quick_config


def image_folder(root: Path, per_class: int = 6, size: int = 16) -> Path:
    """Two classes a model can tell apart: reddish and bluish squares with noise."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for k, name in enumerate(("red", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.rand(size, size, 3, generator=g) * 80
                pixels[..., 0 if k == 0 else 2] += 170
                Image.fromarray(pixels.byte().numpy()).save(folder / f"{i}.png")
    return root


def test_a_torchvision_model_on_an_image_folder_is_checked_and_evaluates(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    options = {"data": str(data), "size": 16, "epochs": 2, "checkpoint": str(tmp_path / "base.pt")}
    config = tmp_path / "mine.yaml"
    config.write_text(
        yaml.safe_dump(
            {"name": "mine", "task": "examples.imagefolder_task:build", "task_options": options}
        )
    )
    assert main(["check", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["groups"]) >= 8  # ResNet-18: the stem, each block's first conv, the stages
    assert [e["name"] for e in report["excluded"]] == ["fc"]  # the classifier's outputs stay
    # ResNet-18's identity-shortcut blocks; each stage's first block projects its shortcut
    assert [b["name"] for b in report["blocks"]] == [
        "layer1.0",
        "layer1.1",
        "layer2.1",
        "layer3.1",
        "layer4.1",
    ]
    assert (tmp_path / "base.pt").exists()  # trained once; workers load it
    task = build_task("examples.imagefolder_task:build", options)  # as a Ray worker does
    saved = torch.load(tmp_path / "base.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in task.model.state_dict().items())
    assert 0.0 <= evaluate(task.model, task) <= 1.0  # top-1 accuracy on the val folder


def test_a_model_of_two_inputs_and_a_dict_of_outputs_is_searched_registered_and_fetched(
    tmp_path, ray_cluster, capsys
):
    """The default search (allocation, profile and screen) on a model that takes an image and a
    feature vector and returns a dict of two heads, trained and scored by the task's own loss;
    its front registered (pt2 with a stated signature, ONNX checked) and fetched back."""
    config = quick_config(
        tmp_path,
        name="heads",
        task="tests.workers.odd_models:two_heads",
        search__trials=3,
        search__screen__candidates=16,
        search__space__granularity="allocation",
        tracking__register=True,
        target__batch_size=32,  # as _registered: at batch 1 a loaded machine left no front
    )
    outcome = run_search(prepare(config), progress=lambda line: None)
    # A pick may be rejected unfinetuned or stopped early by a faster front model (the default
    # early-stop rules); none fails.
    counts = outcome.counts
    assert counts[TrialStatus.COMPLETE] >= 1 and counts[TrialStatus.FAILED] == 0, counts
    assert sum(counts.values()) == 3 and outcome.front and outcome.registered
    uri = config.tracking.resolved_uri()
    loaded = fetch(f"models:/heads@{MOST_ACCURATE}", tracking_uri=uri)
    assert [tuple(t.shape) for t in loaded.example] == [(2, 1, 8, 8), (2, 4)]
    assert {k: tuple(v.shape) for k, v in loaded.output.items()} == {
        "digit": (2, 10),
        "remainder": (2, 4),
    }
    assert float(loaded.tags["onnx_max_abs_diff"]) < 1e-3  # every output compared
    capsys.readouterr()
    assert main(["fetch", f"models:/heads@{MOST_ACCURATE}", "--tracking-uri", uri]) == 0
    said = capsys.readouterr().out
    assert "((2, 1, 8, 8), (2, 4)) -> output ((2, 10), (2, 4))" in said


def test_a_weight_normed_recurrent_model_is_searched_registered_and_fetched(tmp_path, ray_cluster):
    """A GRU reading the digit row by row behind a weight-normed Conv1d: its hidden units and
    the convolution's channels pruned, screened and timed (the benches get the weights computed
    once: a parametrized module does not pickle), its front registered with ONNX checked and
    fetched back to reproduce its accuracy."""
    config = quick_config(
        tmp_path,
        name="rows",
        task="tests.workers.odd_models:digit_rows",
        task_options={"cell": "gru", "conv": True, "hidden": 128},
        search__trials=3,
        search__screen__candidates=16,
        # A model whose time is mostly overhead (hidden 32, batch 1) times its pruned versions
        # within the base's noise floor, and then no model is on the front to register.
        target__batch_size=16,
        tracking__register=True,
    )
    prepared = prepare(config)
    assert {"rnn", "conv"} <= set(prepared.discovery.names)
    outcome = run_search(prepared, progress=lambda line: None)
    counts = outcome.counts
    assert counts[TrialStatus.COMPLETE] >= 1 and counts[TrialStatus.FAILED] == 0, counts
    assert outcome.registered and not outcome.unregistered
    uri, tracking = f"models:/rows@{MOST_ACCURATE}", config.tracking.resolved_uri()
    loaded = fetch(uri, tracking_uri=tracking)  # the pt2 program runs on its example
    assert float(loaded.tags["onnx_max_abs_diff"]) < 1e-3
    model, _ = load_module(uri, prepared.task.model, tracking_uri=tracking)
    assert parametrize.is_parametrized(model.conv)  # weight-normed as the base is
    best = max(outcome.front, key=lambda row: row["accuracy"])
    assert evaluate(model, prepared.task) == pytest.approx(best["accuracy"], abs=1e-4)


def test_keyword_inputs_with_registering_on_are_refused_before_any_search(tmp_path, capsys):
    config = tmp_path / "kw.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "kw",
                "task": "tests.workers.odd_models:keyword_heads",
                "storage": f"sqlite:///{tmp_path}/optuna.db",
                "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
            }
        )
    )
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "tracking.register" in err and "positional" in err
    assert not (tmp_path / "optuna.db").exists()  # refused before the study was made


def test_a_float64_model_is_searched_and_registered_in_its_own_dtype(tmp_path, ray_cluster):
    """Timing at the target's fp32 converted the caller's model in place, so a float64 model
    failed its own evaluation (the base model's measurement); ONNX Runtime has no float64 Conv,
    which failed every front model's registration. Now the timing works on a copy, the trial
    keeps the model's dtype, and the ONNX export is skipped with why."""
    lines: list[str] = []
    prepared, outcome, uri, tracking = _registered(tmp_path, "double_digits", lines.append)
    assert outcome.counts[TrialStatus.COMPLETE] >= 1
    loaded = fetch(uri, tracking_uri=tracking)
    assert "Conv" in loaded.tags["onnx_skipped"] and "onnx_opset" not in loaded.tags
    said = [line for line in lines if "without an ONNX export" in line]  # told as it happens
    assert said and loaded.tags["onnx_skipped"][:60] in said[-1], lines[-5:]
    model, _ = load_module(uri, prepared.task.model, tracking_uri=tracking)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    best = max(outcome.front, key=lambda row: row["accuracy"])
    assert evaluate(model, prepared.task) == pytest.approx(best["accuracy"], abs=1e-4)


def test_a_model_returning_a_dataclass_record_is_searched_registered_and_fetched(
    tmp_path, ray_cluster
):
    """Model libraries return dataclass records (``Output(logits=..., ...)``). Discovery failed
    on one ("'Scores' object is not iterable"), and once past it, registering failed on every
    front model: MLflow's schema and torch.export find no tensor in a record. The registered
    program and the ONNX file return the record's fields by name; ``load_module`` gives back
    the model itself, record and all."""
    prepared, _, uri, tracking = _registered(tmp_path, "recorded_digits")
    loaded = fetch(uri, tracking_uri=tracking)
    assert {k: tuple(v.shape) for k, v in loaded.output.items()} == {
        "logits": (2, 10),
        "features": (2, 64),
    }
    assert float(loaded.tags["onnx_max_abs_diff"]) < 1e-3
    model, _ = load_module(uri, prepared.task.model, tracking_uri=tracking)
    with torch.no_grad():
        assert model(prepared.task.example_inputs).logits.shape == (1, 10)


def test_a_model_whose_export_mlflow_cannot_save_is_registered_from_a_strict_export(
    tmp_path, ray_cluster
):
    """A Hugging Face model builds its attention mask under vmap; MLflow's non-strict export
    of it traced a node it could not save ("Failed serializing node flat_apply"), and no
    front model was registered. A strict export of the same model is logged instead: it
    loads without our code and computes what the trial measured."""
    prepared, outcome, uri, tracking = _registered(tmp_path, "vmap_masked_digits")
    loaded = fetch(uri, tracking_uri=tracking)  # the pt2 program, none of our code
    assert loaded.tags["pt2_export"].startswith("strict: MLflow's export failed (SerializeError")
    model, _ = load_module(uri, prepared.task.model, tracking_uri=tracking)
    with torch.no_grad():
        (x,) = loaded.example if isinstance(loaded.example, tuple) else (loaded.example,)
        assert torch.allclose(loaded.output, model(torch.as_tensor(x)), atol=1e-5)
    best = max(outcome.front, key=lambda row: row["accuracy"])
    assert evaluate(model, prepared.task) == pytest.approx(best["accuracy"], abs=1e-4)


def _registered(tmp_path: Path, task: str, progress=lambda line: None):
    """A short search of ``tests.workers.odd_models:<task>`` with its front registered, none of
    its trials failed: (prepared, outcome, the most accurate model's URI, the tracking URI)."""
    name = task.replace("_", "-")
    config = quick_config(
        tmp_path,
        name=name,
        task=f"tests.workers.odd_models:{task}",
        search__trials=2,
        search__screen__candidates=8,
        tracking__register=True,
        # At batch 1 the digits model is per-op overhead, and on a loaded machine neither of
        # two trials cleared the noise floor now and then: no front, nothing to register.
        target__batch_size=32,
    )
    prepared = prepare(config)
    outcome = run_search(prepared, progress=progress)
    assert outcome.counts[TrialStatus.FAILED] == 0, outcome.counts
    assert outcome.registered and not outcome.unregistered
    return prepared, outcome, f"models:/{name}@{MOST_ACCURATE}", config.tracking.resolved_uri()
