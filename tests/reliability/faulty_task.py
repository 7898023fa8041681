"""The digits task with faults injected at chosen points of a trial, counted across processes.

Options: ``counter`` (a file: one line per event, appended by any worker process: pid, Ray node,
Ray task id and the event), ``count_batches`` (false: events are evaluate() calls only; true:
every training batch a worker draws, calibration included, is an event too, so a fault can land
anywhere in pruning, finetuning or evaluation), ``kill_at`` (events on which the worker process
dies, as if OOM-killed: the line ``KILL`` is appended first), ``raise_at`` (events that raise),
``sleep_unpruned_s`` (evaluate sleeps this long for a pruned model whose stem is whole: a slow
trial; the unpruned base model is never slowed), ``env_probe`` (a file: evaluate, which only runs
in trial workers, appends the names of the environment variables there holding a planted secret,
any value containing ``s3cr3t-planted``).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Mapping
from typing import Any

from workers import Task, accuracy, build_digits


def _where() -> str:
    try:
        import ray

        ctx = ray.get_runtime_context()
        return f"{ctx.get_node_id()} {ctx.get_task_id()}"
    except Exception:
        return "- -"


def _count(path: str, kind: str) -> int:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = sum(1 for line in f.read().splitlines() if not line.startswith("KILL")) + 1
        f.write(f"{os.getpid()} {_where()} {kind} {n}\n")
        f.flush()
    return n


def _mark_kill(path: str, n: int) -> None:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(f"KILL {n} {os.getpid()} {_where()}\n")
        f.flush()
        os.fsync(f.fileno())


class _Counted:
    """A loader that counts every batch it hands out (training and calibration batches)."""

    def __init__(self, loader, on_batch) -> None:
        self.loader, self.on_batch = loader, on_batch
        self.dataset, self.batch_size = loader.dataset, loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.on_batch("batch")
            yield batch


def build(options: Mapping[str, Any]) -> Task:
    opts = dict(options)
    counter = opts.pop("counter")
    count_batches = bool(opts.pop("count_batches", False))
    kill_at = set(opts.pop("kill_at", []))
    raise_at = set(opts.pop("raise_at", []))
    sleep_s = float(opts.pop("sleep_unpruned_s", 0))
    probe = opts.pop("env_probe", None)
    task = build_digits(opts)

    def event(kind: str) -> None:
        n = _count(counter, kind)
        if n in kill_at:
            _mark_kill(counter, n)
            os._exit(137)  # the worker process dies mid-trial
        if n in raise_at:
            raise RuntimeError(f"injected failure at {kind} event {n}")

    def evaluate(model, loader) -> float:
        event("evaluate")
        if probe:
            names = sorted(k for k, v in os.environ.items() if "s3cr3t-planted" in v)
            with open(probe, "a") as f:
                f.write(f"{os.getpid()} {','.join(names) or '-'}\n")
        if (
            sleep_s
            and model.stem[0].out_channels == 32
            and model.layer3[0].conv1.out_channels < 128
        ):
            time.sleep(sleep_s)
        return accuracy(model, loader)

    task.evaluate = evaluate
    if count_batches:
        task.train_loader = _Counted(task.train_loader, event)
    return task
