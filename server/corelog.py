"""gRPC core's log lines on the coordinator: one line of ours per failed TLS handshake.

A silo with the wrong TLS set-up fails before any RPC exists, so nothing reaches the
service; gRPC core (C++) writes raw ``ssl_transport_security.cc`` lines to file descriptor 2
that name neither the peer nor the likely mistake. With core's ``handshaker`` tracer on,
the failure line carries the peer address. ``route_core_log`` points fd 2 at a pipe read by
a thread that turns each failed handshake into one warning, passes core warnings and errors
on, and drops core's chatter; Python's own stderr keeps the original descriptor.
"""

from __future__ import annotations

import logging
import os
import re
import select
import sys
import threading

# "I1202 03:00:08.561173   12721 handshaker.cc:155] message"
_CORE_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([\w.]+):\d+\] ?(.*)$")
_PEER = re.compile(r"endpoint_peer_address=([^,}\s]+)")
_FAILED = re.compile(r"CallNextHandshakerLocked: error=(?!OK)(.*)")
# Failed handshakes (logged above, with the peer) and ports that cannot be bound (a one-line
# error from serve()).
_SAID_BY_US = ("ssl_transport_security.cc", "add_port.cc")
_REASONS = {
    "WRONG_VERSION_NUMBER": "not a TLS client (a silo without --ca?)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": (
        "no client certificate (mutual TLS: the silo needs --cert and --key)"
    ),
    "BAD_SIGNATURE": "its client certificate is not from this run's CA",
    "CERTIFICATE_VERIFY_FAILED": "its client certificate is not from this run's CA",
    "Socket closed": (
        "it closed the connection mid-handshake (a silo whose --ca is not this run's CA?)"
    ),
}


def describe_failure(text: str) -> str:
    """What a failed handshake in gRPC core's ``text`` means, in one line."""
    for needle, meaning in _REASONS.items():
        if needle in text:
            return meaning
    return text.split(": OK")[0].strip()[:200]


class CoreLogFilter:
    """Feed it core's lines in order; it returns what to print, logs failed handshakes."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._failure: list[str] | None = None  # a failure's lines, until the next core line
        self._keep = True  # whether continuation lines of the current core line are kept

    def feed(self, line: str) -> str | None:
        """The line to print (None: swallowed as part of a failed handshake)."""
        core = _CORE_LINE.match(line)
        if core is None:  # continuation of a multi-line core message
            if self._failure is not None:
                self._failure.append(line)
                return None
            return line if self._keep else None
        self.flush()
        level, source, message = core.groups()
        failed = _FAILED.search(message)
        if source == "handshaker.cc" and failed:
            self._failure = [failed.group(1)]
            return None
        # Info lines are tracer chatter; for these sources we log a line of our own.
        self._keep = level != "I" and source not in _SAID_BY_US
        return line if self._keep else None

    def flush(self) -> None:
        """Log the failure being collected, if any."""
        if self._failure is None:
            return
        text = " ".join(self._failure)
        self._failure = None
        peer = _PEER.search(text)
        self.log.warning(
            "TLS handshake with %s failed: %s",
            peer.group(1) if peer else "an unknown peer",
            describe_failure(text),
        )


def route_core_log(log: logging.Logger) -> None:
    """Call before gRPC starts (the tracer is read once); this process's fd 2 only."""
    os.environ["GRPC_TRACE"] = ",".join(
        t for t in (os.environ.get("GRPC_TRACE", ""), "handshaker") if t
    )
    # Tracer lines are info lines, which core's default verbosity prints; `lssfl run` passes
    # on the ERROR its own process runs with.
    if os.environ.get("GRPC_VERBOSITY", "").upper() in ("ERROR", "NONE"):
        del os.environ["GRPC_VERBOSITY"]
    original = os.dup(2)
    sys.stderr.flush()
    # Python writes through the original descriptor: a traceback never waits on the thread.
    sys.stderr = os.fdopen(os.dup(original), "w", buffering=1)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stderr__:
            handler.setStream(sys.stderr)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    out = os.fdopen(original, "w", buffering=1)
    core = CoreLogFilter(log)

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_end, 1 << 16):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                kept = core.feed(line.decode(errors="replace"))
                if kept is not None:
                    out.write(kept + "\n")
            # A failure's lines end where the next core line starts; when none follows soon,
            # report it now.
            if not pending and not select.select([read_end], [], [], 0.05)[0]:
                core.flush()

    threading.Thread(target=pump, name="grpc-core-log", daemon=True).start()
