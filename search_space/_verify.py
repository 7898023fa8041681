"""Dry runs: prune a copy of the model and check it still runs, to catch what no rule knows.

Torch-Pruning can build a group whose pruning breaks ``forward`` (a layer reshapes with a
width stored at construction, say). Discovery prunes every group on a copy, by a quarter or, for
groups as wide as others, by other ratios in turn (``dry_run_ratios``); if the copy fails,
halves of the groups are tried in turn until the failing groups are found.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ._arch import Setup
from ._buffers import BufferParameter
from ._parametrized import copy_model
from ._plan import exact_ratio, kept_channels
from ._stored_views import ModelCodeError

DRY_RUN_RATIO = 0.25
# The ratios groups of one width are dry-run at, in turn (the first is DRY_RUN_RATIO).
_LADDER = (DRY_RUN_RATIO, 0.5, 0.125, 0.375)

# The start of a reason whose error named its cause and fix in the model's code: discovery adds
# no guess read off the graph to it (a split hint beside a head-view error misled).
DIAGNOSED = "pruning it breaks the model in its code: "


def dry_run_ratios(
    roots: Sequence[str], channels: Mapping[str, int], splits: Mapping[str, int]
) -> dict[str, float]:
    """Root -> the ratio its dry run prunes it by: the groups of each width (channels and
    slices) each take the next ratio of ``_LADDER``, each width starting one further on. Why:
    at one ratio for all, groups of one width kept as many channels, so code that sizes one
    group's tensor by another's width (``q(h).view(B, T, heads, C // heads)`` with ``C`` read
    off the residual stream ``h``) ran in the dry run and failed at the first plan that cut the
    two unalike, in the trials."""
    start: dict[tuple[int | None, int], int] = {}  # width -> where its turns start
    taken: Counter[tuple[int | None, int]] = Counter()  # width -> its roots given a ratio
    ratios = {}
    for root in roots:
        width = (channels.get(root), splits.get(root, 1))
        first = start.setdefault(width, len(start))
        ratios[root] = _LADDER[(first + taken[width]) % len(_LADDER)]
        taken[width] += 1
    return ratios


def failing_groups(
    model: nn.Module,
    example_inputs: Any,
    roots: Sequence[str],
    ignored: Sequence[str],
    *,
    train_mode: bool = False,
    splits: Mapping[str, int] | None = None,
    channels: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """Group root -> why pruning it breaks the model; empty when all of ``roots`` prune cleanly.
    ``splits``: root -> the slices it is cut in (``PrunableGroup.split``), as plans cut it;
    ``channels``: root -> its channels, for the check that Torch-Pruning cuts what a plan says
    (a root not named is only checked to run)."""
    reference = Setup.of(model, train_mode=train_mode).output_shapes(example_inputs)
    ratios = dry_run_ratios(roots, channels or {}, splits or {})

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
            channels={r: c for r, c in (channels or {}).items() if r in inside},
            ratios=ratios,
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
    channels: Mapping[str, int] | None = None,
    ratios: Mapping[str, float] | None = None,
) -> str | None:
    """Prune ``roots`` by their ``ratios`` (else :data:`DRY_RUN_RATIO`) on a copy; the error,
    or None if it still works and each root of known ``channels`` kept what a plan at its ratio
    keeps."""
    trial = copy_model(model)
    modules = dict(trial.named_modules())
    setup = Setup.of(trial, train_mode=train_mode)
    splits = {r: (splits or {}).get(r, 1) for r in roots}
    ratio = {r: (ratios or {}).get(r, DRY_RUN_RATIO) for r in roots}
    kept = {r: kept_channels(ratio[r], c, 1, splits[r]) for r, c in (channels or {}).items()}
    # Where a root's channels are known, the ratio that keeps exactly ``kept`` (as apply_plan
    # gives a plan's), so that what Torch-Pruning cuts can be checked against it.
    exact = {
        modules[r]: exact_ratio(kept[r], channels[r], splits[r]) if r in kept else ratio[r]
        for r in roots
    }
    try:
        pruner = setup.pruner(
            example_inputs,
            _Ranked(),
            exact,
            [modules[n] for n in ignored if n in modules],
            slices={modules[r]: k for r, k in splits.items() if k > 1},
        )
        pruner.step()
        cut = {r: pruner.DG.get_out_channels(modules[r]) for r in kept}
        widths = {w for r, c in (channels or {}).items() for w in (c, c // splits[r])}
        misfit = _misfit_buffer(setup, widths) if widths else None
        setup.after_prune()
        setup.restore()
        shapes = setup.output_shapes(example_inputs)
    except ModelCodeError as exc:  # names its line and fix: whole, with nothing guessed beside it
        return f"{DIAGNOSED}{exc}"
    except Exception as exc:  # any failure is the answer we are looking for
        return f"pruning it breaks the model: {type(exc).__name__}: {_first_line(exc)}{_hint(exc)}"
    if shapes != reference:
        return f"pruning it changes the output shapes {reference} -> {shapes}"
    if misfit:
        return misfit
    for r, n in cut.items():
        if n != kept[r]:
            return (
                f"Torch-Pruning does not cut it as planned: a {ratio[r]} plan keeps {kept[r]} "
                f"of its {channels[r]} channels, Torch-Pruning kept {n}"
                + (_SKIPPED if n == channels[r] else "")
                + "; so it is not pruned"
            )
    return None


_SKIPPED = (
    " (it skips a group where a member would lose every value: a layer, or a buffer tied to "
    "the group through an op it takes for element-wise)"
)


def _misfit_buffer(setup: Setup, widths: set[int]) -> str | None:
    """Why a buffer Torch-Pruning cut (a buffer is a parameter while it works: a positional
    encoding is cut with the stream) was cut along a dim of none of the pruned groups' widths.
    Torch-Pruning takes a matmul for an element-wise op, so a causal mask added to attention
    scores, (T, T), was tied to the query and key channels: a plan cut the mask's columns and
    the model ran, attending where the mask had forbidden it."""
    for item in setup.stripped:
        if not isinstance(item, BufferParameter):
            continue
        now, was = item.module._parameters[item.name].shape, item.original.shape
        for dim, (a, b) in enumerate(zip(was, now, strict=True)):
            if a != b and a not in widths:
                # Named only here: every dry run of a bisection checks, few fail.
                owner = next(n for n, m in setup.model.named_modules() if m is item.module)
                name = f"{owner}.{item.name}".lstrip(".")
                return (
                    f"pruning it cuts the buffer '{name}' {tuple(was)} at dim {dim}, of {a} "
                    "values, none of the pruned groups' widths: Torch-Pruning tied it to their "
                    "channels through an op it takes for element-wise (a mask added to attention "
                    "scores, say), so it is not pruned"
                )
    return None


def tied_to(dg: tp.DependencyGraph, root: nn.Module, channel: int) -> set[int]:
    """``root``'s output channels Torch-Pruning cuts when asked to cut ``channel`` alone."""
    pruner = dg.get_pruner_of_module(root)
    if pruner is None or not dg.get_out_channels(root):
        return set()
    fn = pruner.prune_out_channels
    return {
        int(getattr(i, "idx", i))
        for dep, idxs in dg.get_pruning_group(root, fn, [channel])
        if dep.target.module is root and dep.handler == fn
        for i in idxs
    }


class _Ranked(tp.importance.GroupMagnitudeImportance):
    """L1 magnitude; where Torch-Pruning's criteria read no member (an embedding feeding a
    recurrent layer), the channels in order, so that every group is cut and checked (the
    search's criteria rank such groups by their own weights)."""

    def __init__(self) -> None:
        super().__init__(p=1)

    def __call__(self, group) -> torch.Tensor:
        imp = super().__call__(group)
        return torch.arange(len(group[0].idxs), dtype=torch.float32) if imp is None else imp


# What a dry run's error usually means, where PyTorch's words do not say it: pattern -> hint.
_HINTS = {
    re.compile(r"shape '\[[-\d, ]*\]' is invalid for input of size \d+"): (
        "the model's code reshapes this layer's output to a fixed size (a view or reshape with "
        "sizes stored when it was built, as hand-written attention does with its head width), "
        "which a pruned width cannot take; written with -1 for that dim (view(B, T, heads, -1)) "
        "it can be pruned"
    ),
}


def _hint(exc: BaseException) -> str:
    text = str(exc)
    hint = next((h for pattern, h in _HINTS.items() if pattern.search(text)), None)
    return f" ({hint})" if hint else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
