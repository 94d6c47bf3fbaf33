"""Crash points for the fault-injection tests.

``LSSFL_CRASH_AT=aggregate:2`` makes the process SIGKILL itself when it reaches the point
"aggregate" of round 2, so a test can kill the coordinator at an exact instant (during
aggregation, between a checkpoint's write and its rename, before a round's commit). Unset,
it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def crash_point(tag: str) -> None:
    """SIGKILL this process if ``LSSFL_CRASH_AT`` names ``tag``."""
    if os.environ.get("LSSFL_CRASH_AT") == tag:
        os.kill(os.getpid(), signal.SIGKILL)
