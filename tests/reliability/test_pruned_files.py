"""Pruned-model files: no pickles anywhere on the load path; tampered or foreign files are refused.

Pruned weights are safetensors plus JSON metadata, rebuilt on a freshly built base model
(workers.load_pruned). A registered model is fetched as MLflow's pt2 format with MLflow's
pickle check forced on (orchestrator.fetch); a pickle-format model is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from search_space import discover, uniform_plan
from workers import DigitsNet, PrunedModelError, apply_plan, load_pruned, read_plan, save_pruned


@pytest.fixture(scope="module")
def pruned(digits_task, digits_discovery):
    plan = uniform_plan(digits_discovery, 0.4, criterion="l2", round_to=8)
    return apply_plan(digits_task.model, digits_task.example_inputs, plan), plan


def test_save_load_round_trips_to_bit_identical_outputs(tmp_path, digits_task, pruned):
    model, plan = pruned
    path = save_pruned(model, plan, tmp_path / "m.safetensors", base_model=digits_task.model)
    loaded, loaded_plan = load_pruned(path, copy.deepcopy(digits_task.model))
    assert loaded_plan == plan
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert read_plan(path) == plan
    # The channel counts came back, not just the tensors.
    assert (
        loaded.stem[0].out_channels
        == model.stem[0].out_channels
        < digits_task.model.stem[0].out_channels
    )


def test_loading_never_unpickles(tmp_path, digits_task, pruned):
    model, plan = pruned
    path = save_pruned(model, plan, tmp_path / "m.safetensors", base_model=digits_task.model)
    assert (
        b"pickle" not in path.read_bytes()[:8] and path.read_bytes()[8:9] == b"{"
    )  # safetensors' JSON header


class _Payload:
    """Unpickling this runs code: it creates the file named in the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_is_refused_and_never_run(tmp_path, digits_task, ledger):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.safetensors"
    torch.save({"model": _Payload(marker)}, evil)  # what a pickled checkpoint would look like
    with pytest.raises(PrunedModelError, match="not a prunesearch pruned-model file"):
        load_pruned(evil, copy.deepcopy(digits_task.model))
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(PrunedModelError, match="not a prunesearch pruned-model file"):
        load_pruned(evil, copy.deepcopy(digits_task.model))
    assert not marker.exists()
    ledger.bad_input()
    ledger.bad_input()
    ledger.check(3)


def _flip_tensor_byte(data: bytes) -> bytes:
    out = bytearray(data)
    out[-3] ^= 0xFF  # flip bits in the last tensor
    return bytes(out)


def _rewrite_meta(data: bytes, change, redigest: bool = False) -> bytes:
    """Edit the prunesearch metadata in a safetensors header (offsets are kept: same tensors)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["prunesearch"])
    change(meta)
    if redigest:  # a forger recomputes the (unkeyed) digest
        body = {k: v for k, v in meta.items() if k != "meta_digest"}
        meta["meta_digest"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    header["__metadata__"]["prunesearch"] = json.dumps(meta, sort_keys=True)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _set_ratio(meta):
    unit = next(iter(meta["plan"]["ratios"]))
    meta["plan"]["ratios"][unit] = 0.05


def _set_channels(meta):
    name = next(iter(meta["attributes"]))
    meta["attributes"][name]["out_channels"] = 3


def _add_hook(meta):
    meta["attributes"]["stem.0"]["_forward_hooks"] = ["os.system"]


def _replace_method(meta):
    meta["attributes"]["fc"] = {"forward": "print"}


def _forge(name: str, attr: str, value):
    """A forger's edit of one module attribute, with the (unkeyed) digest recomputed."""

    def change(meta):
        meta["attributes"].setdefault(name, {})[attr] = value

    return lambda d: _rewrite_meta(d, change, redigest=True)


# Public scalar attributes that exist on the module but that pruning never changes (issue 18,
# point 5), and sizes a pruned file could only set by lying: larger than the base, zero, a bool.
FORGED = [
    ("padding_mode", "stem.0", "padding_mode", "circular"),
    ("padding", "stem.0", "padding", [0, 0]),
    ("stride", "stem.0", "stride", [2, 2]),
    ("batchnorm-eps", "stem.1", "eps", 0.5),
    ("batchnorm-momentum", "stem.1", "momentum", 1.0),
    ("track-running-stats", "stem.1", "track_running_stats", False),
    ("relu-inplace", "stem.2", "inplace", True),
    ("channels-enlarged", "stem.0", "out_channels", 4096),
    ("channels-zero", "stem.0", "out_channels", 0),
    ("channels-bool", "stem.0", "out_channels", True),
    ("channels-float", "stem.1", "num_features", 8.0),
]


@pytest.mark.parametrize("forged", FORGED, ids=[f[0] for f in FORGED])
def test_a_forged_file_may_set_only_what_pruning_changes(
    tmp_path, digits_task, pruned, forged, ledger
):
    _, name, attr, value = forged
    model, plan = pruned
    path = save_pruned(model, plan, tmp_path / "m.safetensors", base_model=digits_task.model)
    base = copy.deepcopy(digits_task.model)
    with pytest.raises(PrunedModelError, match="which pruning never changes"):
        load_pruned(_forge(name, attr, value)(path.read_bytes()), base)
    ledger.bad_input()
    ledger.check()


TAMPERED = [
    ("a tensor byte flipped", _flip_tensor_byte, "the file was changed after saving"),
    (
        "the plan edited",
        lambda d: _rewrite_meta(d, _set_ratio),
        "the file was changed after saving",
    ),
    (
        "a channel count edited",
        lambda d: _rewrite_meta(d, _set_channels),
        "the file was changed after saving",
    ),
    (
        "a private attribute added, digest forged",
        lambda d: _rewrite_meta(d, _add_hook, redigest=True),
        "which pruning never changes",
    ),
    (
        "a method replaced, digest forged",
        lambda d: _rewrite_meta(d, _replace_method, redigest=True),
        "which pruning never changes",
    ),
]


@pytest.mark.parametrize("how, tamper, message", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_a_tampered_file_is_refused(tmp_path, digits_task, pruned, how, tamper, message, ledger):
    model, plan = pruned
    path = save_pruned(model, plan, tmp_path / "m.safetensors", base_model=digits_task.model)
    base = copy.deepcopy(digits_task.model)
    with pytest.raises(PrunedModelError, match=message):
        load_pruned(tamper(path.read_bytes()), base)
    ledger.bad_input()
    ledger.check()


def test_a_file_for_another_base_model_is_refused(tmp_path, digits_task, pruned, ledger):
    model, plan = pruned
    path = save_pruned(model, plan, tmp_path / "m.safetensors", base_model=digits_task.model)
    with pytest.raises(PrunedModelError, match="different base model"):
        load_pruned(path, DigitsNet(width=16))
    ledger.bad_input()
    ledger.check()


def test_garbage_is_refused(tmp_path, digits_task, ledger):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(PrunedModelError, match="not a prunesearch pruned-model file"):
        load_pruned(path, copy.deepcopy(digits_task.model))
    ledger.bad_input()
    ledger.check()


def _pickle_format_model(root: Path, marker: Path) -> Path:
    """An MLflow PyTorch model in the pickle format whose weights file runs code when unpickled."""
    model = root / "model"
    (model / "data").mkdir(parents=True)
    (model / "MLmodel").write_text(
        "artifact_path: model\nflavors:\n  pytorch:\n    model_data: data\n"
        f"    pytorch_version: {torch.__version__}\n"
    )
    (model / "data" / "pickle_module_info.txt").write_text("pickle")
    (model / "data" / "model.pth").write_bytes(pickle.dumps(_Payload(marker)))
    return model


def test_fetch_refuses_a_pickle_format_model_even_when_the_environment_allows_pickles(
    tmp_path, monkeypatch, capsys, ledger
):
    import mlflow

    from orchestrator.cli import main

    marker = tmp_path / "payload-ran"
    model = _pickle_format_model(tmp_path, marker)
    monkeypatch.setenv(
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true"
    )  # MLflow's default, said out loud
    # The payload is live: MLflow's own loader, as configured, runs it (then finds no tensors).
    with pytest.raises(RuntimeError):
        mlflow.pytorch.load_model(str(model))
    assert marker.exists()
    marker.unlink()

    assert main(["fetch", str(model), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err
    assert "Deserializing model using pickle is disallowed" in err and "Traceback" not in err
    assert not marker.exists()
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "true"  # fetch restored the setting
    ledger.bad_input()
    ledger.check(5)


def test_a_size_a_layer_handler_writes_is_settable_on_that_layer_type_only(tmp_path, ledger):
    """``dim`` is the width of a Swin PatchMerging its pruner shrinks, but the axis of a Softmax:
    a file may set it on the first (the zoo's round trip) and never on the second."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(
        torch.nn.Conv1d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv1d(8, 4, 3), torch.nn.Softmax(dim=2)
    ).eval()
    x = torch.randn(1, 3, 16)
    plan = uniform_plan(discover(base, x), 0.5)
    model = apply_plan(base, x, plan)
    path = save_pruned(model, plan, tmp_path / "m.safetensors", base_model=base)
    loaded, _ = load_pruned(path, copy.deepcopy(base))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(PrunedModelError, match=r"sets 3\.dim = 1, which pruning never changes"):
        load_pruned(_forge("3", "dim", 1)(path.read_bytes()), copy.deepcopy(base))
    ledger.bad_input()
    ledger.check()


SPLITS_FORGED = [
    ("enlarged", [20, 12, 12]),
    ("zero", [0, 12, 12]),
    ("another length", [6, 6]),
    ("not ints", [6.0, 6.0, 6.0]),
]


@pytest.mark.parametrize("value", [f[1] for f in SPLITS_FORGED], ids=[f[0] for f in SPLITS_FORGED])
def test_stored_split_sizes_are_set_only_smaller(tmp_path, value, ledger):
    """A split's stored sizes (timm's MixedConv2d.splits) are settable, since pruning changes
    them, only as sizes: the same number of positive integers, none larger than the base's."""
    from tests.nets import MixBlock

    torch.manual_seed(0)
    model, x = MixBlock(se=False, mixed_pointwise=False).eval(), torch.randn(2, 3, 8, 8)
    found = discover(model, x, warn=False)
    plan = uniform_plan(found, 0.5)
    pruned = apply_plan(model, x, plan, discovery=found)
    path = save_pruned(pruned, plan, tmp_path / "m.safetensors", base_model=model)
    assert pruned.depthwise.splits == [6, 6, 6]
    with pytest.raises(PrunedModelError, match="which pruning never changes"):
        load_pruned(_forge("depthwise", "splits", value)(path.read_bytes()), copy.deepcopy(model))
    ledger.bad_input()
    ledger.check()
    loaded, _ = load_pruned(path, copy.deepcopy(model))  # the file as saved loads
    assert loaded.depthwise.splits == [6, 6, 6]
