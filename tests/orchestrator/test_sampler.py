"""The TPE sampler of the screen and of `tpe` searches: the samples of Optuna's own TPE with
constant_liar, from one read of the study per asked trial."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.samplers import TPESampler
from optuna.storages import InMemoryStorage

from orchestrator import OneReadTPESampler

STARTUP = 6


def _search(sampler: optuna.samplers.BaseSampler, storage: object, n: int = 40) -> list[dict]:
    """Ask in batches of 4 with 8 in flight (as the screen does), tell the oldest 4 each time."""
    study = optuna.create_study(
        storage=storage, sampler=sampler, directions=["maximize", "minimize"]
    )
    asked, running = [], []
    for _ in range(n):
        t = study.ask()
        params = {f"r{k}": t.suggest_float(f"r{k}", 0.0, 0.8, step=0.05) for k in range(5)}
        params["criterion"] = t.suggest_categorical("criterion", ["l1", "l2", "taylor"])
        params["round_to"] = t.suggest_int("round_to", 1, 8, log=True)
        asked.append(params)
        running.append((t, params))
        if len(running) >= 8:
            for trial, p in running[:4]:
                ratios = [p[f"r{k}"] for k in range(5)]
                accuracy = 1.0 - sum(r * r for r in ratios) - 0.1 * (p["criterion"] == "l1")
                study.tell(trial, [accuracy, 1.0 - sum(ratios) / 5 + 0.01 * p["round_to"]])
            running = running[4:]
    return asked


def _pair(seed: int) -> tuple[TPESampler, OneReadTPESampler]:
    kw = {"seed": seed, "constant_liar": True, "n_startup_trials": STARTUP}
    return TPESampler(**kw), OneReadTPESampler(**kw)


@pytest.mark.parametrize("seed", [0, 7])
def test_samples_what_optunas_tpe_samples_on_an_rdb_storage(tmp_path: Path, seed: int) -> None:
    plain, one_read = _pair(seed)
    expected = _search(plain, f"sqlite:///{tmp_path / 'plain.db'}")
    assert _search(one_read, f"sqlite:///{tmp_path / 'one.db'}") == expected


class _CountingStorage(InMemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get_all_trials(self, *args: object, **kwargs: object) -> list:
        self.reads += 1
        return super().get_all_trials(*args, **kwargs)


def test_reads_the_study_a_bounded_number_of_times_per_trial_not_per_parameter() -> None:
    plain, one_read = _pair(3)
    counted = {}
    for name, sampler in (("plain", plain), ("one", one_read)):
        storage = _CountingStorage()
        _search(sampler, storage, n=30)
        counted[name] = storage.reads
    sampled = 30 - STARTUP  # trials TPE sampled (the first ones are random)
    # 7 parameters per trial: Optuna's liar reads the study for each; ours reads the ask's one
    # cached read (the other read per trial is the tell's)
    assert counted["one"] <= 2 * 30
    assert counted["plain"] - counted["one"] >= 4 * sampled


def test_without_constant_liar_it_is_optunas_tpe() -> None:
    kw = {"seed": 1, "n_startup_trials": STARTUP}
    expected = _search(TPESampler(**kw), InMemoryStorage(), n=20)
    assert _search(OneReadTPESampler(**kw), InMemoryStorage(), n=20) == expected
