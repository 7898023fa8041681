"""`make demo` as a user runs it, today's code against an earlier commit's, side by side.

    python -m benchmarks.demo_history                # against the demo before the screen, 3 each
    python -m benchmarks.demo_history --rev REV      # against any commit (its code on this venv)
    python -m benchmarks.demo_history --tiny         # smoke: HEAD against itself, 2 trials

The issue that made the screen the default asked that `make demo` "still finish in about the same
time". `benchmarks.demo` compares variants of today's code (the screen off is not the demo as it
was: everything else is today's). Here each side is the command a user runs, `prunesearch run
examples/digits.yaml`, from its own commit's tree (`git archive`, imported on this venv through
PYTHONPATH, so its Ray workers run it too), each run in a new directory and a new local Ray
instance, as `make demo` starts one; the two sides alternate, so drift hits both alike. The clock
includes everything the user waits for (imports, Ray's start, the search, MLflow, shutdown). The
default earlier commit is the one before the screen became the default search (8438510).
Hypervolumes are each run's own measurement, on its own base timing: compare them run by run.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ._results import RESULTS, SMOKE_SCREEN, SMOKE_TIMING, table, write_section

ROOT = Path(__file__).resolve().parent.parent
BEFORE_SCREEN = "8438510^"  # the commit before "Screening ... as the default search"
RUN_TIMEOUT_S = 900


def export(rev: str, into: Path) -> Path:
    """``rev``'s tree, as `git archive` writes it, in ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev],
        check=True,
        capture_output=True,
    ).stdout
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_demo(tree: Path, workdir: Path, overrides: list[str]) -> dict:
    """One `prunesearch run examples/digits.yaml` of ``tree``'s code in ``workdir``."""
    workdir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local instance each
    env["PYTHONPATH"] = str(tree)
    code = "import sys; from orchestrator.cli import main; sys.exit(main())"
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [sys.executable, "-c", code, "run", str(tree / "examples" / "digits.yaml"), *sets]
    t0 = time.perf_counter()
    done = subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    wall = time.perf_counter() - t0
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{tree.name}: exit {done.returncode}\n{out[-2000:]}")
    return {"wall": wall, **read_output(out)}


def read_output(out: str) -> dict:
    """What a run printed: its front's size and hypervolume, and whether it trained the base
    model (a first run on a machine does, once: such a run is not counted)."""
    front = re.search(r"Pareto front of .*?\((\d+) models?;.*?hypervolume ([0-9.]+)\)", out)
    return {
        "front": int(front.group(1)) if front else 0,
        "hypervolume": float(front.group(2)) if front else float("nan"),
        "trained": bool(re.search(r"base model: training", out)),
    }


def _median_wall(runs: list[dict]) -> float:
    """The median wall of the runs that found the base model cached (all, if none did)."""
    counted = [r for r in runs if not r["trained"]] or runs
    return statistics.median(r["wall"] for r in counted)


def _row(label: str, runs: list[dict]) -> dict:
    each = [f"{r['wall']:.1f}" + (" (trained the base)" if r["trained"] else "") for r in runs]
    return {
        "code": label,
        "wall s (median)": f"{_median_wall(runs):.1f}",
        "each run": ", ".join(each),
        "hypervolume, each run": ", ".join(f"{r['hypervolume']:.4f}" for r in runs),
        "front points": ", ".join(str(r["front"]) for r in runs),
    }


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser()
    p.add_argument("--rev", default=BEFORE_SCREEN, help="the earlier commit (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None, help="runs of each side (3)")
    p.add_argument("--full", action="store_true", help="5 runs of each side")
    p.add_argument("--tiny", action="store_true", help="smoke: HEAD against itself, 1 run each")
    p.add_argument("--section", default="demo-history")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    rev, repeats, overrides = args.rev, args.repeats or (5 if args.full else 3), []
    if args.tiny:
        rev, repeats = "HEAD", 1
        overrides = ["search.trials=2", f"search.screen.candidates={SMOKE_SCREEN}"]
        overrides += [f"target.{k}={v}" for k, v in SMOKE_TIMING.items()]
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        sides = {
            "today's (this tree)": ROOT,
            f"earlier ({sha})": export(rev, Path(tmp) / "earlier"),
        }
        runs: dict[str, list[dict]] = {label: [] for label in sides}
        for r in range(repeats):
            # The earlier commit first in even repeats: neither side always runs second.
            order = list(sides) if r % 2 else list(sides)[::-1]
            for label in order:
                work = Path(tmp) / f"run-{r}-{list(sides).index(label)}"
                runs[label].append(run_demo(sides[label], work, overrides))
    rows = [_row(label, runs[label]) for label in sides]
    today, earlier = (_median_wall(runs[label]) for label in sides)
    body = (
        "## `make demo` against an earlier commit's, as a user runs it\n\n"
        f"`prunesearch run examples/digits.yaml`, {repeats} run(s) of each side alternating, "
        "each from its commit's own tree in a new directory and a new local Ray instance; the "
        "clock is everything the user waits for (imports, Ray's start, search, MLflow, "
        "shutdown). Hypervolumes: each run's own measurement, on its own base timing.\n\n"
        + table(rows, list(rows[0]))
        + f"\n\nToday's / earlier: **{today / earlier:.2f}x** the wall time.\n"
    )
    return write_section(args.section, body, args.out)


if __name__ == "__main__":
    print(main())
