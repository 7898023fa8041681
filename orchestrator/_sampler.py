"""TPE with constant_liar that reads the study once per asked trial, not once per parameter.

Optuna's TPE under ``constant_liar`` re-reads every trial from storage for each parameter it
samples (its per-ask cache off), because threads of one ``optimize`` may write meanwhile. Here
the driver is the one writer of its studies and samples a trial's parameters back to back, so
the trials it would re-read are those of the ask's own cache (read once per ask, dropped at the
next ask or tell), which it reads for its start-up check anyway. On an RDB storage each read
loads the running trials anew: the screen's asks took about twice as long with the re-reads
(benchmarks/RESULTS.md, screen-driver), and the driver, not the workers, paced a screen.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import TPESampler
from optuna.trial import FrozenTrial, TrialState


class OneReadTPESampler(TPESampler):
    """``TPESampler`` whose liar reads are the ask's cached read (the same samples)."""

    def _sample(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not self._constant_liar:  # Optuna reads through the ask's cache itself then
            return super()._sample(study, trial, search_space)
        return super()._sample(_AskCache(study), trial, search_space)


class _AskCache:
    """The study, with every ``_get_trials`` (what TPE's ``_sample`` reads through) served from
    the ask's cached read."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        return self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=True)
