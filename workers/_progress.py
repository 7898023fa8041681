"""Progress of the long phases a user waits for: a bar on a terminal, a line per step elsewhere.

A bar (tqdm) on a terminal; when output is a file or a pipe (CI, `ray job logs`), bars are
unreadable, so each step is one log line instead. Both go through the ``prunesearch`` logger's
level: silent where nobody configured it (a Ray worker building its task from the cache).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

from tqdm import tqdm

_log = logging.getLogger("prunesearch.progress")


@contextlib.contextmanager
def steps(total: int, what: str, unit: str = "step") -> Iterator[Callable[[str], None]]:
    """``advance(note)`` once per step of ``total`` (``advance(note, n)``: n steps at once, as a
    batch of candidates coming back): the bar moves, or a line says ``what: i/total, note``."""
    shown = _log.isEnabledFor(logging.INFO)
    bar = tqdm(total=total, desc=what, unit=unit, leave=False, disable=not (shown and _tty()))
    done = 0

    def advance(note: str = "", n: int = 1) -> None:
        nonlocal done
        done += n
        bar.update(n)
        if note:
            bar.set_postfix_str(note)
        if bar.disable:
            _log.info("%s: %d/%d%s", what, done, total, f", {note}" if note else "")

    try:
        yield advance
    finally:
        bar.close()


@contextlib.contextmanager
def epoch_progress(epochs: float, what: str) -> Iterator[Callable[[int, float], bool]]:
    """``on_epoch`` for ``finetune``: one step per epoch, with the validation accuracy."""
    with steps(int(-(-epochs // 1)), what, "epoch") as advance:

        def on_epoch(epoch: int, acc: float) -> bool:
            advance(f"accuracy {acc:.4f}")
            return False  # never stops training early

        yield on_epoch


def _tty() -> bool:
    return sys.stderr.isatty()
