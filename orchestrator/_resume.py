"""Is there anything left to run? Answered from the study alone, before Ray or the task start."""

from __future__ import annotations

import optuna

from ._config import Config
from ._study import finished_count


def already_finished(config: Config) -> str | None:
    """The line to print when the study has used its whole trial budget, else None.

    Only the study is read (no Ray, no task build, no MLflow): raising ``search.trials`` is
    what continues such a search, in the same study and the same MLflow parent run."""
    if config.name not in optuna.get_all_study_names(storage=config.storage):
        return None
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    done, budget = finished_count(study), config.search.trials
    if done < budget:
        return None
    return f"already finished: {done}/{budget} trials; raise search.trials to continue"
