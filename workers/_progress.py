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
def epoch_progress(epochs: float, what: str) -> Iterator[Callable[[int, float], bool]]:
    """``on_epoch`` for ``finetune``: one step per epoch, with the validation accuracy."""
    total = int(-(-epochs // 1))
    shown = _log.isEnabledFor(logging.INFO)
    bar = tqdm(total=total, desc=what, unit="epoch", leave=False, disable=not (shown and _tty()))

    def on_epoch(epoch: int, acc: float) -> bool:
        bar.update(1)
        bar.set_postfix_str(f"accuracy {acc:.4f}")
        if bar.disable:
            _log.info("%s: epoch %d/%d, accuracy %.4f", what, epoch + 1, total, acc)
        return False  # never stops training early

    try:
        yield on_epoch
    finally:
        bar.close()


def _tty() -> bool:
    return sys.stderr.isatty()
