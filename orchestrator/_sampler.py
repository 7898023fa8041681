"""TPE with constant_liar that reads the study once per asked trial, not once per parameter.

Optuna's TPE under ``constant_liar`` re-reads every trial from storage for each parameter it
samples (``use_cache`` off), because threads of one ``optimize`` may write meanwhile. Here the
driver is the one writer of its studies and samples a trial's parameters back to back, so the
trials it would re-read are the ones it read for the trial's first parameter: one read serves
them all. On an RDB storage each read loads the running trials anew; for the screen's asks that
was most of the driver's time (96 candidates of ~10 parameters: ~900 reads, 4.5 s of the demo's
15 s screen under a profiler), so the driver, not the workers, paced a screen.
"""

from __future__ import annotations

import copy
from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import TPESampler
from optuna.trial import FrozenTrial, TrialState


class OneReadTPESampler(TPESampler):
    """``TPESampler`` whose liar reads are shared by one trial's parameters (same samples)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._read: tuple[tuple[int, int], list[FrozenTrial]] | None = None

    def _sample(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not self._constant_liar:  # Optuna caches per ask itself then
            return super()._sample(study, trial, search_space)
        return super()._sample(_OneRead(study, self._trials(study, trial)), trial, search_space)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._read = None  # a new ask: what was read for another trial is not reused
        super().before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._read = None  # a tell changed the study
        super().after_trial(study, trial, state, values)

    def _trials(self, study: optuna.Study, trial: FrozenTrial) -> list[FrozenTrial]:
        key = (study._study_id, trial.number)
        if self._read is None or self._read[0] != key:
            self._read = (key, study._storage.get_all_trials(study._study_id, deepcopy=False))
        return self._read[1]


class _OneRead:
    """The study, its trials read once (what TPE's ``_sample`` reads through ``_get_trials``)."""

    def __init__(self, study: optuna.Study, trials: list[FrozenTrial]) -> None:
        self._study, self._trials = study, trials

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        trials = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials
