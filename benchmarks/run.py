"""Run every benchmark and refresh benchmarks/RESULTS.md.

    python -m benchmarks.run           # quick settings (~12 min on 2 cores, + ~8 quality, ~3 scaling, ~5 recovery)
    python -m benchmarks.run --full    # the full settings of each script
"""

from __future__ import annotations

import argparse

from . import early_stop, latency, orchestration, quality, recovery, scaling

SCRIPTS = {"latency": latency.main, "early_stop": early_stop.main, "orchestration": orchestration.main,
           "quality": quality.main, "scaling": scaling.main, "recovery": recovery.main}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true")
    p.add_argument("--only", choices=sorted(SCRIPTS), action="append", help="run only these (repeatable)")
    args = p.parse_args(argv)
    for name in args.only or SCRIPTS:
        print(f"== {name}", flush=True)
        print(SCRIPTS[name](["--full"] if args.full else []), flush=True)


if __name__ == "__main__":
    main()
