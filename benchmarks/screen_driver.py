"""The screen's driver: what asking candidates costs on the search's SQLite storage.

    python -m benchmarks.screen_driver          # 96 and 384 candidates, 3 repeats
    python -m benchmarks.screen_driver --tiny   # smoke: 40 candidates, 1 repeat

The screen asks its candidates in batches of 16 with two batches in flight (a batch is told when
it comes back), from a TPE sampler with constant_liar on the search's own storage. Optuna's TPE
under constant_liar reads every trial from storage for each parameter it samples; the search's
sampler (`orchestrator.OneReadTPESampler`) reads once per asked trial. Both run here side by side
on the same pattern and seed, over 8 parameters (the allocation space's level, blend, criterion,
rounding and depth, and three more), each told two synthetic objectives, with the plan stored as
the screen stores it; the samples are checked equal. Reported: driver milliseconds per
candidate for the asks (ask + every suggest) and for the tells, median over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna
from optuna.samplers import TPESampler

from orchestrator import OneReadTPESampler, Screen, SearchConfig

from ._results import RESULTS, table, write_section

# The screen's defaults, read from the config: search.screen.batch, search.concurrency
BATCH, IN_FLIGHT = Screen().batch, int(SearchConfig().concurrency)
CRITERIA = ["l1", "l2", "bn_scale", "lamp", "taylor"]


def _suggest(t: optuna.Trial) -> dict:
    p = {
        "level": t.suggest_float("alloc/level", 0.0, 0.8, step=0.05),
        "blend": t.suggest_float("alloc/blend", 0.0, 1.0, step=0.05),
        "criterion": t.suggest_categorical("criterion", CRITERIA),
        "round_to": t.suggest_categorical("round_to", [1, 8]),
        "depth": t.suggest_int("depth/drop", 0, 3),
    }
    p |= {f"x{k}": t.suggest_float(f"extra/{k}", 0.0, 1.0) for k in range(3)}
    t.set_user_attr("plan", {"ratios": {f"g{k}": p["level"] for k in range(20)}, **p})
    return p


def _values(p: dict) -> list[float]:
    return [1.0 - p["level"] ** 2 - 0.05 * p["blend"] * p["x0"], 1.0 - p["level"] + 0.1 * p["x1"]]


def drive(sampler: optuna.samplers.BaseSampler, url: str, n: int) -> tuple[list, float, float]:
    """Ask ``n`` candidates as the screen does; returns the samples and the asks' and tells'
    seconds."""
    study = optuna.create_study(storage=url, sampler=sampler, directions=["maximize", "minimize"])
    asked, flight, ask_s, tell_s = [], [], 0.0, 0.0
    while len(asked) < n or flight:
        while len(asked) < n and len(flight) < IN_FLIGHT:
            t0 = time.perf_counter()
            batch = [
                (t, _suggest(t)) for t in (study.ask() for _ in range(min(BATCH, n - len(asked))))
            ]
            ask_s += time.perf_counter() - t0
            asked += [p for _, p in batch]
            flight.append(batch)
        t0 = time.perf_counter()
        for t, p in flight.pop(0):
            t.set_user_attr("score", p["level"])
            study.tell(t, _values(p))
        tell_s += time.perf_counter() - t0
    return asked, ask_s, tell_s


def rows(sizes: tuple[int, ...], repeats: int, tmp: Path) -> list[dict]:
    out = []
    for n in sizes:
        kw = {"seed": 0, "constant_liar": True, "n_startup_trials": max(10, n // 8)}
        got: dict[str, list[tuple[float, float]]] = {"optuna": [], "one": []}
        same = True
        for r in range(repeats):
            runs = {}
            for name, cls in (("optuna", TPESampler), ("one", OneReadTPESampler)):
                url = f"sqlite:///{tmp}/{name}-{n}-{r}.db"
                samples, ask_s, tell_s = drive(cls(**kw), url, n)
                runs[name] = samples
                got[name].append((ask_s, tell_s))
            same = same and runs["optuna"] == runs["one"]
        med = {k: tuple(statistics.median(x[i] for x in v) for i in (0, 1)) for k, v in got.items()}
        out.append(
            {
                "candidates": n,
                "ask ms / candidate, Optuna's TPE": f"{1000 * med['optuna'][0] / n:.0f}",
                "ask ms / candidate, one read": f"{1000 * med['one'][0] / n:.0f}",
                "ratio": f"{med['optuna'][0] / med['one'][0]:.2f}x",
                "tell ms / candidate": f"{1000 * med['one'][1] / n:.0f}",
                "same samples": "yes" if same else "NO",
            }
        )
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="smoke: 40 candidates, 1 repeat")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sizes, repeats = ((40,), 1) if args.tiny else ((96, 384), 3)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        found = rows(sizes, repeats, Path(tmp))
    cols = list(found[0])
    body = (
        "## The screen's driver: asking candidates on SQLite\n\n"
        f"Batches of {BATCH}, {IN_FLIGHT} in flight, TPE with constant_liar (the screen's "
        f"n_startup_trials), 8 parameters, median of {repeats} repeat(s), {time.perf_counter() - t0:.0f} s.\n\n"
        + table(found, cols)
    )
    return write_section("screen-driver", body, args.out)


if __name__ == "__main__":
    main()
