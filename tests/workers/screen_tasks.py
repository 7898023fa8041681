"""Tasks for the screening tests, named as ``module:function`` like a user's own task."""

from __future__ import annotations

from typing import Any

from workers import Task, build_task


class Forbidden:
    """A validation loader that must never be read by screening."""

    def __iter__(self):
        raise AssertionError("screening read the validation loader")

    def __len__(self) -> int:
        return 1


def digits_without_validation(options: dict[str, Any]) -> Task:
    """The built-in digits task whose validation loader raises when read."""
    task = build_task("digits", options)
    task.val_loader = Forbidden()
    return task
