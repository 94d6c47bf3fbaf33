"""One log format for every process: time, level, role, then round= and silo= fields."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def setup_logging(role: str, verbose: bool = False) -> None:
    """Log lines on stderr that name this process's ``role``; DEBUG when ``verbose``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)-7s {role} %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def also_log_to(path: Path) -> None:
    """Copy this process's log lines into ``path`` (the run folder's logs/), unless stderr
    already goes there (``lssfl run`` sends each process's output to its log file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if os.path.samestat(os.fstat(sys.stderr.fileno()), os.stat(path)):
            return
    except (OSError, ValueError):  # no such file yet, or a stderr without a descriptor
        pass
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    handler.setFormatter(root.handlers[0].formatter if root.handlers else None)
    root.addHandler(handler)


def one_line(exc: BaseException, limit: int = 300, typed: bool = False) -> str:
    """``exc``'s message for a one-line error: whitespace folded (a traceback-like message
    stays on its line), cut to ``limit`` characters; prefixed with its type when ``typed``
    (for errors from code we do not own, where the type says more than the message)."""
    text = " ".join(str(exc).split())
    if typed or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
