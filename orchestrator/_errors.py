"""What a failed command says: one line, a failed write named with its path and fix; and a
search stopped by an error, its study settled so the next run resumes cleanly."""

from __future__ import annotations

import os
import re

from ._config import Config


def settle_stopped_search(config: Config, exc: Exception) -> Exception:
    """A search that stopped on an error mid-way leaves its study consistent: trials still running
    are failed (as on a resume: not counted, asked again), so the next run picks up cleanly.
    Returns the error to report: a failed write becomes one line naming the path and the fix."""
    from ._storage import StorageUnavailable
    from ._study import fail_orphans, open_study

    if isinstance(exc, StorageUnavailable):
        return exc  # the storage is away: settling it would wait again; the next run does it
    try:
        settled = fail_orphans(open_study(config))
    except Exception:  # the storage itself may be what failed; the next run settles it
        settled = None
    if not isinstance(exc, OSError) or not exc.filename:
        return exc
    if settled is None:
        note = "the study could not be settled (the next run does it); "
    elif settled:
        note = f"trials {settled} were still running and were failed (not counted, asked again); "
    else:
        note = ""
    return ValueError(
        f"{write_error(exc)}; {note}every finished trial is in the study: fix it, then run the "
        "same command again to resume"
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def root_error(exc: BaseException) -> BaseException:
    """The error a Ray task or actor raised, not Ray's wrapper of it: the wrapper's text is the
    remote traceback, whose last line (what went wrong) a one-line report would cut off."""
    while type(exc).__module__.startswith("ray.") and isinstance(
        getattr(exc, "cause", None), BaseException
    ):
        exc = exc.cause  # type: ignore[attr-defined]
    return exc


def write_error(exc: OSError) -> str:
    """A write that failed (disk full, read-only, a path through a file), named with its fix."""
    from workers import CACHE_VAR, cache_dir

    path = str(exc.filename)
    cache = os.path.abspath(cache_dir())
    what = f"cannot write {path!r} ({exc.strerror or exc})"
    if os.path.abspath(path).startswith(cache + os.sep):
        return f"{CACHE_VAR}: {what}; free space there or set {CACHE_VAR} to a writable directory"
    if "mlruns" in path or "artifacts" in path:
        return f"tracking: {what}, an MLflow artifact; free space there or fix the experiment's artifact location"
    return f"{what}; free space there or fix its permissions"


def one_line(message: str) -> str:
    """One line, whatever the error held; a long quoted value is shortened to its start, and a
    terminal's colour codes (Ray colours its task names) are left out."""
    message = _ANSI.sub("", message)
    line = "; ".join(part.strip() for part in message.strip().splitlines() if part.strip())
    return re.sub(r"'([^'\s]{100})[^'\s]{20,}'", lambda m: f"'{m.group(1)}...'", line)
