"""Strings a peer sent, made safe to log and to store.

A silo (or a coordinator, seen from a silo) chooses every byte of the strings it sends: a
newline in a device name forges a log line, a 3 MiB version string is written on every
Join. Whatever reaches a log line or the run's database passes through ``peer_text`` first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# Longer than any honest device, version, silo id, state or metric name.
MAX_PEER_TEXT = 128
# Reasons and error messages a peer reports: one line, still bounded.
MAX_PEER_REASON = 400
# Metrics one upload may carry (train_loss, train_accuracy...): a handful in practice.
MAX_METRICS = 32


def peer_text(value: str, limit: int = MAX_PEER_TEXT) -> str:
    """``value`` with control and non-printable characters escaped (``\\n``, ``\\x1b``...) and
    cut to ``limit`` characters, a cut marked with ``...`` and the full length."""
    # Escaping works character by character, so the first ``limit`` characters are all that
    # can show: a 3 MiB string is not escaped whole on every Join.
    head = value[:limit]
    escaped = head.encode("unicode_escape").decode("ascii") if not head.isprintable() else head
    if len(escaped) <= limit and len(value) <= limit:
        return escaped
    return f"{escaped[:limit]}...({len(value)} chars)"


def check_metrics(metrics: Mapping[str, float]) -> str | None:
    """Why ``metrics`` cannot be stored (too many, a name too long or unprintable, a value
    not finite), or None when they can."""
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics, at most {MAX_METRICS}"
    for name, value in metrics.items():
        if not name or len(name) > MAX_PEER_TEXT or not name.isprintable():
            return f"metric name {peer_text(name, 40)!r} is empty, too long or unprintable"
        if not math.isfinite(value):
            return f"metric {name!r} is {value}, not a finite number"
    return None
