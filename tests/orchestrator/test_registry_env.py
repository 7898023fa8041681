"""``_registry._env``: one environment variable set for a block, then put back as it was."""

from __future__ import annotations

import os

import pytest

from orchestrator._registry import _env

KEY = "PRUNESEARCH_TEST_ENV"


@pytest.mark.parametrize("before", [None, "old"])
@pytest.mark.parametrize("value", [None, "new"])
def test_env_sets_inside_and_restores_after_even_on_error(monkeypatch, before, value):
    monkeypatch.delenv(KEY, raising=False)
    if before is not None:
        monkeypatch.setenv(KEY, before)
    with pytest.raises(RuntimeError), _env(KEY, value):
        assert os.environ.get(KEY) == (before if value is None else value)
        os.environ[KEY] = "changed inside"  # what the block did is undone too
        raise RuntimeError
    assert os.environ.get(KEY) == before
