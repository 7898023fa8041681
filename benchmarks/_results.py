"""Write one section of benchmarks/RESULTS.md, leaving the others as they are.

Each script owns a section between markers, so scripts run at different times can share the file.
Every section states the command and the machine it came from.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
# A smoke run's paired timing: to 5 %, no time floor. A smoke run checks that a script runs and
# writes its section, not the numbers; at the product's 1 % and 0.5 s floor each of its dozens of
# measurements costs seconds.
SMOKE_TIMING = {"precision": 0.05, "min_seconds": 0.0}
# And it screens a few candidates, not the default's 96 (35-48 s a search here).
SMOKE_SCREEN = 8
HEADER = "# Benchmark results\n\nWritten by the scripts in `benchmarks/`; each section says how it was made.\n"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.machine()}"
    )


def write_section(name: str, body: str, path: Path = RESULTS) -> Path:
    command = "python -m " + " ".join(
        [f"benchmarks.{Path(sys.argv[0]).stem}", *_shown(sys.argv[1:])]
    )
    block = (
        f"<!-- begin {name} -->\n{body.rstrip()}\n\n"
        f"Command: `{command}`  \nMachine: {machine()}\n<!-- end {name} -->"
    )
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(
        rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->", re.S
    )
    text = (
        pattern.sub(lambda _m: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    path.write_text(text)
    return path


def _shown(args: list[str]) -> list[str]:
    """The command's arguments without ``--out PATH``: where a section was written is not how it was made."""
    out, skip = [], False
    for a in args:
        if skip or a.startswith("--out="):
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        out.append(a)
    return out


def worker_seconds(trial) -> float:
    """A finished trial's worker seconds: every stage it recorded (prune, finetune, evaluate,
    time), what a screened candidate's cost is set against."""
    return float(sum(trial.user_attrs.get("seconds", {}).values()))


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def time_interleaved(
    models: dict, example_inputs, target, passes: int, seed: int
) -> dict[str, float]:
    """Median latency of each model over ``passes`` passes, each timing every model once in a
    fresh random order: machine load drifts onto all of them alike."""
    import random
    import statistics

    from workers import measure_latency

    times: dict[str, list[float]] = {k: [] for k in models}
    rng = random.Random(seed)
    for _ in range(passes):
        keys = list(models)
        rng.shuffle(keys)
        for k in keys:
            times[k].append(measure_latency(models[k], example_inputs, target).median_ms)
    return {k: statistics.median(v) for k, v in times.items()}


def paired_interleaved(
    models: dict, reference: str, example_inputs, target, passes: int, seed: int
) -> dict[str, float]:
    """Latency of each model as a fraction of ``models[reference]``'s: each pass times every model
    paired against the reference (``measure_latency``'s paired protocol), in a fresh random order;
    the median over passes. Ratios, not milliseconds: on a shared machine absolute medians of the
    same model move by tens of percent between passes, and the pairs cancel that."""
    import random
    import statistics

    from workers import measure_latency

    ratios: dict[str, list[float]] = {k: [] for k in models if k != reference}
    rng = random.Random(seed)
    for _ in range(passes):
        keys = list(ratios)
        rng.shuffle(keys)
        for k in keys:
            stats = measure_latency(models[k], example_inputs, target, reference=models[reference])
            ratios[k].append(float(stats.ratio))
    return {reference: 1.0} | {k: statistics.median(v) for k, v in ratios.items()}
