"""Run every benchmark and refresh benchmarks/RESULTS.md.

python -m benchmarks.run           # quick settings: 8.5 min on 2 idle cores (measured 2026-11-29):
                                   # orchestration 231 s, quality 130 s, early_stop 45 s, latency 42 s,
                                   # recovery 37 s, scaling 24 s; since added: demo (~3 min a
                                   # run of its 3 variants), cost_model, screen_driver (257 s),
                                   # screen_timing (~14 min), screen_criteria (~3 min),
                                   # demo_history (~7 min: 6 demos)
python -m benchmarks.run --full    # the full settings of each script
python -m benchmarks.run --out /tmp/RESULTS.md   # write the sections elsewhere
"""

from __future__ import annotations

import argparse
import time

from . import (
    cost_model,
    demo,
    demo_history,
    early_stop,
    latency,
    orchestration,
    quality,
    recovery,
    scaling,
    screen_criteria,
    screen_driver,
    screen_timing,
)
from ._results import RESULTS

SCRIPTS = {
    "latency": latency.main,
    "early_stop": early_stop.main,
    "orchestration": orchestration.main,
    "quality": quality.main,
    "scaling": scaling.main,
    "recovery": recovery.main,
    "demo": demo.main,
    "demo_history": demo_history.main,
    "cost_model": cost_model.main,
    "screen_driver": screen_driver.main,
    "screen_timing": screen_timing.main,
    "screen_criteria": screen_criteria.main,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true")
    p.add_argument(
        "--only", choices=sorted(SCRIPTS), action="append", help="run only these (repeatable)"
    )
    p.add_argument(
        "--out", default=str(RESULTS), help="the results file (default: benchmarks/RESULTS.md)"
    )
    args = p.parse_args(argv)
    walls: dict[str, float] = {}
    for name in args.only or SCRIPTS:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        print(SCRIPTS[name]([*(["--full"] if args.full else []), "--out", args.out]), flush=True)
        walls[name] = time.perf_counter() - t0
        print(f"== {name}: {walls[name]:.0f} s", flush=True)
    print(
        "wall time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items())
        + f"; total {sum(walls.values()) / 60:.1f} min",
        flush=True,
    )


if __name__ == "__main__":
    main()
