"""Hostile input, table-driven, through the CLI's main in-process (issue 18).

Each case is what a careless or hostile user gives ``prunesearch``: YAML oddities (recursive
aliases, alias bombs, deep nesting, duplicate keys, wrong encodings, Python tags, non-files), type
confusion, non-finite and out-of-range numbers, resources this machine lacks, storage paths that
are devices or hold NUL bytes, task references to the standard library, task code that exits,
read-only commands against stores that do not exist or servers that do not answer. Every case:

- exits 2 with exactly one line ``prunesearch: error: FIELD...`` holding the fix, no traceback;
- starts no Ray (``ray.init`` is replaced by a tripwire) and creates no file or store;
- prints no secret (credentials are planted in the environment of every case).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]
NEEDLE = "s3cr3t-hostile"
SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": f"{NEEDLE}-mlflow",
    "PGPASSWORD": f"{NEEDLE}-pg",
    "AWS_SECRET_ACCESS_KEY": f"{NEEDLE}-aws",
    "HF_TOKEN": f"{NEEDLE}-hf",
}
BASE = {
    "name": "hostile",
    "storage": "sqlite:///optuna.db",
    "tracking": {"uri": "sqlite:///mlflow.db", "register": False},
}


@dataclass(frozen=True)
class Case:
    id: str
    field: str  # the error line starts with it (after "prunesearch: error: ")
    fix: str  # ...and holds this
    data: dict[str, Any] | None = None  # merged over BASE, written as search.yaml
    text: str | bytes | None = None  # or the config file's exact content
    sets: tuple[str, ...] = ()
    command: str = "check"
    flags: tuple[str, ...] = ()  # after the config path
    argv: tuple[str, ...] | None = None  # the whole argv instead ({tmp} filled)
    files: dict[str, str] = field(default_factory=dict)  # task modules and the like
    setup: Callable[[Path], None] | None = None


def _bomb() -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    return "name: bomb\n" + "\n".join(lines) + "\n"


def _module(body: str) -> str:
    return "from __future__ import annotations\n" + body


EXITS_ON_IMPORT = _module("import sys\nsys.exit(3)\ndef build(options):\n    pass\n")
EXITS_IN_BUILD = _module("import sys\ndef build(options):\n    sys.exit(3)\n")
PARSES_ARGV = _module(
    "import argparse\ndef build(options):\n"
    "    p = argparse.ArgumentParser()\n    p.add_argument('--epochs', type=int, required=True)\n"
    "    return p.parse_args()\n"
)
RAISES_ON_IMPORT = _module("raise RuntimeError('no GPU driver here')\n")
REEXPORTS_STDLIB = _module("from subprocess import run\n")
NO_TRAIN_LOADER = _module(
    "from workers import build_task\n"
    "def build(options):\n    t = build_task('digits')\n    t.train_loader = None\n    return t\n"
)
EXITS_IN_FORWARD = _module(
    "import sys\nfrom workers import build_task\n"
    "def build(options):\n    t = build_task('digits')\n"
    "    t.model.forward = lambda x: sys.exit(4)\n    return t\n"
)
FROZEN = _module(
    "from workers import build_task\n"
    "def build(options):\n    t = build_task('digits')\n    t.model.requires_grad_(False)\n"
    "    return t\n"
)


def _empty_mlflow(tmp: Path) -> None:
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{tmp}/mlflow.db").search_experiments()


def _fifo(tmp: Path) -> None:
    import os

    os.mkfifo(tmp / "fifo.db")


CASES = [
    # -- YAML oddities -----------------------------------------------------------------------
    Case(
        "recursive-alias",
        "config file",
        "recursive alias",
        text="name: x\ntask_options: &a {s: *a}\n",
    ),
    Case("alias-bomb", "config file", "remove the repeated aliases", text=_bomb()),
    Case("deep-nesting", "config file", "flatten it", text="name: x\nt: " + "[" * 20000),
    Case(
        "deep-mapping",
        "config file",
        "flatten it",
        text="name: x\n" + "".join(f"{' ' * i}k{i}:\n" for i in range(60)) + " " * 60 + "v: 1\n",
    ),
    Case("scalar-config", "config file", "must be a mapping", text="5\n"),
    Case("list-config", "config file", "must be a mapping", text="- name: x\n"),
    Case("string-config", "config file", "must be a mapping", text="just some words\n"),
    Case("empty-file", "config file", "is empty", text=""),
    Case("only-comments", "config file", "is empty", text="# name: x\n"),
    Case(
        "duplicate-top-key",
        "search",
        "appears twice",
        text="name: x\nsearch: {trials: 2}\nsearch: {trials: 9}\n",
    ),
    Case(
        "duplicate-nested-key",
        "trials",
        "appears twice",
        text="name: x\nsearch:\n  trials: 2\n  trials: 9\n",
    ),
    Case("utf16-config", "config file", "save it as UTF-8", text="name: x\n".encode("utf-16")),
    Case(
        "latin1-config", "config file", "save it as UTF-8", text="name: caf\xe9\n".encode("latin-1")
    ),
    Case("nul-in-config", "config file", "save it as UTF-8", text=b"name: x\n\0\n"),
    Case(
        "python-tag",
        "config file",
        "not valid YAML",
        text="name: !!python/object/apply:os.system [echo hi]\n",
    ),
    Case("undefined-alias", "config file", "not valid YAML", text="name: *nope\n"),
    Case("tab-indent", "config file", "not valid YAML", text="name: x\nsearch:\n\ttrials: 2\n"),
    Case("oversized-config", "config file", "more than", text="name: x\n" + "#" * (2 << 20) + "\n"),
    Case("config-is-directory", "config file", "is a directory", argv=("check", "{tmp}")),
    Case("config-is-dev-null", "config file", "not a regular file", argv=("check", "/dev/null")),
    Case("config-path-nul", "config file", "NUL byte", argv=("check", "a\0b.yaml")),
    # -- --set edge cases ----------------------------------------------------------------------
    Case("set-unclosed-list", "--set", "not valid YAML", sets=("search.space.ratio=[0.1",)),
    Case(
        "set-python-tag",
        "--set",
        "not valid YAML",
        sets=("name=!!python/object/apply:os.system [id]",),
    ),
    Case("set-empty-key-part", "--set", "empty key part", sets=("search..trials=3",)),
    Case("set-undefined-alias", "--set", "not valid YAML", sets=("name=*x",)),
    Case("set-nan", "search.deadline_s", "not a finite number", sets=("search.deadline_s=.nan",)),
    # -- type confusion ------------------------------------------------------------------------
    Case("target-word", "target", "expected a mapping", data={"target": "cpu"}),
    Case("target-null", "target", "expected a mapping", data={"target": None}),
    Case("target-list-of-words", "target[0]", "expected a mapping", data={"target": ["cpu"]}),
    Case("name-int", "name", "expected str", data={"name": 123}),
    Case("name-list", "name", "expected str", data={"name": ["a"]}),
    Case("search-scalar", "search", "expected a mapping", data={"search": 5}),
    Case("task-options-list", "task_options", "expected a mapping", data={"task_options": [1, 2]}),
    Case("trials-bool", "search.trials", "expected int", data={"search": {"trials": True}}),
    Case("seed-string", "search.seed", "expected int", data={"search": {"seed": "0"}}),
    # -- non-finite, negative and out-of-range numbers -----------------------------------------
    Case(
        "latency-nan",
        "constraints.max_latency_ms",
        "finite",
        text="name: x\nconstraints: {max_latency_ms: .nan}\n",
    ),
    Case(
        "deadline-inf", "search.deadline_s", "finite", text="name: x\nsearch: {deadline_s: .inf}\n"
    ),
    Case("lr-nan", "finetune.lr", "finite", text="name: x\nfinetune: {lr: .nan}\n"),
    Case("lr-inf", "finetune.lr", "finite", text="name: x\nfinetune: {lr: .inf}\n"),
    Case("max-cv-nan", "target.max_cv", "finite", text="name: x\ntarget: {max_cv: .nan}\n"),
    Case(
        "task-option-nan", "task_options", "finite", text="name: x\ntask_options: {width: .nan}\n"
    ),
    Case("seed-negative", "search.seed", ">= 0", data={"search": {"seed": -1}}),
    Case("seed-huge", "search.seed", "too large", data={"search": {"seed": 10**30}}),
    Case(
        "weight-decay-negative",
        "finetune.weight_decay",
        ">= 0",
        data={"finetune": {"weight_decay": -0.1}},
    ),
    Case("grace-negative", "search.grace_s", ">= 0", data={"search": {"grace_s": -1}}),
    Case("warmup-negative", "target.warmup", ">= 0", data={"target": {"warmup": -1}}),
    Case("num-cpus-negative", "resources.num_cpus", ">= 0", data={"resources": {"num_cpus": -1}}),
    Case("memory-negative", "resources.memory_mb", ">= 0", data={"resources": {"memory_mb": -5}}),
    Case("memory-zero", "resources.memory_mb", ">= 1", data={"resources": {"memory_mb": 0}}),
    Case(
        "retries-negative", "resources.max_retries", ">= 0", data={"resources": {"max_retries": -1}}
    ),
    Case(
        "round-to-empty",
        "search.space.round_to",
        "give at least one value",
        data={"search": {"space": {"round_to": []}}},
    ),
    Case(
        "iterative-steps-empty",
        "search.space.iterative_steps",
        "give at least one value",
        data={"search": {"space": {"iterative_steps": []}}},
    ),
    Case("trials-huge", "search.trials", "too large", data={"search": {"trials": 10**12}}),
    Case("lr-huge", "finetune.lr", "too large", data={"finetune": {"lr": 1e300}}),
    Case(
        "custom-cpu",
        "resources.custom",
        "set resources.num_cpus",
        data={"resources": {"custom": {"CPU": 1}}},
    ),
    Case(
        "custom-negative",
        "resources.custom",
        ">= 0",
        data={"resources": {"custom": {"trainer": -1}}},
    ),
    Case(
        "no-cpu-no-gpu",
        "resources.num_cpus",
        "a trial needs a CPU",
        data={"resources": {"num_cpus": 0}},
    ),
    # -- what this machine does not have (a local cluster) -------------------------------------
    Case("device-cuda", "target.device", "CUDA device(s)", data={"target": {"device": "cuda"}}),
    Case("device-cuda-abc", "target.device", "'cuda:N'", data={"target": {"device": "cuda:abc"}}),
    Case("device-cuda-7", "target.device", "CUDA device(s)", data={"target": {"device": "cuda:7"}}),
    Case("gpus-missing", "resources.num_gpus", "GPU(s)", data={"resources": {"num_gpus": 1}}),
    Case("cpus-missing", "resources.num_cpus", "CPU(s)", data={"resources": {"num_cpus": 4096}}),
    Case("threads-missing", "target.threads", "CPU(s)", data={"target": {"threads": 4096}}),
    Case(
        "gpu-run",
        "target.device",
        "CUDA device(s)",
        data={"target": {"device": "cuda"}},
        command="run",
    ),
    Case(
        "ray-address-silent",
        "ray_address",
        "nothing answers",
        data={"ray_address": "127.0.0.1:1"},
        command="run",
    ),
    Case("ray-address-garbled", "ray_address", "HOST:PORT", data={"ray_address": "nowhere"}),
    Case(
        "tracking-file-store",
        "tracking.uri",
        "sqlite:///mlflow.db",
        data={"tracking": {"uri": "file:///tmp/mlruns"}},
        command="run",
    ),
    Case("tracking-bare-path", "tracking.uri", "file store", data={"tracking": {"uri": "mlruns"}}),
    Case(
        "tracking-odd-scheme",
        "tracking.uri",
        "unknown scheme",
        data={"tracking": {"uri": "ftp://h/x"}},
    ),
    Case("extra-targets-scalar", "extra_targets", "expected a list", data={"extra_targets": 5}),
    Case("long-value-shortened", "nightly.alias", "...'", data={"nightly": {"alias": "a" * 900}}),
    Case(
        "local-target-resource",
        "target 'cpu'",
        "set ray_address",
        data={"target": {"resources": {"rpi5": 1}}},
        command="run",
    ),
    Case(
        "local-trainer-label",
        "resources",
        "set ray_address",
        data={"resources": {"label_selector": {"hw": "trainer"}}},
        command="run",
    ),
    # -- other commands: submit (nothing sent), sensitivity, nightly --------------------------
    Case(
        "submit-storage-query-password",
        "storage",
        "holds a password",
        data={"storage": f"postgresql://bot@db/optuna?password={NEEDLE}"},
        command="submit",
        flags=("--dry-run",),
    ),
    Case(
        "submit-storage-empty-user-password",
        "storage",
        "holds a password",
        data={"storage": f"postgresql://:{NEEDLE}@db/optuna"},
        command="submit",
        flags=("--dry-run",),
    ),
    Case(
        "submit-warm-start-password",
        "search.warm_start.storage",
        "holds a password",
        data={
            "storage": "postgresql://bot@db/optuna",
            "search": {"warm_start": {"storage": f"postgresql://bot:{NEEDLE}@db/old"}},
        },
        command="submit",
        flags=("--dry-run",),
    ),
    Case(
        "submit-no-address",
        "--address",
        "RAY_ADDRESS",
        command="submit",
        flags=("--allow-local-storage",),
    ),
    Case(
        "submit-include-outside",
        "--include",
        "outside the project",
        command="submit",
        flags=("--dry-run", "--allow-local-storage", "--include", "/etc/passwd"),
    ),
    Case(
        "sensitivity-nan",
        "search.sensitivity.max_drop",
        "finite",
        text="name: x\nsearch: {sensitivity: {max_drop: .nan}}\n",
        command="sensitivity",
    ),
    Case(
        "nightly-gpu",
        "resources.num_gpus",
        "GPU(s)",
        data={"resources": {"num_gpus": 2}},
        command="nightly",
    ),
    Case(
        "nightly-bad-date",
        "nightly.gate",
        "lie in [0, 1)",
        data={"nightly": {"gate": 1.5}},
        command="nightly",
    ),
    # -- names ---------------------------------------------------------------------------------
    Case("name-300-chars", "name", "more than 100", data={"name": "n" * 300}),
    Case("name-newline", "name", "letters", data={"name": "a\nb"}),
    Case(
        "experiment-control-char",
        "tracking.experiment",
        "control character",
        data={"tracking": {"experiment": "a\x07b"}},
    ),
    Case(
        "model-name-empty", "tracking.model_name", "letters", data={"tracking": {"model_name": ""}}
    ),
    # -- stores --------------------------------------------------------------------------------
    Case(
        "storage-dev-null", "storage", "not a regular file", data={"storage": "sqlite:////dev/null"}
    ),
    Case(
        "storage-fifo",
        "storage",
        "not a regular file",
        data={"storage": "sqlite:///fifo.db"},
        setup=_fifo,
    ),
    Case(
        "storage-proc-mem", "storage", "cannot read", data={"storage": "sqlite:////proc/self/mem"}
    ),
    Case(
        "tracking-proc-mem",
        "tracking.uri",
        "cannot read",
        data={"tracking": {"uri": "sqlite:////proc/self/mem"}},
    ),
    Case("storage-nul", "storage", "control character", data={"storage": "sqlite:///a\0b.db"}),
    Case(
        "storage-long-name",
        "storage",
        "too long",
        data={"storage": "sqlite:///" + "s" * 300 + ".db"},
    ),
    Case(
        "storage-huge",
        "storage",
        "characters",
        data={"storage": "sqlite:///" + "s/" * 2000 + "x.db"},
    ),
    Case(
        "storage-bad-port",
        "storage",
        "sqlite:///optuna.db",
        data={"storage": "postgresql://u@h:notaport/db"},
    ),
    Case(
        "same-sqlite",
        "tracking.uri",
        "give each its own file",
        data={"storage": "sqlite:///one.db", "tracking": {"uri": "sqlite:///one.db"}},
    ),
    Case(
        "same-sqlite-spelled-apart",
        "tracking.uri",
        "give each its own file",
        data={"storage": "sqlite:///./one.db", "tracking": {"uri": "sqlite:///one.db?mode=rw"}},
    ),
    Case(
        "same-sqlite-warm-start",
        "tracking.uri",
        "give each its own file",
        data={"search": {"warm_start": {"study": "s", "storage": "sqlite:///mlflow.db"}}},
    ),
    Case(
        "tracking-password-uppercase",
        "tracking.uri",
        "MLFLOW_TRACKING_PASSWORD",
        data={"tracking": {"uri": f"HTTPS://bot:{NEEDLE}@mlflow.example.com"}},
    ),
    Case(
        "tracking-password-no-user",
        "tracking.uri",
        "MLFLOW_TRACKING_PASSWORD",
        data={"tracking": {"uri": f"http://:{NEEDLE}@mlflow.example.com"}},
    ),
    Case(
        "tracking-password-query",
        "tracking.uri",
        "MLFLOW_TRACKING_PASSWORD",
        data={"tracking": {"uri": f"https://mlflow.example.com/?password={NEEDLE}"}},
    ),
    Case(
        "storage-password-masked",
        "storage",
        "start the database",
        data={"storage": f"postgresql://bot:{NEEDLE}@127.0.0.1:1/optuna"},
    ),
    Case(
        "storage-query-password-masked",
        "storage",
        "start the database",
        data={"storage": f"postgresql://bot@127.0.0.1:1/optuna?password={NEEDLE}"},
    ),
    # -- task references -----------------------------------------------------------------------
    Case(
        "task-subprocess-run",
        "task",
        "never the standard library",
        data={"task": "subprocess:run", "task_options": {"args": ["touch", "pwned"]}},
    ),
    Case("task-sys-exit", "task", "never the standard library", data={"task": "sys:exit"}),
    Case("task-os-system", "task", "never the standard library", data={"task": "os:system"}),
    Case(
        "task-site-package", "task", "never the standard library", data={"task": "yaml:safe_load"}
    ),
    Case("task-empty-module", "task", "write e.g. my_task:build", data={"task": ":build"}),
    Case("task-empty-function", "task", "write e.g. my_task:build", data={"task": "my_task:"}),
    Case("task-spaces", "task", "write e.g. my_task:build", data={"task": "my task:build"}),
    Case("task-dotted-attr", "task", "write e.g. my_task:build", data={"task": "os:path.join"}),
    Case(
        "task-reexported-stdlib",
        "task",
        "not defined in your project",
        data={"task": "reexports_stdlib:run"},
        files={"reexports_stdlib.py": REEXPORTS_STDLIB},
    ),
    Case(
        "task-exits-on-import",
        "task",
        "called sys.exit(3)",
        data={"task": "exits_on_import:build"},
        files={"exits_on_import.py": EXITS_ON_IMPORT},
    ),
    Case(
        "task-exits-in-build",
        "task",
        "called sys.exit(3)",
        data={"task": "exits_in_build:build"},
        files={"exits_in_build.py": EXITS_IN_BUILD},
    ),
    Case(
        "task-exits-in-forward",
        "task",
        "called sys.exit(4)",
        data={"task": "exits_in_forward:build"},
        files={"exits_in_forward.py": EXITS_IN_FORWARD},
    ),
    Case(
        "task-parses-argv",
        "task",
        "argparse",
        data={"task": "parses_argv:build"},
        files={"parses_argv.py": PARSES_ARGV},
    ),
    Case(
        "task-raises-on-import-nightly",
        "task",
        "importing module 'raises_on_import' failed",
        data={"task": "raises_on_import:build"},
        files={"raises_on_import.py": RAISES_ON_IMPORT},
        command="nightly",
    ),
    Case(
        "task-no-train-loader",
        "task",
        "give a torch DataLoader",
        data={"task": "no_train_loader:build"},
        files={"no_train_loader.py": NO_TRAIN_LOADER},
    ),
    Case(
        "task-all-frozen",
        "task",
        "unfreeze them",
        data={"task": "frozen_model:build"},
        files={"frozen_model.py": FROZEN},
    ),
    # -- read-only commands --------------------------------------------------------------------
    Case("pareto-no-store", "tracking.uri", "nothing has been tracked", command="pareto"),
    Case(
        "pareto-no-such-search",
        "tracking.experiment",
        "run search 'hostile' first",
        command="pareto",
        setup=_empty_mlflow,
    ),
    Case(
        "pareto-no-dir",
        "tracking.uri",
        "nothing has been tracked",
        data={"tracking": {"uri": "sqlite:////nonexistent-prunesearch-dir/m.db"}},
        command="pareto",
    ),
    Case(
        "pareto-unreachable",
        "tracking.uri",
        "no MLflow server answers",
        data={"tracking": {"uri": "http://127.0.0.1:1"}},
        command="pareto",
    ),
    Case("fetch-empty-uri", "uri", "models:/NAME@ALIAS", argv=("fetch", "")),
    Case("fetch-s3", "uri", "models:/NAME@ALIAS", argv=("fetch", "s3://b/m")),
    Case("fetch-path", "uri", "models:/NAME@ALIAS", argv=("fetch", ".")),
    Case(
        "fetch-no-store",
        "--tracking-uri",
        "nothing has been tracked",
        argv=("fetch", "models:/m@a"),
    ),
    Case(
        "fetch-no-dir",
        "--tracking-uri",
        "nothing has been tracked",
        argv=(
            "fetch",
            "models:/m@a",
            "--tracking-uri",
            "sqlite:////nonexistent-prunesearch-dir/m.db",
        ),
    ),
    Case(
        "fetch-unreachable",
        "--tracking-uri",
        "no MLflow server answers",
        argv=("fetch", "models:/m@a", "--tracking-uri", "http://127.0.0.1:1"),
    ),
]


def _write(case: Case, tmp_path: Path) -> Path:
    path = tmp_path / "search.yaml"
    if case.text is not None:
        content = case.text
    else:
        data = {**BASE, **(case.data or {})}
        content = yaml.safe_dump(data, allow_unicode=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


class RayStarted(BaseException):
    """Raised by the tripwire in place of ray.init."""


@pytest.fixture
def tripwire(monkeypatch):
    """Any attempt to start or join Ray fails the test (the refusal must come first)."""

    def refuse(*args, **kwargs):  # a BaseException: no error handler of the CLI swallows it
        raise RayStarted("Ray was started before the input was refused")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_before_ray_in_one_line(
    case, tmp_path, monkeypatch, capsys, tripwire, ledger
):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    for name, body in case.files.items():
        (tmp_path / name).write_text(body)
    if case.setup:
        case.setup(tmp_path)
    if case.argv is not None:
        argv = [a.replace("{tmp}", str(tmp_path)) for a in case.argv]
    else:
        argv = [case.command, str(_write(case, tmp_path))]
        argv += [*case.flags, *(a for s in case.sets for a in ("--set", s))]
    before = {p.name for p in tmp_path.iterdir()}
    capsys.readouterr()

    code = main(argv)
    out, err = capsys.readouterr()
    ledger.bad_input()
    ledger.planted(len(SECRETS))
    # Progress lines (e.g. "base model: digits, cached in ...") may come first, on stderr as
    # every prunesearch line does; the refusal is one line, the last, and the only error line.
    said = [ln for ln in err.splitlines() if ln.strip()]
    lines = [ln for ln in said if ln.startswith("prunesearch:")]
    assert code == 2, (code, out[-1500:], err[-1500:])
    assert len(lines) == 1 and said[-1] == lines[0], err[-3000:]
    assert lines[0].startswith(f"prunesearch: error: {case.field}"), lines[0]
    assert case.fix in lines[0], lines[0]
    assert len(lines[0]) < 700, lines[0]
    assert "Traceback" not in out + err
    assert NEEDLE not in out + err, "a secret was printed"
    created = {p.name for p in tmp_path.iterdir()} - before - {"__pycache__"}
    assert not created, f"a refused command created {sorted(created)}"
    ledger.check(9)


# What only a process shows: a FIFO or /dev/zero as the config would hang or eat memory, and a
# task's sys.exit would end the process with its own code. One process runs them in turn: it
# must answer each with exit 2 and one line, and reach the end (no exit escaped, nothing hung).
PROCESS_SCRIPT = """
import os, sys
from orchestrator.cli import main
os.mkfifo("fifo.yaml")
open("exits.py", "w").write("import sys\\nsys.exit(3)\\n")
open("exits.yaml", "w").write("name: x\\ntask: exits:build\\n")
for argv in (["check", "fifo.yaml"], ["check", "/dev/zero"], ["check", "exits.yaml"]):
    print("exit", main(argv), flush=True)
print("reached the end", flush=True)
"""


def test_fifo_dev_zero_and_a_task_exit_in_a_real_process(tmp_path, ledger):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(SECRETS, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", PROCESS_SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # a FIFO read without the fix blocks forever
    )
    assert proc.stdout.splitlines() == ["exit 2"] * 3 + ["reached the end"], proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("prunesearch:")]
    assert len(lines) == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "'fifo.yaml' is not a regular file" in lines[0]
    assert "'/dev/zero' is not a regular file" in lines[1]
    assert lines[2].startswith("prunesearch: error: task: exits:build called sys.exit(3)")
    assert NEEDLE not in proc.stdout + proc.stderr
    for _ in range(3):
        ledger.bad_input()
    ledger.check(6)


def test_a_local_ray_that_times_out_is_told_in_one_line(tmp_path, monkeypatch, capsys, ledger):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "search.yaml").write_text(yaml.safe_dump({**BASE, "name": "ray-timeout"}))

    def timed_out(*args, **kwargs):  # what Ray 2.60 raises when its raylet is slow under load
        raise Exception(
            "The current node timed out during startup. This could happen because some of the "
            "raylet failed to startup or the GCS has become overloaded."
        )

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", timed_out)
    assert main(["run", "search.yaml"]) == 2
    err = capsys.readouterr().err
    # (progress and library lines before the error are issue 17's, not counted here)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("prunesearch:")]
    assert len(lines) == 1 and "Traceback" not in err, lines
    assert lines[0].startswith(
        "prunesearch: error: ray_address: the local Ray cluster did not start"
    )
    assert "retry" in lines[0] and "ray_address" in lines[0]
    ledger.bad_input()
    ledger.check(3)


def test_an_unexpected_error_is_still_one_line_and_debug_shows_it(
    tmp_path, monkeypatch, capsys, ledger
):
    import orchestrator.cli

    def boom(*args, **kwargs):
        raise TypeError(f"'NoneType' object is not subscriptable (password={NEEDLE})")

    monkeypatch.setattr(orchestrator.cli, "load_config", boom)
    # Its own exit code: 1 is a partial run's, 2 a bad input's (README, exit codes).
    assert main(["check", str(tmp_path / "search.yaml")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("prunesearch: error: TypeError:") and len(err.splitlines()) == 1, err
    assert "--debug shows the traceback" in err and NEEDLE not in err and "Traceback" not in err
    with pytest.raises(TypeError):
        main(["--debug", "check", str(tmp_path / "search.yaml")])
    ledger.check(4)
