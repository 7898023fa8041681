"""Latency on the target hardware: warm-up, rounds of timed runs, median/p90/CV.

Only this module knows how to time a model. On CUDA we bracket every timed run with CUDA
events and synchronise, because kernel launches return before the GPU finishes.
"""

from __future__ import annotations

import contextlib
import math
import re
import socket
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from search_space import call_model, copy_model

from ._inputs import batch_size_of, tensors, tree_map
from ._onnx import write_onnx

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Target:
    name: str = "cpu"
    device: str = "cpu"  # cpu | cuda | cuda:N
    batch_size: int = 1
    threads: int = 1  # CPU intra-op threads while timing
    dtype: str = "fp32"
    runtime: str = "eager"  # eager | torchscript | compile | onnxruntime (see RUNTIMES)
    warmup: int = 10
    rounds: int = 5
    runs: int = 30  # timed runs per round
    max_cv: float = 0.10  # rounds whose medians vary more than this are re-measured
    retries: int = 2
    # Paired timing (the default in a search): each candidate runs alternately with the base model,
    # run by run, ``pairs`` pairs, and its latency is the centre (interquartile mean) of the
    # per-pair log ratios, as a ratio, times the base's calibrated latency. Drift on a shared
    # machine hits both runs of a pair alike and cancels. Turn off on a dedicated, quiet target
    # (then warmup/rounds/runs/max_cv apply).
    paired: bool = True
    pairs: int = 16  # at least this many; then more, in blocks of as many, until precise
    # Stop when the ratio's standard error is this fraction of it. Repeated measurements scatter
    # over a range of ~2.5 standard errors on average (6 repeats): 0.01 ranks candidates that
    # differ by a few percent, at a search's cost. Below ~1 % more pairs buy little here: the
    # speed-up itself drifts with the machine's state (ResNet-18, batch 1: 10 repeats at 0.007
    # scattered with a standard deviation of 1.18 %, at 0.01 1.30 %, for twice the time).
    precision: float = 0.01
    max_pairs: int = 256  # a cap on cost: 256 pairs of 3 + 3 runs
    # Each half of a pair is this many back-to-back runs of one model, timed as the fastest of
    # them: interference (a preemption, a neighbour's burst) only ever adds time, so the fastest
    # of a few is the one least touched; and the runs after the first see warm caches, as the
    # next request to a served model does.
    pair_runs: int = 3
    # And the pairs span at least this long (timed runs, both models): a machine's state changes
    # over tens of milliseconds (timer ticks, scheduler slices, a clock's frequency steps), so the
    # 16 pairs of a 1 ms model, 0.1 s in all, see a handful of states and their standard error
    # understates the error. Measured on this 2-core VM, quiet: a digits CNN at batch 1 repeated
    # 6 times spread 3.5 % at 16-32 pairs (standard error 0.6 %); see benchmarks/RESULTS.md.
    min_seconds: float = 0.5
    # A cap on cost in seconds (timed runs of both models), beside max_pairs: under a load of 4-8
    # on 2 cores, 256 pairs of ResNet-18 at batch 8 ran 46 s. The measurement stops at whichever
    # cap comes first, after at least one block of ``pairs``, and its ``ratio_se`` says how
    # precise it got.
    max_seconds: float = 30.0
    # Where the target lives on a Ray cluster (used by the orchestrator, ignored when timing):
    # a custom resource its nodes declare (`ray start --resources='{"rpi5": 1}'`) and/or labels
    # (`ray start --labels=hw=rpi5`). Empty: any node.
    resources: Mapping[str, float] = field(default_factory=dict)
    label_selector: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(
                f"target.name: {self.name!r}; use letters, digits, '_', '.', '-' (it names metrics)"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"target.dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.dtype != "fp32" and not self.device.startswith("cuda"):
            raise ValueError(
                f"target.dtype: {self.dtype} is only measured on cuda; use fp32 on {self.device}"
            )
        if self.runtime not in RUNTIMES:
            raise ValueError(f"target.runtime: {self.runtime!r} is not one of {sorted(RUNTIMES)}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"target.device: {self.device!r}; use 'cpu' or 'cuda[:N]'")
        if not (math.isfinite(self.min_seconds) and self.min_seconds >= 0.0):
            raise ValueError(
                f"target.min_seconds: {self.min_seconds} must be a number of seconds >= 0, e.g. 0.5"
            )
        if not (math.isfinite(self.max_seconds) and self.max_seconds > self.min_seconds):
            raise ValueError(
                f"target.max_seconds: {self.max_seconds} must be a number of seconds above "
                f"target.min_seconds ({self.min_seconds}), e.g. 30"
            )
        if not 0.0 < self.precision < 1.0:
            raise ValueError(
                f"target.precision: {self.precision} must be a fraction in (0, 1), e.g. 0.01"
            )
        for name in ("batch_size", "threads", "rounds", "runs", "pairs", "max_pairs", "pair_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"target.{name}: must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Target:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"target: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    mean_ms: float
    cv: float  # coefficient of variation of the round medians
    throughput: float  # samples per second at the target batch size
    peak_memory_mb: float | None  # CUDA only; None on CPU
    runs: int
    attempts: int
    noisy: bool  # CV stayed above target.max_cv after every retry
    device: str
    batch_size: int
    host: str = ""  # the machine that timed it: proof the number came from the target
    seconds: float = 0.0  # what the measurement cost
    # Paired mode only (``reference`` given): the ratio model/reference (the interquartile mean
    # of the per-pair log ratios, as a ratio), the interquartile range of the per-pair ratios,
    # the reference's median over the same pairs, the pairs, and the standard error of log(ratio).
    ratio: float | None = None
    ratio_spread: float | None = None
    reference_ms: float | None = None
    pairs: int = 0
    ratio_se: float | None = None  # the standard error of log(ratio): ~ ratio's relative error

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_latency(
    model: nn.Module,
    example_inputs: torch.Tensor,
    target: Target | Mapping[str, Any],
    reference: nn.Module | None = None,
) -> LatencyStats:
    """Time ``model`` on ``target``. ``example_inputs`` is one batch; it is resized to the target batch.

    With ``reference``, the two run alternately, pair by pair (ABBA: the first of a pair
    alternates, so neither model always runs on a cache the other warmed), and the result
    carries ``ratio`` = the centre of the per-pair ratios model/reference (``log_ratio_centre``) beside
    the absolute figures: slowdowns that last longer than one pair hit both halves and cancel in
    the ratio.
    """
    if not isinstance(target, Target):
        target = Target.from_dict(target)
    device = torch.device(target.device)
    started = time.perf_counter()
    x = target_inputs(example_inputs, target, device)
    with fixed_threads(target.threads), torch.inference_mode():
        runners = [_runner(m, x, target, device) for m in (model, reference) if m is not None]
        for _ in range(target.warmup):  # both models warm, so the first pair is not a cold one
            for run in runners:
                run(x)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if reference is None:
            times, cv, attempts = _absolute(runners[0], x, target, device)
            paired: dict[str, Any] = {}
        else:
            times, paired = _paired(runners, x, target, device)
            cv, attempts = _cv([statistics.median(r) for r in times]), 1
    flat = sorted(t for r in times for t in r)
    median = statistics.median(flat)
    return LatencyStats(
        median_ms=median,
        p90_ms=flat[min(len(flat) - 1, int(0.9 * len(flat)))],
        mean_ms=statistics.fmean(flat),
        cv=cv,
        throughput=target.batch_size / (median / 1000.0),
        peak_memory_mb=_peak_memory(device),
        runs=len(flat),
        attempts=attempts,
        noisy=cv > target.max_cv and not paired,
        device=target.device,
        batch_size=target.batch_size,
        host=socket.gethostname(),
        seconds=time.perf_counter() - started,
        **paired,
    )


def _runner(model: nn.Module, x: Any, target: Target, device: torch.device) -> Callable:
    return RUNTIMES[target.runtime](_as_target(model, target, device).eval(), x)


def _as_target(model: nn.Module, target: Target, device: torch.device) -> nn.Module:
    """``model`` on the target's device in its dtype: itself where it already is, else a copy.

    Why: ``nn.Module.to`` converts in place, and the caller still uses its model after timing
    it: a float64 model timed at the target's fp32 then failed its own accuracy evaluation
    ("expected scalar type Double but found Float"), and a cuda target would move a CPU
    caller's model off the CPU."""
    dtype = DTYPES[target.dtype]
    state = [*model.parameters(), *model.buffers()]
    if all(t.device == device and (t.dtype == dtype or not t.is_floating_point()) for t in state):
        return model
    return copy_model(model).to(device=device, dtype=dtype)


def _absolute(
    run: Callable, x: torch.Tensor, target: Target, device: torch.device
) -> tuple[list[list[float]], float, int]:
    """Rounds of timed runs, re-measured while the round medians disagree by more than max_cv."""
    attempts = 0
    while True:
        attempts += 1
        times = [_time_round(run, x, target.runs, device) for _ in range(target.rounds)]
        cv = _cv([statistics.median(r) for r in times])
        if cv <= target.max_cv or attempts > target.retries:
            return times, cv, attempts


def _paired(
    runners: list[Callable], x: torch.Tensor, target: Target, device: torch.device
) -> tuple[list[list[float]], dict[str, Any]]:
    """Pairs of short blocks, the first of each alternating (A B, B A, A B, ...): ``target.pairs``
    of them, then more in blocks of as many until the ratio's relative standard error is within
    ``target.precision`` and the pairs have run ``target.min_seconds`` (or until
    ``target.max_pairs`` or ``target.max_seconds``, whichever comes first). Each half is
    ``target.pair_runs`` back-to-back runs of one model, timed as the fastest. Returns the
    model's runs (one round) and the ratio figures: ``ratio`` is the interquartile mean of the
    per-pair log ratios (see ``log_ratio_centre``), ``ratio_se`` its standard error.

    Side by side, not round by round: on a shared machine the speed changes within milliseconds
    (a neighbour on the sibling hyperthread), and only two halves side by side see the same
    machine. Measured on this 2-core VM under a load of 11: a model against itself gave ratios
    0.42-1.16 with halves of 10 runs, 0.96-0.99 run by run (48 pairs). The fastest of a few runs,
    not one run: under a load of 6-8 (more busy processes than cores) single runs of a 1-2 ms model
    are preempted often, the longer model of a pair more often, and a screen's ratios scattered
    with interquartile ranges of 0.2-3.4 (a pruned digits CNN timed at 0.20x the base model,
    0.45x when re-timed); with the fastest of three, 0.03-0.3 on the same machine.
    ``ratio_spread`` is the interquartile range of the per-pair ratios."""
    mine, theirs, logs = [], [], []
    timed = 0.0  # seconds of timed runs so far, both models
    while True:
        for _ in range(target.pairs):
            order = (0, 1) if len(logs) % 2 == 0 else (1, 0)
            runs = {k: _time_round(runners[k], x, target.pair_runs, device) for k in order}
            took = {k: min(v) for k, v in runs.items()}
            timed += sum(map(sum, runs.values())) / 1000.0
            mine.extend(runs[0])
            theirs.append(took[1])
            # A timer tick (1 ns) as the floor: a log ratio is always finite.
            logs.append(math.log(max(took[0], 1e-6)) - math.log(max(took[1], 1e-6)))
        centre, se = log_ratio_centre(logs)
        precise = se <= target.precision and timed >= target.min_seconds
        if precise or len(logs) >= target.max_pairs or timed >= target.max_seconds:
            break
    ratios = sorted(math.exp(v) for v in logs)
    return [mine], {
        "ratio": math.exp(centre),
        "ratio_spread": _quartile(ratios, 3) - _quartile(ratios, 1),
        "ratio_se": se,
        "reference_ms": statistics.median(theirs),
        "pairs": len(logs),
    }


def log_ratio_centre(logs: list[float]) -> tuple[float, float]:
    """The interquartile mean of the per-pair log ratios (the mean of the middle half) and its
    standard error: the winsorized standard deviation (the lowest and highest quarter set to
    the quartiles) / ((1 - 2 x 1/4) sqrt(n)) (Tukey and McLaughlin), the trimmed mean's own.

    Why not the median of the ratios, as before: the median uses the two middle pairs only, the
    interquartile mean the middle half, so for the same pairs its standard error is smaller
    (normal pairs: 0.84 vs 0.64 of the mean's efficiency, about 1.3x fewer pairs for one
    precision) while a wild pair (a preemption) is still trimmed away. And its standard error
    holds for any shape of the pairs' distribution, whereas the median's was estimated from the
    IQR as if the ratios were normal, which under-states it when they are not (two bumps, AB
    and BA; a skew). In logs, because a ratio is a quotient: a standard error of 0.01 there
    is 1 % of the ratio either way (r or 1/r), and the centre is a geometric one."""
    ordered = sorted(logs)
    n = len(ordered)
    cut = n // 4
    middle = ordered[cut : n - cut]
    centre = statistics.fmean(middle)
    if n < 2:
        return centre, math.inf
    low, high = ordered[cut], ordered[n - cut - 1]
    winsorized = [min(max(v, low), high) for v in ordered]
    se = statistics.stdev(winsorized) / (len(middle) / n * math.sqrt(n))
    return centre, se


def _quartile(ordered: list[float], q: int) -> float:
    return ordered[min(len(ordered) - 1, q * len(ordered) // 4)]


def measure_relative(
    model: nn.Module,
    reference: nn.Module,
    example_inputs: torch.Tensor,
    target: Target | Mapping[str, Any],
    pairs: int | None = None,
) -> dict[str, float]:
    """``measure_latency`` in paired mode, as the plain figures: ``ratio`` (model / reference),
    ``ratio_spread``, ``ratio_se``, ``median_ms``, ``reference_ms``, ``pairs``."""
    if not isinstance(target, Target):
        target = Target.from_dict(target)
    if pairs is not None:
        target = replace(target, pairs=max(1, pairs), max_pairs=max(1, pairs))
    stats = measure_latency(model, example_inputs, target, reference=reference)
    return {
        "ratio": float(stats.ratio or math.inf),
        "ratio_spread": float(stats.ratio_spread or 0.0),
        "ratio_se": float(stats.ratio_se if stats.ratio_se is not None else math.inf),
        "median_ms": stats.median_ms,
        "reference_ms": float(stats.reference_ms or 0.0),
        "pairs": stats.pairs,
    }


def calibrate(
    model: nn.Module, example_inputs: torch.Tensor, target: Target | Mapping[str, Any]
) -> dict[str, Any]:
    """The reference's own latency for paired figures: the model timed against itself over three
    times the pairs of a measurement. ``ms`` is the median of its runs; ``noise`` is the
    interquartile range of the self-ratios, the floor under which two candidates cannot be told
    apart."""
    if not isinstance(target, Target):
        target = Target.from_dict(target)
    target = replace(
        target,
        pairs=3 * target.pairs,
        max_pairs=max(target.max_pairs, 3 * target.pairs),
        min_seconds=3 * target.min_seconds,
        max_seconds=3 * target.max_seconds,
    )
    stats = measure_latency(model, example_inputs, target, reference=model)
    return {
        "ms": float(stats.reference_ms or stats.median_ms),
        "noise": float(stats.ratio_spread or 0.0),
        "pairs": stats.pairs,
        "host": stats.host,
        "seconds": stats.seconds,
        "at": time.time(),
    }


def rebase(stats: Mapping[str, Any], calibration_ms: float) -> dict[str, Any]:
    """A paired measurement's figures on a calibration: latency = ratio x the reference's
    calibrated latency. The raw absolute figures stay as ``raw_*``; ``drift`` is how far the
    reference ran from its calibration during this measurement (1.0: as calibrated)."""
    out = dict(stats)
    raw = {k: out.pop(f"raw_{k}", out.get(k)) for k in ("median_ms", "p90_ms", "mean_ms")}
    scale = float(out["ratio"]) * calibration_ms / raw["median_ms"] if raw["median_ms"] else 1.0
    for k, v in raw.items():
        out[f"raw_{k}"] = v
        out[k] = v * scale if v is not None else None
    out["throughput"] = out["batch_size"] / (out["median_ms"] / 1000.0)
    out["calibration_ms"] = calibration_ms
    ref = out.get("reference_ms")
    out["drift"] = ref / calibration_ms if ref and calibration_ms else None
    return out


# -- runtimes: how the model is run while timed. Each takes (model, input) and returns a callable
# of the input: one tensor, or a model's several inputs (a tuple, list or dict of tensors).
def _called(run: Callable[..., Any], x: Any) -> Callable[[Any], Any]:
    """``run`` as a callable of the whole input: a lone tensor straight in (no extra frame in
    what is timed), several inputs spread as the model takes them."""
    return run if isinstance(x, torch.Tensor) else partial(call_model, run)


def _eager(model: nn.Module, x: Any) -> Callable[[Any], Any]:
    return _called(model, x)


def _torchscript(model: nn.Module, x: Any) -> Callable[[Any], Any]:
    with (
        warnings.catch_warnings()
    ):  # TorchScript is in maintenance; tracing still works and is what many deploy
        warnings.simplefilter("ignore")
        # strict=False: a model may return a dict or list (timing reads no output)
        if isinstance(x, Mapping):
            traced = torch.jit.trace(model, example_kwarg_inputs=dict(x), strict=False)
        else:
            traced = torch.jit.trace(model, tuple(x) if isinstance(x, list) else x, strict=False)
        return _called(torch.jit.optimize_for_inference(traced), x)


def _compile(model: nn.Module, x: Any) -> Callable[[Any], Any]:
    # Shapes are fixed while timing, so a static graph; warm-up absorbs the compilation.
    return _called(torch.compile(model, dynamic=False), x)


def _onnxruntime(model: nn.Module, x: Any) -> Callable[[Any], Any]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ValueError(
            "target.runtime: onnxruntime is not installed; pip install onnxruntime onnx"
        ) from exc
    import io

    if isinstance(x, Mapping):
        raise ValueError(
            "target.runtime: onnxruntime times models of positional inputs; this task's "
            "example_inputs is a dict (keyword inputs): use runtime eager, torchscript or compile"
        )
    args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    names = ["x"] if len(args) == 1 else [f"x{i}" for i in range(len(args))]
    buf = io.BytesIO()
    write_onnx(model, args, buf, input_names=names)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    providers = ["CUDAExecutionProvider"] if args[0].is_cuda else ["CPUExecutionProvider"]
    session = ort.InferenceSession(buf.getvalue(), opts, providers=providers)
    return lambda inp: session.run(
        None, {n: t.cpu().numpy() for n, t in zip(names, tensors(inp), strict=True)}
    )


RUNTIMES: Mapping[str, Callable[[nn.Module, torch.Tensor], Callable[[torch.Tensor], Any]]] = {
    "eager": _eager,
    "torchscript": _torchscript,
    "compile": _compile,
    "onnxruntime": _onnxruntime,
}


def target_inputs(example_inputs: Any, target: Target, device: torch.device) -> Any:
    """One example batch at the target's batch size and on its device (every tensor of a model's
    several inputs alike). Floating inputs take the target's dtype; integer ones (token ids,
    indices) stay as they are: an embedding reads indices, which a cast to float would break."""
    dtype = DTYPES[target.dtype]

    def place(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device=device)
        return t.to(dtype=dtype) if t.is_floating_point() else t

    return tree_map(place, batch_of(example_inputs, target.batch_size))


def batch_of(example_inputs: Any, batch_size: int) -> Any:
    """Repeat (or cut) the first dimension of one example batch to ``batch_size``: of its one
    tensor, or of each of a model's several inputs (a tuple, list or dict of tensors)."""
    batch_size_of(example_inputs)  # every input has a batch dimension, or a clear TypeError

    def resize(t: torch.Tensor) -> torch.Tensor:
        one = t[:1]
        return one.expand(batch_size, *one.shape[1:]).contiguous()

    return tree_map(resize, example_inputs)


def _time_round(
    model: Callable[[torch.Tensor], Any], x: torch.Tensor, runs: int, device: torch.device
) -> list[float]:
    if device.type == "cuda":
        out = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        return out
    out = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        model(x)
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def _cv(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = statistics.fmean(values)
    return statistics.stdev(values) / mean if mean > 0 else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


@contextlib.contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Fix torch's intra-op threads inside the block (timing, base training), and restore the
    caller's setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
