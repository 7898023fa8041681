"""Latency measurement: how repeatable and how costly it is, and how far MACs are from speed-up.

    python -m benchmarks.latency            # quick: 64x64 inputs, fewer runs (~1 min here)
    python -m benchmarks.latency --full     # 224x224 inputs, more runs

For each model: the same model measured several times (CV of the medians, cost per measurement),
then a sweep of uniform channel ratios at batch 1 and 32: MACs reduction next to measured speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torchvision

from search_space import discover, uniform_plan
from workers import Target, apply_plan, count_macs_params, measure_latency
from workers._digits import DigitsNet

from ._results import RESULTS, table, write_section


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


def repeatability(model, x, target: Target, repeats: int) -> dict:
    medians, costs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stats = measure_latency(model, x, target)
        costs.append(time.perf_counter() - t0)
        medians.append(stats.median_ms)
    return {
        "median_ms": round(statistics.median(medians), 3),
        "cv_between": round(statistics.stdev(medians) / statistics.fmean(medians), 4),
        "cv_within": round(stats.cv, 4),
        "cost_s": round(statistics.median(costs), 2),
    }


def sweep(name, model, x, ratios, batches, target_kw) -> list[dict]:
    found = discover(model, x)
    rows = []
    base_macs, _ = count_macs_params(model, x)
    base = {
        b: measure_latency(model, x, Target(batch_size=b, **target_kw)).median_ms for b in batches
    }
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
            ms = measure_latency(pruned, x, Target(batch_size=b, **target_kw)).median_ms
            row[f"b{b} ms"] = f"{ms:.2f}"
            row[f"b{b} speed-up"] = f"{base[b] / ms:.2f}x"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true", help="224x224 inputs and more timed runs")
    p.add_argument("--tiny", action="store_true", help="smoke test: one model, one ratio")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    size = 224 if args.full else 64
    target_kw = {
        "threads": 1,
        "rounds": 5 if args.full else 3,
        "runs": 20 if args.full else 8,
        "warmup": 3,
    }
    chosen = models(size)
    if args.tiny:
        chosen = {"digits-cnn": chosen["digits-cnn"]}
        target_kw.update(rounds=2, runs=3)
    rep_rows, sweep_rows = [], []
    for name, (model, x) in chosen.items():
        model.eval()
        for b in (1, 32):
            rep = repeatability(
                model, x, Target(batch_size=b, **target_kw), repeats=2 if args.tiny else 5
            )
            rep_rows.append({"model": name, "batch": b, **rep})
        ratios = [0.0, 0.5] if args.tiny else [0.0, 0.25, 0.5, 0.75]
        sweep_rows += sweep(name, model, x, ratios, (1, 32), target_kw)
    body = (
        f"## Latency measurement\n\nInputs {size}x{size} (digits: 8x8), CPU, 1 thread, "
        f"{target_kw['rounds']} rounds x {target_kw['runs']} runs after {target_kw['warmup']} warm-up runs.\n\n"
        "Repeatability: the same model measured 5 times. `cv_between` is the spread of those 5 medians, "
        "`cv_within` the spread of round medians inside one measurement, `cost_s` the time one measurement takes.\n\n"
        + table(rep_rows, ["model", "batch", "median_ms", "cv_between", "cv_within", "cost_s"])
        + "\n\nMACs vs measured speed-up, uniform channel ratio (L1), no finetuning:\n\n"
        + table(sweep_rows, list(sweep_rows[0]))
    )
    return write_section("latency", body, args.out)


if __name__ == "__main__":
    print(main())
