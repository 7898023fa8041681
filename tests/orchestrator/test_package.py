"""The package's names load on first use, so a Ray worker that runs a bench or a trial does not
pay for MLflow, Optuna and plotting at start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest

import orchestrator


def test_every_exported_name_resolves():
    for name in orchestrator.__all__:
        assert getattr(orchestrator, name) is not None, name
    assert set(orchestrator.__all__) <= set(dir(orchestrator))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        orchestrator.nope  # noqa: B018


def test_importing_the_package_loads_none_of_the_driver_side_libraries():
    code = (
        "import sys, orchestrator\n"
        "print(sorted(m for m in ('mlflow', 'optuna', 'matplotlib') if m in sys.modules))\n"
        "orchestrator.run_search\n"
        "print('mlflow' in sys.modules and 'optuna' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"  # loaded when a driver-side name is first used
