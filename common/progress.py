"""A one-line progress bar on stderr when it is a terminal; silent in logs and pipes."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def _counted(n: int, unit: str) -> str:
    """``unit`` is plural (" messages", " batches"); one of them is singular."""
    if n != 1:
        return f"{n}{unit}"
    return f"{n}{unit[:-2] if unit.endswith(('ches', 'shes', 'xes')) else unit.removesuffix('s')}"


def progress(items: Iterable[T], total: int, desc: str, unit: str = "") -> Iterator[T]:
    """Yield ``items``, redrawing ``desc [#####-----] n/total`` on one line, at most 10 times
    a second.

    ``total`` 0 means unknown (a stream): only the count is drawn.
    """
    if not sys.stderr.isatty():
        yield from items
        return

    def draw(done: int) -> None:
        if total > 0:
            filled = int(30 * done / total)
            bar = "#" * filled + "-" * (30 - filled)
            text = f"{desc} [{bar}] {done}/{_counted(total, unit)}"
        else:
            text = f"{desc} {_counted(done, unit)}"
        # \r and erase-to-end-of-line: a shorter text leaves nothing of the longer one.
        sys.stderr.write(f"\r{text}\x1b[K")
        sys.stderr.flush()

    last, done, shown = 0.0, 0, 0
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last > 0.1:
            last, shown = now, done
            draw(done)
    if done:
        if shown != done:  # the last count, when it came sooner than a redraw was due
            draw(done)
        sys.stderr.write("\n")
