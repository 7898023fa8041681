"""Where a `module:function` task resolves from (issues 17 and 18).

A config names code, so it resolves only from the config's directory, the current directory,
PYTHONPATH entries or the installed `prunesearch.tasks` entry points; never from the standard
library or site-packages, and nothing is imported before its file is found there. Without any
environment variable, a task beside the config resolves on the driver and (through
PRUNESEARCH_TASK_PATH, which the CLI sets for the Ray workers it starts) on every worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import load_config
from workers import ENTRY_POINT_GROUP, TASK_PATH_VAR, resolve_task, task_source

ROOT = Path(__file__).resolve().parents[2]
TASK = "def build(options):\n    return options\n"


def _project(tmp_path: Path, module: str) -> tuple[Path, Path]:
    """A config directory holding a task module, and another directory to run from."""
    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    conf.mkdir()
    elsewhere.mkdir()
    (conf / f"{module}.py").write_text(TASK)
    (conf / "search.yaml").write_text(f"name: beside\ntask: {module}:build\n")
    return conf, elsewhere


def _clean_env(monkeypatch, cwd: Path) -> None:
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv(TASK_PATH_VAR, raising=False)


def test_a_task_beside_the_config_resolves_with_no_environment_variable(tmp_path, monkeypatch):
    conf, elsewhere = _project(tmp_path, "beside_config_task")
    _clean_env(monkeypatch, elsewhere)
    with pytest.raises(ValueError, match="cannot find module 'beside_config_task'"):
        resolve_task("beside_config_task:build")  # before the config is read: not a root

    config = load_config(conf / "search.yaml")
    assert resolve_task(config.task)({"x": 1}) == {"x": 1}
    assert task_source(config.task) == (conf / "beside_config_task.py").resolve()
    # What a Ray worker started now inherits: the config's directory as a task root.
    assert str(conf.resolve()) in os.environ[TASK_PATH_VAR].split(os.pathsep)


def test_a_worker_process_resolves_the_task_from_the_task_path_alone(tmp_path):
    conf, elsewhere = _project(tmp_path, "worker_side_task")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", TASK_PATH_VAR)}
    code = "from workers import resolve_task; print(resolve_task('worker_side_task:build')({}))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env={**env, TASK_PATH_VAR: str(conf)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "{}", proc.stderr[-2000:]


def test_examples_custom_yaml_checks_from_the_project_root_without_pythonpath():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", TASK_PATH_VAR)}
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "prunesearch"),
            "check",
            "examples/custom.yaml",
            "--set",
            "task_options.epochs=0",  # the resolution is the point, not the example's training
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("config ok: my-sensor-model"), proc.stdout


def test_a_refused_reference_imports_nothing(tmp_path, monkeypatch):
    _clean_env(monkeypatch, tmp_path)
    sys.modules.pop("this", None)  # importing it prints the Zen of Python
    with pytest.raises(ValueError, match="never the standard library"):
        resolve_task("this:x")
    assert "this" not in sys.modules


def test_a_local_module_shadowing_an_imported_one_is_refused(tmp_path, monkeypatch):
    _clean_env(monkeypatch, tmp_path)
    (tmp_path / "json.py").write_text(TASK)  # the stdlib's json is already imported
    with pytest.raises(ValueError, match="outside your project"):
        resolve_task("json:build")


def test_an_installed_entry_point_task_resolves_by_name_and_by_value(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "ep_task_pkg").mkdir(parents=True)
    (site / "ep_task_pkg" / "__init__.py").write_text(TASK)
    info = site / "ep_task_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-task-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nsensor = ep_task_pkg:build\n")
    monkeypatch.syspath_prepend(str(site))
    _clean_env(monkeypatch, tmp_path / "site" / "ep_task_pkg")  # not a root for it: cwd is inside
    monkeypatch.chdir(tmp_path)
    assert resolve_task("sensor")({"a": 1}) == {"a": 1}
    assert resolve_task("ep_task_pkg:build")({}) == {}
