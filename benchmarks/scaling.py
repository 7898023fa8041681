"""Scaling: discovery and plan-application time against model size; the sampler's ask time against
completed trials.

    python -m benchmarks.scaling            # quick: ResNet-18/50/152 + ViT-B/16; asks at 100/500/2000
                                            # trials, GP left out (one GP ask at 100 trials took 108 s); ~30 s
    python -m benchmarks.scaling --full     # every model (ResNet-18/34/50/101/152, ViT-B/16), 3 repeats;
                                            # GP at 2000 too (capped, see CAP_S)
    python -m benchmarks.scaling --tiny     # smoke test: ResNet-18, asks at 20 trials (GP skipped)

Models: torchvision, weights=None, input 1x3x224x224, one thread. Discovery is timed twice: the
trace alone (``verify=False``) and as ``prepare`` runs it (every group also test-pruned on a copy).
Plan application: ``workers.apply_plan`` with a uniform 0.3 plan (deep copy, trace, prune, output
check), what every trial pays. Samplers: built as the orchestrator builds them
(``orchestrator.SAMPLERS``, seed 0), on an in-memory two-objective study pre-filled with N
completed trials over a realistic space (20 per-layer ratios, a criterion, round_to); one ask is
``study.ask()`` plus every ``suggest_*`` call of a trial, as the search loop does, with torch's
default threads (GP uses torch), as in the driver.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
import torchvision
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from orchestrator import SAMPLERS
from search_space import discover, uniform_plan
from workers import apply_plan

from ._results import RESULTS, table, write_section

CAP_S = 30.0  # one ask slower than this: no more asks for that sampler, and no larger N
UNITS = 20
CRITERIA = ["l1", "l2", "bn_scale", "lamp"]


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    repeats: int
    sizes: tuple[int, ...]
    asks: int
    gp_max: int  # GP is skipped above this many trials


MODES = {
    "tiny": Settings(("resnet18",), 1, (20,), 1, 0),
    # GP is left out of the quick setting: with 22 parameters one ask at 100 trials took 108 s on
    # 2 cores (capped), more than the rest of this script together; --full measures it.
    "quick": Settings(("resnet18", "resnet50", "resnet152", "vit_b_16"), 1, (100, 500, 2000), 3, 0),
    "full": Settings(
        ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vit_b_16"),
        3,
        (100, 500, 2000),
        5,
        2000,
    ),
}


# -- discovery and plan application ----------------------------------------------------------
def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def model_row(name: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace_s, _ = _timed(lambda: discover(model, x, verify=False, warn=False), repeats)
        verify_s, found = _timed(lambda: discover(model, x, warn=False), repeats)
        plan = uniform_plan(found, 0.3)
        apply_s, pruned = _timed(lambda: apply_plan(model, x, plan), repeats)
    params = sum(p.numel() for p in model.parameters())
    kept = sum(p.numel() for p in pruned.parameters())
    return {
        "model": name,
        "params (M)": f"{params / 1e6:.1f}",
        "prunable groups": len(found.names),
        "discover: trace s": f"{trace_s:.2f}",
        "discover: trace + verify s": f"{verify_s:.2f}",
        "apply uniform 0.3 s": f"{apply_s:.2f}",
        "params kept": f"{kept / params:.2f}",
    }


# -- sampler ask time ------------------------------------------------------------------------
DISTS = {
    **{f"ratio/g{i}": FloatDistribution(0.0, 0.8, step=0.05) for i in range(UNITS)},
    "criterion": CategoricalDistribution(CRITERIA),
    "round_to": CategoricalDistribution([1, 8]),
}


def filled_study(sampler: str, n: int) -> optuna.Study:
    """N completed trials whose objectives follow the ratios (more pruning: faster, less accurate)."""
    rng = random.Random(n)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=SAMPLERS[sampler](0))
    trials = []
    for _ in range(n):
        params = {k: round(rng.randrange(17) * 0.05, 2) for k in DISTS if k.startswith("ratio/")}
        params |= {"criterion": rng.choice(CRITERIA), "round_to": rng.choice([1, 8])}
        mean = statistics.fmean(v for k, v in params.items() if k.startswith("ratio/"))
        values = [0.98 - 0.3 * mean**2 + rng.gauss(0, 0.01), 3.0 * (1 - mean) + rng.gauss(0, 0.05)]
        trials.append(create_trial(params=params, distributions=DISTS, values=values))
    study.add_trials(trials)
    return study


def ask_once(study: optuna.Study) -> float:
    t0 = time.perf_counter()
    trial = study.ask()
    for name, dist in DISTS.items():
        if isinstance(dist, FloatDistribution):
            trial.suggest_float(name, dist.low, dist.high, step=dist.step)
        else:
            trial.suggest_categorical(name, list(dist.choices))
    elapsed = time.perf_counter() - t0
    study.tell(trial, state=TrialState.FAIL)  # samplers ignore failed trials: N stays N
    return elapsed


def ask_ms(sampler: str, n: int, asks: int) -> tuple[float, bool]:
    """Median ms of ``asks`` asks; True when one ask exceeded CAP_S and the rest were skipped."""
    study = filled_study(sampler, n)
    times = []
    for _ in range(asks):
        times.append(ask_once(study))
        if times[-1] > CAP_S:
            return statistics.median(times) * 1000, True
    return statistics.median(times) * 1000, False


def ask_rows(s: Settings) -> list[dict]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    for sampler in SAMPLERS:
        row, capped = {"sampler": sampler}, False
        for n in s.sizes:
            if capped or (sampler == "gp" and n > s.gp_max):
                row[f"{n} trials"] = "skipped"
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ms, capped = ask_ms(sampler, n, s.asks)
            row[f"{n} trials"] = f"{ms:,.1f}" + (" (capped)" if capped else "")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true")
    p.add_argument(
        "--tiny", action="store_true", help="smoke test: ResNet-18, asks at 20 trials, no GP"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    s = MODES["tiny" if args.tiny else "full" if args.full else "quick"]
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # pruning runs in one trial worker: one thread
    try:
        models = [model_row(name, s.repeats) for name in s.models]
    finally:
        torch.set_num_threads(threads)  # the sampler runs in the driver, with its default threads
    asks = ask_rows(s)
    wall = time.perf_counter() - t0
    left_out = [m for m in MODES["full"].models if m not in s.models]
    gp_note = (
        "GP not run in this mode (`--full` runs it; one ask takes minutes at 100 trials). "
        if not s.gp_max
        else f"GP skipped above {s.gp_max} trials. "
        if s.gp_max < max(s.sizes)
        else ""
    )
    body = (
        "## Scaling\n\nDiscovery and plan application against model size (torchvision, weights=None, "
        f"input 1x3x224x224, 1 thread, median of {s.repeats} run(s)). `trace` is discovery alone; `trace + verify` "
        "is discovery as a search's `prepare` runs it (each group also test-pruned on a copy); `apply` is "
        "`workers.apply_plan` with a uniform 0.3 plan, which every trial pays.\n\n"
        + table(models, list(models[0]))
        + f"\n\nSampler ask time (ms, median of {s.asks} asks) against completed trials: one ask = "
        f"`study.ask()` + the {len(DISTS)} `suggest_*` calls of a trial ({UNITS} ratios, criterion, round_to), "
        f"two objectives, in-memory storage, samplers as `orchestrator.SAMPLERS` builds them, torch's default "
        f"{torch.get_num_threads()} threads. "
        f"An ask over {CAP_S:.0f} s stops that sampler (capped). {gp_note}"
        + (f"Not run in this mode: {', '.join(left_out)}. " if left_out else "")
        + "\n\n"
        + table(asks, list(asks[0]))
        + f"\n\nWall time: {wall:.0f} s.\n"
    )
    return write_section("scaling", body, args.out)


if __name__ == "__main__":
    print(main())
