"""Small helpers shared by end-to-end tests: a quick config, MLflow read-backs, and the MLflow UI
as a headless Chromium renders it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import urllib.request
from contextlib import closing
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from orchestrator import config_from_dict


def _fresh_mlflow_db(tmp_path: Path) -> str:
    """A migrated, empty MLflow SQLite store: copied from one made per session (a new store
    spends ~3 s in MLflow's schema migrations, and the suite creates dozens)."""
    import mlflow

    template = Path(os.environ["PRUNESEARCH_CACHE"]) / f"mlflow-empty-{mlflow.__version__}.db"
    if not template.exists():
        template.parent.mkdir(parents=True, exist_ok=True)
        scratch, partial = template.with_suffix(".scratch"), template.with_suffix(".partial")
        for path in (scratch, partial):
            path.unlink(missing_ok=True)
        MlflowClient(tracking_uri=f"sqlite:///{scratch}").search_experiments()
        # The store runs in WAL mode (orchestrator/_sqlite.py): its last migrations may still sit in
        # the -wal file, so copy it with SQLite's backup API, which reads through the log.
        with closing(sqlite3.connect(scratch)) as src, closing(sqlite3.connect(partial)) as dst:
            src.backup(dst)
        partial.rename(template)
    target = tmp_path / "mlflow.db"
    if not target.exists():
        shutil.copyfile(template, target)
    return f"sqlite:///{target}"


def quick_config(tmp_path: Path, **patch: Any):
    raw = {
        "name": "e2e",
        "task": "digits",
        # Per-layer sampling, no screen: most end-to-end tests are about the loop around a trial,
        # and a screen costs seconds; tests/orchestrator/test_screen.py runs the default search.
        "search": {
            "trials": 5,
            "concurrency": 2,
            "sampler": "tpe",
            "seed": 1,
            "screen": {"candidates": 0},
            "space": {"granularity": "layer", "criteria": ["l1", "taylor"], "ratio": [0.1, 0.7]},
        },
        "finetune": {"epochs": 1, "lr": 0.01},
        # Paired timing to 5 %, no time floor: these tests are about the loop, not timing
        # precision (tests/workers/test_paired_latency.py covers the stop rule and the floor).
        # Measured on a loaded 2-core VM, a 4-trial search of this config: at the product's 1 %,
        # 3 of 4 trials hit max_pairs (256), 5-14 s of timing each, 144 s in all; at 5 %, 57 s.
        "target": {"batch_size": 1, "rounds": 3, "runs": 10, "min_seconds": 0.0, "precision": 0.05},
        # Registering front models costs seconds per model; the tests that check it turn it on.
        "tracking": {"uri": _fresh_mlflow_db(tmp_path), "register": False},
        "storage": f"sqlite:///{tmp_path}/optuna.db",
    }
    for key, value in patch.items():
        node = raw
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(raw)


def runs_of(config) -> tuple[list, list]:
    client = MlflowClient(tracking_uri=config.tracking.resolved_uri())
    exp = client.get_experiment_by_name(config.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("prunesearch.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("prunesearch.kind") == "trial"]
    return parents, children


def chromium_dom(url: str) -> str:
    """The page as a headless Chromium renders it (scripts run; 20 s of virtual time), in a
    window wide enough that the runs table draws a handful of metric columns (it draws only
    the columns that fit)."""
    command = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1600,900",
        "--virtual-time-budget=20000",
    ]
    done = subprocess.run(
        [*command, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout


def stop_group(server: subprocess.Popen) -> None:
    """End the process group a test started (``start_new_session``: prunesearch and its mlflow
    ui): SIGTERM, then SIGKILL for whatever is left."""
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    time.sleep(2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)


def wait_for(url: str, seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class _RunsTable(HTMLParser):
    """MLflow's runs table (ag-grid) in a DOM: header text per column id, and cell text per
    row id (the run's id) and column id."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: dict[str, str] = {}
        self.cells: dict[str, dict[str, str]] = {}
        self.index: dict[str, int] = {}  # row id: its place in the table (ag-grid's row-index)
        self.column: dict[str, int] = {}  # column id: its place (aria-colindex; not DOM order)
        self._stack: list[tuple[str | None, str | None, str | None]] = []  # (row, column, role)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        row, col, _ = self._stack[-1] if self._stack else (None, None, None)
        role = a.get("role")
        if role == "row":
            row = a.get("row-id")
            if row is not None and a.get("row-index", "").isdigit():
                self.index[row] = int(a["row-index"])
        if role in ("columnheader", "gridcell") and a.get("col-id"):
            col = a["col-id"]
            if role == "columnheader" and a.get("aria-colindex", "").isdigit():
                self.column[col] = int(a["aria-colindex"])
        if tag not in ("input", "br", "img", "meta", "link"):  # void elements have no end tag
            self._stack.append((row, col, role if role in ("columnheader", "gridcell") else None))

    def handle_endtag(self, tag):
        if self._stack and tag not in ("input", "br", "img", "meta", "link"):
            self._stack.pop()

    def handle_data(self, data):
        if not self._stack or not data.strip():
            return
        row, col, _ = self._stack[-1]
        roles = {r for _, _, r in self._stack}
        if col and "columnheader" in roles and row is None:
            self.headers[col] = (self.headers.get(col, "") + data.strip()).strip()
        elif col and row and "gridcell" in roles:
            cells = self.cells.setdefault(row, {})
            cells[col] = cells.get(col, "") + data.strip()


def runs_table(dom: str) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(headers, cells) of the runs table in ``dom``: ``{"metrics.`accuracy`": "accuracy"}``,
    ``{run_id: {"metrics.`accuracy`": "0.97", ...}}``, columns and rows in the order drawn."""
    p = _RunsTable()
    p.feed(dom)
    columns = sorted(p.headers, key=lambda c: p.column.get(c, len(p.column)))
    rows = sorted(p.cells, key=lambda r: p.index.get(r, len(p.index)))
    return {c: p.headers[c] for c in columns}, {r: p.cells[r] for r in rows}
