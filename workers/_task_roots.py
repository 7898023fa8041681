"""Where a ``module:function`` task may come from, and running user task code safely.

A config names code (a nightly CronJob may read it from a ConfigMap), so it may name only code
the operator put there: a module under a task root, or an installed ``prunesearch.tasks`` entry
point. Task roots are the config file's directory (added by the CLI when it reads the config,
and passed on to Ray workers in ``PRUNESEARCH_TASK_PATH``), the current directory and the
PYTHONPATH entries; the standard library and site-packages never are, even below a root.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.metadata
import io
import os
import site
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

ENTRY_POINT_GROUP = "prunesearch.tasks"
TASK_PATH_VAR = "PRUNESEARCH_TASK_PATH"
MAX_TASK_ROOTS = 16
T = TypeVar("T")


def add_task_root(path: str | os.PathLike) -> None:
    """Let ``module:function`` tasks resolve from ``path`` here and on Ray workers started later."""
    root = str(Path(path).resolve())
    known = [p for p in os.environ.get(TASK_PATH_VAR, "").split(os.pathsep) if p]
    rest = [p for p in known if p != root][: MAX_TASK_ROOTS - 1]  # the latest configs' directories
    os.environ[TASK_PATH_VAR] = os.pathsep.join([root, *rest])


def task_roots() -> list[Path]:
    """The directories a task module may live under, most specific first."""
    entries = [
        *os.environ.get(TASK_PATH_VAR, "").split(os.pathsep),
        os.getcwd(),
        *os.environ.get("PYTHONPATH", "").split(os.pathsep),
    ]
    out: list[Path] = []
    for entry in entries:
        if entry and os.path.isdir(entry):
            path = Path(entry).resolve()
            if path not in out and not _is_system(path):
                out.append(path)
    return out


def _system_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    dirs = [paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    dirs += [*site.getsitepackages(), site.getusersitepackages(), sys.prefix, sys.base_prefix]
    return [Path(d).resolve() for d in dirs if d]


def _is_system(path: Path) -> bool:
    return any(path == d or d in path.parents for d in _system_dirs() if d != Path("/"))


def trusted_file(filename: str | None) -> Path | None:
    """The root ``filename`` lies under, or None when it is not task code we may run."""
    if not filename:
        return None
    path = Path(filename).resolve()
    if _is_system(path):
        return None
    return next((r for r in task_roots() if r in path.parents), None)


def entry_point_tasks() -> dict[str, Any]:
    """Installed tasks: ``[project.entry-points."prunesearch.tasks"] name = "module:build"``,
    by name and by their ``module:function`` value."""
    out: dict[str, Any] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        out.setdefault(ep.name, ep)
        out.setdefault(ep.value, ep)
    return out


def import_trusted(ref: str, module_name: str) -> ModuleType:
    """Import ``module_name`` only if its top-level package is found under a task root."""
    top = module_name.partition(".")[0]
    roots = task_roots()
    spec = importlib.machinery.PathFinder.find_spec(top, [str(r) for r in roots])
    if spec is None:
        raise ValueError(
            f"task: cannot find module {module_name!r} in the config's directory, the current "
            f"directory or PYTHONPATH ({', '.join(str(r) for r in roots[:3])}); a task is your "
            f"own module there (or an installed {ENTRY_POINT_GROUP} entry point), never the "
            "standard library or an installed package"
        )
    for root in roots:  # after everything else: never shadows an installed module
        if str(root) not in sys.path:
            sys.path.append(str(root))
    module = guarded(ref, "importing it", lambda: _import(ref, module_name))
    if trusted_file(getattr(module, "__file__", None)) is None:
        raise ValueError(
            f"task: module {module_name!r} resolves to {getattr(module, '__file__', None)!r}, "
            "outside your project (an installed module of that name comes first); rename your module"
        )
    return module


def _import(ref: str, module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"task: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?"
        ) from exc
    except Exception as exc:
        raise ValueError(
            f"task: importing module {module_name!r} failed: {type(exc).__name__}: {exc}; fix "
            "the module (--debug shows the traceback)"
        ) from exc


def guarded(ref: str, doing: str, fn: Callable[[], T]) -> T:
    """Run task code; a ``sys.exit`` (or argparse reading the command line) in it becomes one
    error naming the task instead of ending the search. The task sees ``sys.argv == [ref]`` (not
    prunesearch's own arguments), and what it writes to stderr is held back and passed on when it
    returns (on an exit, its last line goes into the error)."""
    held = io.StringIO()
    argv = sys.argv
    sys.argv = [ref]
    try:
        with contextlib.redirect_stderr(held):
            result = fn()
    except SystemExit as exc:
        said = [ln.strip() for ln in held.getvalue().splitlines() if ln.strip()]
        note = f" ({said[-1][:200]})" if said else ""
        raise ValueError(
            f"task: {ref} called sys.exit({exc.code!r}) while {doing}{note}; a task must not exit "
            "or parse the command line (argparse): take its settings from task_options"
        ) from exc
    finally:
        sys.argv = argv
    sys.stderr.write(held.getvalue())
    return result


def task_source(ref: str) -> Path | None:
    """The file or package directory a ``module:function`` task's code lives in, found as
    :func:`import_trusted` would (nothing imported); None for built-ins and entry points."""
    module_name, sep, _ = ref.partition(":")
    if not sep or not module_name or ref in entry_point_tasks():
        return None
    top = module_name.partition(".")[0]
    spec = importlib.machinery.PathFinder.find_spec(top, [str(r) for r in task_roots()])
    if spec is None:
        return None
    if spec.submodule_search_locations:  # a package (or namespace package): its directory
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin) if spec.origin else None
