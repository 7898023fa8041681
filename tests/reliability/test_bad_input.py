"""Bad input, table-driven, through the real CLI (`prunesearch run`, in-process).

Every case must exit non-zero with exactly one line, ``prunesearch: error: FIELD...``, that
names the field and says how to fix it, with no traceback, and before any trial is dispatched
(the Optuna storage holds no trial). The table covers unknown keys and typos (did-you-mean),
wrong types, out-of-range ratios, contradictory settings, tasks that do not import, models that
cannot be traced, empty data, example inputs of the wrong shape, targets no node has, storage
that cannot be opened, local stores on a multi-node cluster, invalid registry names and
unwritable caches. `--debug` shows the traceback instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from orchestrator.cli import main

from ..e2e.helpers import _fresh_mlflow_db

DROP = object()  # a patch value that deletes the key
BAD_TASKS = "tests.reliability.bad_tasks"


@dataclass(frozen=True)
class Case:
    id: str
    patch: dict[str, Any] = field(default_factory=dict)  # deep-merged into a valid config
    field: str = ""  # the error line must start with it
    fix: str = ""  # ...and contain this: the fix (or what a valid value is)
    sets: tuple[str, ...] = ()  # --set overrides
    ray: bool = False  # reaches the cluster checks: uses the session's Ray cluster
    setup: Callable[..., Any] | None = (
        None  # (tmp_path, monkeypatch) -> None, or a replacement argv
    )


def _no_such_file(tmp_path, monkeypatch):
    return ["run", str(tmp_path / "nope.yaml")]


def _bad_yaml(tmp_path, monkeypatch):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed")
    return ["run", str(path)]


def _not_sqlite(tmp_path, monkeypatch):
    (tmp_path / "notes.db").write_text("these are my notes, not a database\n")


def _cache_under_a_file(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a regular file, not a directory")
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "file" / "cache"))


def _two_nodes(tmp_path, monkeypatch):
    """A second live node next to the session's one: a multi-node cluster as ray.nodes() shows it."""
    import ray

    real = ray.nodes
    fake = {"NodeID": "f" * 56, "Alive": True, "Resources": {"CPU": 4.0}, "Labels": {}}
    monkeypatch.setattr(ray, "nodes", lambda: [*real(), fake])


def _warm_start_source(tmp_path, monkeypatch):
    optuna.create_study(
        study_name="last-night",
        storage=f"sqlite:///{tmp_path}/optuna.db",
        directions=["maximize", "minimize"],
    )


CASES = [
    # -- unknown keys and typos: a did-you-mean ----------------------------------------------
    Case("typo-top-level", {"serach": {}}, "serach", "did you mean 'search'"),
    Case("typo-nested", {"search": {"trails": 3}}, "search.trails", "did you mean 'trials'"),
    Case(
        "typo-in-override",
        sets=("search.trails=2",),
        field="search.trails",
        fix="did you mean 'trials'",
    ),
    Case(
        "typo-target-key",
        {"target": {"batchsize": 4}},
        "target.batchsize",
        "did you mean 'batch_size'",
    ),
    Case("typo-sampler", {"search": {"sampler": "tpee"}}, "search.sampler", "did you mean 'tpe'"),
    Case("typo-builtin-task", {"task": "digts"}, "task", "Did you mean 'digits'"),
    Case("unknown-key-no-match", {"bogus": 1}, "bogus", "known keys"),
    Case("typo-task-option", {"task_options": {"widht": 8}}, "task_options", "known: ["),
    # -- wrong types --------------------------------------------------------------------------
    Case("trials-not-int", {"search": {"trials": "many"}}, "search.trials", "expected int"),
    Case(
        "trials-not-int-override",
        sets=("search.trials=zero",),
        field="search.trials",
        fix="expected int",
    ),
    Case("section-not-mapping", {"search": ["trials"]}, "search", "expected a mapping"),
    Case(
        "gpus-not-number",
        {"resources": {"num_gpus": "one"}},
        "resources.num_gpus",
        "expected float",
    ),
    Case(
        "concurrency-word",
        {"search": {"concurrency": "all"}},
        "search.concurrency",
        "one of ['auto']",
    ),
    Case(
        "custom-resource-not-number",
        {"resources": {"custom": {"trainer": "x"}}},
        "resources.custom",
        "expected float",
    ),
    # -- out of range -------------------------------------------------------------------------
    Case(
        "ratio-above-1", {"search": {"space": {"ratio": [0.2, 1.2]}}}, "search.space.ratio", "< 1"
    ),
    Case(
        "max-ratio-above-1",
        {"search": {"space": {"max_ratio": 1.5}}},
        "search.space.max_ratio",
        "must lie in (0, 1)",
    ),
    Case(
        "override-ratio-above-1",
        {"search": {"space": {"overrides": {"layer1.*": [0.5, 1.5]}}}},
        "search.space.overrides",
        "< 1",
    ),
    Case("trials-zero", {"search": {"trials": 0}}, "search.trials", "must be >= 1"),
    Case(
        "concurrency-zero",
        {"search": {"concurrency": 0}},
        "search.concurrency",
        "must be >= 1 or 'auto'",
    ),
    Case("lr-zero", {"finetune": {"lr": 0}}, "finetune.lr", "must be > 0"),
    Case("epochs-negative", {"finetune": {"epochs": -1}}, "finetune.epochs", "must be >= 0"),
    Case(
        "timeout-negative",
        {"search": {"trial_timeout_s": -5}},
        "search.trial_timeout_s",
        "must be > 0",
    ),
    Case(
        "max-latency-negative",
        {"constraints": {"max_latency_ms": -1}},
        "constraints.max_latency_ms",
        "must be > 0",
    ),
    Case(
        "min-accuracy-above-1",
        {"constraints": {"min_accuracy": 2}},
        "constraints.min_accuracy",
        "must lie in [0, 1]",
    ),
    Case(
        "alias-drop-above-1",
        {"tracking": {"alias_drop": 1.5}},
        "tracking.alias_drop",
        "must lie in [0, 1)",
    ),
    Case("batch-size-zero", {"target": {"batch_size": 0}}, "target.batch_size", "must be >= 1"),
    Case(
        "step-zero", {"search": {"space": {"step": 0}}}, "search.space.step", "must lie in (0, 1)"
    ),
    Case(
        "sensitivity-ratios",
        {"search": {"sensitivity": {"ratios": [0, 2]}}},
        "search.sensitivity.ratios",
        "values in (0, 1)",
    ),
    Case(
        "round-to-zero",
        {"search": {"space": {"round_to": [0]}}},
        "search.space.round_to",
        "positive integer",
    ),
    # -- not one of the choices ---------------------------------------------------------------
    Case(
        "unknown-criterion",
        {"search": {"space": {"criteria": ["l3"]}}},
        "search.space.criteria",
        "choose from",
    ),
    Case(
        "no-criterion",
        {"search": {"space": {"criteria": []}}},
        "search.space.criteria",
        "give at least one criterion",
    ),
    Case(
        "unknown-granularity",
        {"search": {"space": {"granularity": "stage"}}},
        "search.space.granularity",
        "not one of",
    ),
    Case("unknown-runtime", {"target": {"runtime": "tensorrt"}}, "target.runtime", "not one of"),
    Case(
        "unknown-device", {"target": {"device": "tpu"}}, "target.device", "use 'cpu' or 'cuda[:N]'"
    ),
    # -- contradictory settings ---------------------------------------------------------------
    Case(
        "ratio-low-above-high",
        {"search": {"space": {"ratio": [0.7, 0.2]}}},
        "search.space.ratio",
        "0 <= low <= high < 1",
    ),
    Case(
        "override-low-above-high",
        {"search": {"space": {"overrides": {"layer1.*": [0.6, 0.3]}}}},
        "search.space.overrides",
        "0 <= low <= high < 1",
    ),
    Case("fp16-on-cpu", {"target": {"dtype": "fp16"}}, "target.dtype", "use fp32 on cpu"),
    Case(
        "objectives-order",
        {"search": {"objectives": ["latency_ms", "accuracy"]}},
        "search.objectives",
        "must start with [accuracy, latency_ms]",
    ),
    Case(
        "two-targets-one-name",
        {"target": [{"name": "a"}, {"name": "a", "batch_size": 8}]},
        "target",
        "give each target a distinct `name`",
    ),
    Case("no-target", {"target": []}, "target", "give one target mapping"),
    Case("no-batch-size", {"target": {"batch_size": []}}, "target.batch_size", "give a size"),
    Case(
        "one-database-for-both",
        {"storage": "postgresql://h/db", "tracking": {"uri": "postgresql://h/db"}},
        "tracking.uri",
        "Give each its own database",
    ),
    Case(
        "timing-leaves-no-cpu",
        {"target": {"threads": 2}},
        "resources.num_cpus",
        "lower target.threads or resources.num_cpus",
        ray=True,
    ),
    # -- names --------------------------------------------------------------------------------
    Case("no-name", {"name": DROP}, "name", "every search needs a name"),
    Case("bad-name", {"name": "bad name!"}, "name", "hold only letters, digits"),
    Case("target-name-space", {"target": {"name": "edge box"}}, "target.name", "letters"),
    Case(
        "registered-model-name",
        {"tracking": {"model_name": "my model"}},
        "tracking.model_name",
        "1-100 letters, digits, '_', '.' or '-'",
    ),
    Case(
        "registry-alias",
        {"nightly": {"alias": "prod candidate"}},
        "nightly.alias",
        "letters, digits, '_', '.' or '-'",
    ),
    # -- the task -----------------------------------------------------------------------------
    Case("task-module-missing", {"task": "no_such_module:build"}, "task", "cannot find module"),
    Case(
        "task-function-missing",
        {"task": f"{BAD_TASKS}:nothing"},
        "task",
        "has no function 'nothing'",
    ),
    Case("task-not-callable", {"task": f"{BAD_TASKS}:NOT_CALLABLE"}, "task", "has no function"),
    Case(
        "task-returns-no-task", {"task": f"{BAD_TASKS}:not_a_task"}, "task", "expected workers.Task"
    ),
    Case(
        "task-build-raises",
        {"task": f"{BAD_TASKS}:missing_checkpoint"},
        "task",
        "fix the task's build function",
    ),
    Case(
        "model-untraceable",
        {"task": f"{BAD_TASKS}:untraceable"},
        "task",
        "must return tensors computed from its inputs",
    ),
    Case(
        "empty-train-loader",
        {"task": f"{BAD_TASKS}:empty_train"},
        "task",
        "empty train_loader (0 batches); give it data",
    ),
    Case(
        "empty-val-loader",
        {"task": f"{BAD_TASKS}:empty_val"},
        "task",
        "empty val_loader (0 batches); give it data",
    ),
    Case(
        "example-wrong-channels",
        {"task": f"{BAD_TASKS}:three_channels"},
        "task",
        "make example_inputs one batch of them",
    ),
    Case(
        "example-wrong-size",
        {"task": f"{BAD_TASKS}:smaller_images"},
        "task",
        "make example_inputs one batch of them",
    ),
    Case(
        "example-no-batch-dim",
        {"task": f"{BAD_TASKS}:no_batch_dim"},
        "task",
        "batch dimension first",
    ),
    Case(
        "exclude-matches-nothing",
        {"search": {"space": {"exclude": ["nothing.*"]}}},
        "search.space.exclude",
        "layers look like",
    ),
    Case(
        "exclude-everything",
        {"search": {"space": {"exclude": ["*"]}}},
        "search.space.exclude",
        "leaves task digits no prunable layer; loosen the patterns",
    ),
    Case(
        "nothing-to-prune",
        {"task": f"{BAD_TASKS}:nothing_to_prune"},
        f"task {BAD_TASKS}:nothing_to_prune",
        "no prunable layers",
    ),
    Case(
        "override-matches-nothing",
        {"search": {"space": {"overrides": {"zz*": [0.1, 0.2]}}}},
        "search.space.overrides",
        "matches no",
    ),
    # -- the cluster --------------------------------------------------------------------------
    Case(
        "target-no-node-resource",
        {"target": {"resources": {"tpu_v9": 1}}},
        "target 'cpu'",
        "ray start --address=HEAD:6379 --resources",
        ray=True,
    ),
    Case(
        "target-no-node-label",
        {"target": {"label_selector": {"hw": "rpi5"}}},
        "target 'cpu'",
        "--labels=hw=rpi5",
        ray=True,
    ),
    Case(
        "trainer-no-node",
        {"resources": {"custom": {"trainer": 1}}},
        "resources",
        "fix resources.custom / resources.label_selector",
        ray=True,
    ),
    Case(
        "sqlite-on-multi-node", {}, "storage", "--allow-local-storage", ray=True, setup=_two_nodes
    ),
    # -- stores -------------------------------------------------------------------------------
    Case("storage-not-url", {"storage": "optuna.db"}, "storage", "use sqlite:///optuna.db"),
    Case(
        "storage-dir-missing",
        {"storage": "sqlite:////nonexistent-prunesearch-dir/optuna.db"},
        "storage",
        "create it or fix the path",
    ),
    Case(
        "storage-not-sqlite",
        {"storage": "sqlite:///{tmp}/notes.db"},
        "storage",
        "not a SQLite database",
        setup=_not_sqlite,
    ),
    Case(
        "storage-port-closed",
        {"storage": "postgresql://prunesearch@127.0.0.1:1/optuna"},
        "storage",
        "start the database or fix the host",
    ),
    Case(
        "storage-no-driver",
        {"storage": "oracle+oracledb://prunesearch@127.0.0.1:1/optuna"},
        "storage",
        "no database driver",
    ),
    Case("storage-in-memory", {"storage": "sqlite://"}, "storage", "use a file"),
    Case(
        "tracking-dir-missing",
        {"tracking": {"uri": "sqlite:////nonexistent-prunesearch-dir/mlflow.db"}},
        "tracking.uri",
        "create it or fix the path",
    ),
    Case(
        "tracking-password",
        {"tracking": {"uri": "https://bot:s3cret@mlflow.example.com"}},
        "tracking.uri",
        "set MLFLOW_TRACKING_USERNAME",
    ),
    Case(
        "warm-start-missing",
        {"search": {"warm_start": {"study": "last-nite"}}},
        "search.warm_start.study",
        "run that search first, fix the name",
        setup=_warm_start_source,
    ),
    Case(
        "cache-unwritable",
        {},
        "PRUNESEARCH_CACHE",
        "set PRUNESEARCH_CACHE to a writable directory",
        setup=_cache_under_a_file,
    ),
    # -- the file and the command line ----------------------------------------------------------
    Case(
        "config-missing",
        field="config file '{tmp}/nope.yaml'",
        fix="does not exist",
        setup=_no_such_file,
    ),
    Case(
        "config-bad-yaml",
        field="config file '{tmp}/bad.yaml'",
        fix="not valid YAML",
        setup=_bad_yaml,
    ),
    Case("set-without-value", sets=("search.trials",), field="--set", fix="write key.path=value"),
    Case("set-into-a-value", sets=("name.x=1",), field="--set", fix="is a value, not a section"),
]


def _merge(base: dict, patch: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _fill(value: Any, tmp_path: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp_path))
    if isinstance(value, dict):
        return {k: _fill(v, tmp_path) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, tmp_path) for v in value]
    return value


def _trials_in(storage: str) -> int:
    path = Path(storage.removeprefix("sqlite:///"))
    if not path.exists():
        return 0
    return sum(s.n_trials for s in optuna.get_all_study_summaries(storage=storage))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_one_line_naming_the_field_and_fix(
    tmp_path, monkeypatch, capsys, request, case, ledger
):
    if case.ray:
        request.getfixturevalue("ray_cluster")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    base = {
        "name": "bad-input",
        "task": "digits",
        "storage": storage,
        "search": {"trials": 2, "concurrency": 1},
        "finetune": {"epochs": 0},
        "target": {"rounds": 2, "runs": 5},
        "tracking": {"uri": _fresh_mlflow_db(tmp_path), "register": False},
    }
    argv = case.setup(tmp_path, monkeypatch) if case.setup else None
    if argv is None:
        path = tmp_path / "search.yaml"
        path.write_text(yaml.safe_dump(_fill(_merge(base, case.patch), tmp_path)))
        argv = ["run", str(path), *(a for s in case.sets for a in ("--set", s))]
    capsys.readouterr()

    code = main(argv)
    out, err = capsys.readouterr()
    ledger.bad_input()
    # Progress lines (e.g. "base model: digits, cached in ...") may come first, on stderr as
    # every prunesearch line does; the refusal is one line, the last, and the only error line.
    said = [ln for ln in err.splitlines() if ln.strip()]
    lines = [ln for ln in said if ln.startswith("prunesearch:")]
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert len(lines) == 1 and said[-1] == lines[0], err[-3000:]
    assert lines[0].startswith(f"prunesearch: error: {_fill(case.field, tmp_path)}"), lines[0]
    assert case.fix in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _trials_in(storage) == 0, "a trial was dispatched"
    ledger.check(6)


def test_debug_shows_the_traceback_instead(tmp_path, ledger):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "bogus": 1}))
    with pytest.raises(Exception, match="unknown key"):
        main(["--debug", "run", str(path)])
    ledger.check()
