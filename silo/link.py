"""How a silo calls the coordinator: which answers mean "ask again later" and the backoff
between tries, which end the silo, and which mean join again."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from lssfl.common.peertext import MAX_PEER_REASON, peer_text
from lssfl.common.tls_errors import TlsMisconfigured, explain_connect_failure

log = logging.getLogger("lssfl.silo")
T = TypeVar("T")

# Answers after which the silo asks again (with backoff) instead of stopping: the coordinator is
# unreachable or slow, or it turned a call away for now: a stream cancelled by its watchdog or
# its round's close (CANCELLED), a silo over its per-peer bounds (RESOURCE_EXHAUSTED), a call
# cut short (ABORTED). A daemon next to a dataset outlives them all.
RETRY_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
)


class SiloRefused(RuntimeError):
    """The coordinator will not work with this silo (unknown id, revoked...)."""


class CoordinatorUnreachable(RuntimeError):
    """The coordinator did not answer within the silo's ``max_wait``."""


class Rejoin(Exception):
    """The coordinator forgot us (restart, new run): join again."""


def peer_reason(exc: grpc.RpcError) -> str:
    """The coordinator's message in a refusal, escaped and bounded for our log."""
    return peer_text(exc.details() or exc.code().name, MAX_PEER_REASON)


def call_with_backoff(
    what: str,
    fn: Callable[[], T],
    *,
    address: str,
    silo_id: str,
    max_wait_s: float,
    tls_files: tuple[Path | None, Path | None, Path | None] | None,
) -> T:
    """Call ``fn`` until it answers; backoff while the coordinator at ``address`` is
    unreachable, CoordinatorUnreachable after ``max_wait_s``. ``tls_files``: the (ca, cert,
    key) behind the channel, to explain a failed handshake (TlsMisconfigured); None: not
    known. SiloRefused when the coordinator will not have this silo, Rejoin when it forgot it.
    """
    delay, since = 0.5, time.monotonic()
    suspected: str | None = None
    while True:
        try:
            return fn()
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                raise SiloRefused(peer_reason(exc)) from None
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise Rejoin(peer_reason(exc)) from None
            if code not in RETRY_CODES:
                raise
            if tls_files is not None:
                problem = explain_connect_failure(address, exc.details(), *tls_files)
                # Twice in a row: a coordinator caught mid-restart does not end a silo.
                if problem and problem == suspected:
                    raise TlsMisconfigured(problem) from None
                suspected = problem
            waited = time.monotonic() - since
            if waited > max_wait_s:
                raise CoordinatorUnreachable(
                    f"coordinator {address} unreachable for {waited:.0f} s ({what})"
                ) from None
            log.warning(
                "silo=%s %s: %s; retrying in %.1f s",
                silo_id,
                what,
                suspected
                or (
                    f"coordinator unavailable ({code.name})"
                    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                    else f"{code.name}: {peer_reason(exc)}"
                ),
                delay,
            )
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 10.0)
