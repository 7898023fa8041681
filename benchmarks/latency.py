"""Latency measurement: how repeatable and how costly it is, and how far MACs are from speed-up.

    python -m benchmarks.latency            # quick: 64x64 inputs, fewer runs (~1 min here)
    python -m benchmarks.latency --full     # 224x224 inputs, more runs

For each model: the same model measured several times (CV of the medians, cost per measurement),
then a sweep of uniform channel ratios at batch 1 and 32: MACs reduction next to measured speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
from scipy.stats import kendalltau

from search_space import discover, uniform_plan
from workers import DigitsNet, Target, apply_plan, calibrate, count_macs_params, measure_latency

from ._results import RESULTS, SMOKE_TIMING, table, write_section


def models(size: int) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "digits-cnn": (DigitsNet(32), torch.randn(1, 1, 8, 8)),
        "resnet18": (torchvision.models.resnet18(weights=None), torch.randn(1, 3, size, size)),
        "mobilenet_v2": (
            torchvision.models.mobilenet_v2(weights=None),
            torch.randn(1, 3, size, size),
        ),
    }


LOAD: list[float] = []  # the 1-minute load average after each paired measurement: was it quiet?


def spread(values: list[float]) -> float:
    """(max - min) / median: how far apart repeated figures of one quantity land."""
    return (max(values) - min(values)) / statistics.median(values)


def repeatability(model, x, target: Target, repeats: int) -> dict:
    """The issue's protocol: the dense model timed absolutely, alternating with a 30 %-pruned
    copy timed against it pair by pair; the spread of each figure over the repeats, and what one
    measurement costs (per measurement, and per timed run of either model)."""
    pruned = apply_plan(model, x, uniform_plan(discover(model, x), 0.3))
    absolute = replace(target, paired=False, rounds=4, runs=target.runs)
    dense_ms, pruned_abs, ratios, costs = [], [], [], {"absolute": [], "paired": []}
    pairs, errors = [], []
    for _ in range(repeats):
        dense = measure_latency(model, x, absolute)
        dense_ms.append(dense.median_ms)
        alone = measure_latency(pruned, x, absolute)
        pruned_abs.append(alone.median_ms)
        costs["absolute"].append(alone.seconds / alone.runs)
        paired = measure_latency(pruned, x, target, reference=model)
        ratios.append(paired.ratio)
        pairs.append(paired.pairs)
        errors.append(paired.ratio_se)
        LOAD.append(os.getloadavg()[0])
        costs["paired"].append(paired.seconds / (2 * paired.runs))
    return {
        "dense abs spread": f"{100 * spread(dense_ms):.1f} %",
        "pruned abs spread": f"{100 * spread(pruned_abs):.1f} %",
        "pruned/dense abs spread": f"{100 * spread([p / d for p, d in zip(pruned_abs, dense_ms, strict=True)]):.1f} %",
        "paired ratio": f"{statistics.median(ratios):.3f}",
        "paired spread": f"{100 * spread(ratios):.1f} %",
        "pairs": f"{int(statistics.median(pairs))} ({min(pairs)}-{max(pairs)})",
        "paired SE": f"{100 * statistics.median(errors):.2f} %",
        "abs s/measurement": f"{statistics.median(costs['absolute']) * alone.runs:.2f}",
        "paired s/measurement": f"{statistics.median(costs['paired']) * 2 * paired.runs:.2f}",
        "paired/abs cost per timed run": f"{statistics.median(costs['paired']) / statistics.median(costs['absolute']):.2f}x",
        "_paired_spread": spread(ratios),
        "_abs_spread": spread(pruned_abs),
    }


@contextlib.contextmanager
def background_load(on: bool, processes: int = 2, limit_s: float = 600.0) -> Iterator[None]:
    """Busy processes on every core while ``on`` (a shared machine's neighbours), killed on exit
    and in any case after ``limit_s`` (they end themselves: bounded even if we are killed)."""
    procs = []
    if on:
        code = f"import time\nend = time.time() + {limit_s}\nwhile time.time() < end: pass"
        procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(processes)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def search_order(model, x, target: Target, count: int, passes: int) -> dict:
    """``count`` architectures timed once each in a search's order, a background load switched
    on and off between them (as neighbours come and go), absolute and paired; then re-timed
    side by side, quiet and interleaved, ``passes`` times. Kendall tau of each against that."""
    found = discover(model, x)
    ratios = [round(0.05 * i, 2) for i in range(count)]
    archs = {r: apply_plan(model, x, uniform_plan(found, r)) if r else model for r in ratios}
    order = [ratios[i] for i in torch.randperm(count, generator=torch.Generator().manual_seed(0))]
    calibration = calibrate(model, x, target)["ms"]
    absolute, paired = {}, {}
    for i, r in enumerate(order):
        with background_load(on=(i // 2) % 2 == 1):  # two on, two off, ...
            absolute[r] = measure_latency(archs[r], x, replace(target, paired=False)).median_ms
            stats = measure_latency(archs[r], x, target, reference=model)
            paired[r] = stats.ratio * calibration
    side = {r: [] for r in ratios}
    for _ in range(passes):
        for r in ratios:
            side[r].append(measure_latency(archs[r], x, replace(target, paired=False)).median_ms)
    truth = [statistics.median(side[r]) for r in ratios]
    return {
        "architectures": count,
        "tau absolute": round(kendalltau([absolute[r] for r in ratios], truth).statistic, 3),
        "tau paired": round(kendalltau([paired[r] for r in ratios], truth).statistic, 3),
        "passes side by side": passes,
    }


def sweep(name, model, x, ratios, batches, target_kw) -> list[dict]:
    """Uniform prunings: MACs cut next to the measured speed-up (paired against the dense model)."""
    found = discover(model, x)
    rows = []
    base_macs, _ = count_macs_params(model, x)
    for r in ratios:
        pruned = apply_plan(model, x, uniform_plan(found, r)) if r > 0 else model
        macs, params = count_macs_params(pruned, x)
        row = {
            "model": name,
            "ratio": r,
            "MACs kept": f"{macs / base_macs:.2f}",
            "MACs cut": f"{base_macs / macs:.2f}x",
        }
        for b in batches:
            stats = measure_latency(pruned, x, Target(batch_size=b, **target_kw), reference=model)
            row[f"b{b} ms"] = f"{stats.median_ms:.2f}"
            row[f"b{b} speed-up"] = f"{1 / stats.ratio:.2f}x"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true", help="224x224 inputs and more timed runs")
    p.add_argument("--tiny", action="store_true", help="smoke test: one model, one ratio")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    started = time.perf_counter()
    LOAD.append(os.getloadavg()[0])
    size = 224 if args.full else 64
    target_kw = {"threads": 1, "runs": 30 if args.full else 12, "warmup": 3}  # pairs: the product's
    chosen = models(size)
    repeats = 6
    if args.tiny:
        chosen = {"digits-cnn": chosen["digits-cnn"]}
        target_kw.update(runs=3, pairs=4, **SMOKE_TIMING)
        repeats = 2
    rep_rows, sweep_rows = [], []
    for name, (model, x) in chosen.items():
        model.eval()
        for b in (1, 32):
            rep = repeatability(model, x, Target(batch_size=b, **target_kw), repeats)
            rep_rows.append({"model": name, "batch": b, **rep})
            print(rep_rows[-1], file=sys.stderr, flush=True)  # progress: a long run shows rows
        ratios = [0.0, 0.5] if args.tiny else [0.0, 0.25, 0.5, 0.75]
        sweep_rows += sweep(name, model, x, ratios, (1, 32), target_kw)
    model, x = chosen["digits-cnn" if args.tiny else "resnet18"]
    order = search_order(
        model, x, Target(batch_size=8, **target_kw), 4 if args.tiny else 12, 2 if args.tiny else 5
    )
    worst = max(rep_rows, key=lambda r: r["_paired_spread"])
    LOAD.append(os.getloadavg()[0])
    wall = time.perf_counter() - started
    defaults = Target()
    body = (
        f"## Latency measurement\n\nInputs {size}x{size} (digits: 8x8), CPU, 1 thread, "
        f"{target_kw['warmup']} warm-up runs. Absolute: 4 rounds x {target_kw['runs']} runs. "
        f"Paired: at least {target_kw.get('pairs', defaults.pairs)} pairs of {defaults.pair_runs} "
        "back-to-back runs of the candidate and as many of the reference (each half counts its "
        "fastest run), the first of each pair alternating (ABBA), then more in blocks of as many until the "
        f"ratio's standard error is within {defaults.precision} of it and the pairs have run "
        f"{defaults.min_seconds} s (at most {defaults.max_pairs} pairs); the ratio is the interquartile mean of the per-pair log ratios. Pairs: median "
        "(min-max) over the repeats; paired SE: the median standard error of the ratio.\n\n"
        f"Repeatability: {repeats} repeats of (the dense model absolute, a 30 %-pruned copy absolute, "
        "the pruned copy paired against the dense model), side by side. Spread = (max - min) / median "
        "over the repeats. Cost per timed run counts both models' runs in a paired measurement.\n\n"
        + table(rep_rows, [k for k in rep_rows[0] if not k.startswith("_")])
        + f"\n\nWall time {wall / 60:.0f} min. Load average (1 min) on the {os.cpu_count()} cores, "
        f"sampled after each paired repeat: {min(LOAD):.1f}-{max(LOAD):.1f} "
        f"(median {statistics.median(LOAD):.1f}); above {os.cpu_count()} the machine was shared."
        + f"\n\nWorst paired spread: {100 * worst['_paired_spread']:.1f} % ({worst['model']}, batch "
        f"{worst['batch']}); the absolute spread of the same model there: {100 * worst['_abs_spread']:.1f} %.\n\n"
        "Search order under a background load: "
        f"{order['architectures']} uniform prunings of {'digits-cnn' if args.tiny else 'resnet18'} "
        "(ratios 0-0.55) at batch 8 timed once each in a shuffled order, two busy processes (one per core) "
        "switched on for two measurements, off for two, and so on; then re-timed quiet, "
        f"interleaved, {order['passes side by side']} passes, median (the truth). Kendall tau of the "
        f"search-time latencies with the truth: absolute **{order['tau absolute']}**, paired "
        f"**{order['tau paired']}**.\n\n"
        "MACs vs measured speed-up (paired), uniform channel ratio (L1), no finetuning:\n\n"
        + table(sweep_rows, list(sweep_rows[0]))
    )
    return write_section("latency", body, args.out)


if __name__ == "__main__":
    print(main())
