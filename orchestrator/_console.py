"""What a user sees on the console: prunesearch's own lines; libraries only with ``--debug``.

MLflow's INFO lines (store migrations, "Registered model ...") and Ray's token-authentication
warning appeared on every command, between the lines that matter. Our loggers (``prunesearch.*``:
base-model training, tracking outages) print plainly to stderr, so stdout holds only results.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search_space import DroppableBlock

# Loggers whose INFO and WARNING lines are another tool's business, not the user's.
NOISY = (
    "mlflow",
    "alembic",
    "ray._private.authentication",  # "Token authentication is disabled/enabled for this cluster"
    "torch_pruning",
)


class _Console(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout``/``sys.stderr`` is at the time of the record
    (not at setup: tests and notebooks swap them)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


class _Plain(logging.Formatter):
    """Information as it is; a warning or error says whose it is."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno < logging.WARNING:
            return text
        return f"prunesearch: {'warning' if record.levelno == logging.WARNING else 'error'}: {text}"


def setup(debug: bool) -> None:
    """Route ``prunesearch.*`` to stderr (stdout stays for results: tables, ``--json``); quiet
    the libraries unless ``debug``."""
    ours = logging.getLogger("prunesearch")
    if not any(isinstance(h, _Console) for h in ours.handlers):
        handler = _Console("stderr")
        handler.setFormatter(_Plain())
        ours.addHandler(handler)
    ours.setLevel(logging.DEBUG if debug else logging.INFO)
    # Ours has its own handler: a library that configures the root logger (an ONNX export does,
    # during registration) would otherwise print every line of ours a second time, prefixed.
    ours.propagate = False
    level = logging.DEBUG if debug else logging.ERROR
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(level))  # child processes
    for name in NOISY:
        logging.getLogger(name).setLevel(level)


def discovery_report(
    discovery: Any, blocks: Iterable[DroppableBlock] = (), depth: str = ""
) -> dict[str, Any]:
    """What ``prunesearch check`` found in the model, as plain values (``--json``): its groups,
    what was left out, and its residual ``blocks``, with ``depth`` saying whether a plan may
    drop them whole (or why none were found)."""
    return {
        "groups": [
            {"name": g.name, "kind": g.kind, "channels": g.channels, "members": list(g.members)}
            for g in discovery.groups
        ],
        "excluded": [{"name": e.name, "reason": e.reason} for e in discovery.excluded],
        "trace_mode": discovery.trace_mode,
        "blocks": [{"name": b.name, "groups": list(b.groups)} for b in blocks],
        "depth": depth,
    }


def discovery_lines(report: dict[str, Any], width: int = 100) -> list[str]:
    """The prunable groups as a table (name, kind, channels, members), then what was left out."""
    rows = [
        (g["name"], g["kind"], str(g["channels"]), _members(g["members"], g["name"]))
        for g in report["groups"]
    ]
    head = ("group", "kind", "channels", "members (pruned together)")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    out = []
    for row in [head, *rows]:
        line = "  " + "  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True))
        text = line + "  " + row[3]
        out.append(clipped(text, width))
    out += [f"  left out {e['name']}: {e['reason']}" for e in report["excluded"]]
    if report.get("depth"):
        out.append(f"  residual blocks: {report['depth']}")
    out += [
        f"  residual block {b['name']} ({plural(len(b['groups']), 'group')} inside)"
        for b in report.get("blocks", ())
    ]
    return out


def _members(members: list[str], root: str) -> str:
    others = [m for m in members if m != root]
    return f"{len(members)}: " + ", ".join(others) if others else "1"


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no feasible trials yet)"
    cols = ["trial", "accuracy", "latency_ms", "speedup", "macs", "params", "criterion"]
    cols += [
        c for c in rows[0] if c.endswith("_ms") and c not in cols
    ]  # the other targets' latency
    cols += [c for c in ("version", "aliases") if c in rows[0]]  # the registry's, from MLflow
    cells = [[_fmt(c, r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths, strict=True))  # noqa: E731
    return "\n".join([line(cols)] + [line(r) for r in cells])


def _fmt(col: str, value: Any) -> str:
    if value is None:
        return "-"
    if col == "macs":
        return f"{value / 1e6:.2f}M"
    if col == "params":
        return f"{value / 1e3:.1f}k"
    if col == "speedup":
        return f"{value:.2f}x"
    if col == "accuracy":
        return f"{value:.4f}"
    if col.endswith("_ms"):
        return f"{value:.3f}"
    return str(value) if value != "" else "-"


def clipped(text: str, n: int) -> str:
    """``text`` in at most ``n`` characters, "..." where it was cut."""
    return text if len(text) <= n else text[: n - 3] + "..."


def plural(n: int, word: str) -> str:
    """``1 model``, ``2 models``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
