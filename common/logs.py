"""One log format for every process: time, level, role, then round= and silo= fields."""

from __future__ import annotations

import logging
import sys


def setup_logging(role: str, verbose: bool = False) -> None:
    """Log lines on stderr that name this process's ``role``; DEBUG when ``verbose``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)-7s {role} %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
