"""Dry runs: prune a copy of the model and check it still runs, to catch what no rule knows.

Torch-Pruning can build a group whose pruning breaks ``forward`` (a layer reshapes with a
width stored at construction, say). Discovery prunes every group by a quarter on a copy; if
the copy fails, halves of the groups are tried in turn until the failing groups are found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ._arch import Setup
from ._parametrized import copy_model

DRY_RUN_RATIO = 0.25


def failing_groups(
    model: nn.Module,
    example_inputs: Any,
    roots: Sequence[str],
    ignored: Sequence[str],
    *,
    train_mode: bool = False,
    splits: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """Group root -> why pruning it breaks the model; empty when all of ``roots`` prune cleanly.
    ``splits``: root -> the slices it is cut in (``PrunableGroup.split``), as plans cut it."""
    reference = Setup.of(model, train_mode=train_mode).output_shapes(example_inputs)

    def search(part: Sequence[str]) -> dict[str, str]:
        # The other groups are ignored, as apply_plan ignores the groups a plan leaves whole:
        # else one group's failure (Torch-Pruning cannot rank a grouped ConvTranspose) was
        # charged to every group tried beside it, and a prunable group was left out.
        inside = set(part)
        others = [r for r in roots if r not in inside]
        error = dry_run(
            model,
            example_inputs,
            part,
            [*ignored, *others],
            reference,
            train_mode=train_mode,
            splits=splits,
        )
        if error is None:
            return {}
        if len(part) == 1:
            return {part[0]: error}
        half = len(part) // 2
        found = search(part[:half]) | search(part[half:])
        return found or {r: f"fails only together with other groups: {error}" for r in part}

    return search(list(roots)) if roots else {}


def dry_run(
    model: nn.Module,
    example_inputs: Any,
    roots: Sequence[str],
    ignored: Sequence[str],
    reference: list[tuple[int, ...]],
    *,
    train_mode: bool = False,
    splits: Mapping[str, int] | None = None,
) -> str | None:
    """Prune ``roots`` by :data:`DRY_RUN_RATIO` on a copy; the error, or None if it still works."""
    import torch_pruning as tp

    trial = copy_model(model)
    modules = dict(trial.named_modules())
    setup = Setup.of(trial, train_mode=train_mode)
    try:
        pruner = setup.pruner(
            example_inputs,
            tp.importance.GroupMagnitudeImportance(p=1),
            {modules[r]: DRY_RUN_RATIO for r in roots},
            [modules[n] for n in ignored if n in modules],
            slices={modules[n]: k for n, k in (splits or {}).items() if n in roots},
        )
        pruner.step()
        setup.after_prune()
        setup.restore()
        shapes = setup.output_shapes(example_inputs)
    except Exception as exc:  # any failure is the answer we are looking for
        return f"pruning it breaks the model: {type(exc).__name__}: {_first_line(exc)}"
    if shapes != reference:
        return f"pruning it changes the output shapes {reference} -> {shapes}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
