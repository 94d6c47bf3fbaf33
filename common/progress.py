"""A one-line progress bar on stderr when it is a terminal; silent in logs and pipes."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str, unit: str = "") -> Iterator[T]:
    """Yield ``items``, drawing ``desc [#####-----] n/total`` at most 10 times a second.

    ``total`` 0 means unknown (a stream): only the count is drawn.
    """
    if not sys.stderr.isatty():
        yield from items
        return
    last = 0.0
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last > 0.1 or done == total:
            last = now
            if total > 0:
                filled = int(30 * done / total)
                bar = "#" * filled + "-" * (30 - filled)
                sys.stderr.write(f"\r{desc} [{bar}] {done}/{total}{unit}")
            else:
                sys.stderr.write(f"\r{desc} {done}{unit}")
            sys.stderr.flush()
    sys.stderr.write("\n")
