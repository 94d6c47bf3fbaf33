"""Bounds on the model streams a peer can hold: per-peer counts, idle and overall deadlines,
and room for uploads being decoded.

gRPC's Python server runs each call on a thread of a fixed pool; a stream that stops sending
(or a download nobody reads) would hold its thread forever, and enough of them stop the
coordinator. Every model stream is therefore counted against its peer, watched by one
thread that cancels it once it moves nothing for ``stream_idle_timeout_s`` or outlives its
round, and an upload decodes only when a slot of the in-flight budget is free.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from lssfl.server.rpcerror import RpcError

log = logging.getLogger("lssfl.service")
T = TypeVar("T")

# Model streams (downloads and uploads together) one silo may hold at once. A silo needs one;
# the second covers a retry that overlaps the stream it replaces.
STREAMS_PER_SILO = 2
# Server threads of one silo (CallerPools), so calls of any kind it may have in progress: a long
# poll, a heartbeat, its streams and a join.
CALLS_PER_SILO = 6
# Model downloads sending at once; the others wait (bench/coordinator_scale.py).
DOWNLOADS_AT_ONCE = 8


class PeerLimits:
    """Counts the calls each peer (silo id, or "" when unknown) has in progress."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    @contextlib.contextmanager
    def hold(self, peer: str, kind: str, limit: int) -> Iterator[None]:
        """Count one call of ``kind`` for ``peer`` while the block runs; RpcError
        (RESOURCE_EXHAUSTED) when ``peer`` already holds ``limit`` of them."""
        key = (peer, kind)
        with self._lock:
            held = self._counts.get(key, 0)
            if held >= limit:
                who = f"silo {peer!r}" if peer else "callers without a silo identity"
                raise RpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{who} already hold{'s' if peer else ''} {held} {kind} in progress "
                    f"(limit {limit})",
                )
            self._counts[key] = held + 1
        try:
            yield
        finally:
            with self._lock:
                self._counts[key] -= 1

    def held(self, peer: str, kind: str) -> int:
        """How many calls of ``kind`` ``peer`` has in progress."""
        with self._lock:
            return self._counts.get((peer, kind), 0)


@dataclass
class Watched:
    """One stream under watch: when it last moved, and by when it must end."""

    what: str
    context: grpc.ServicerContext
    hard_end: float
    last: float
    epoch: int  # rounds closed when it opened
    paused: bool = False  # waiting on the coordinator (an upload slot), not on the peer
    # Every message is in: what is left (checks, the write to disk) is the coordinator's work,
    # and an accepted upload must not be cancelled by a round that closed on its account.
    read: bool = False
    tripped: str = ""  # why the watch cancelled it

    def touch(self) -> None:
        """The stream moved a message."""
        self.last = time.monotonic()


class StreamWatch:
    """One thread that cancels streams idle for ``idle_s``, past their hard end, or opened
    before the last round closed (``rounds_closed()`` counts closes), unless the peer has sent
    all it had to."""

    def __init__(self, idle_s: float, rounds_closed: Callable[[], int]) -> None:
        self.idle_s = idle_s
        self.rounds_closed = rounds_closed
        self._lock = threading.Lock()
        self._watched: dict[int, Watched] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stream-watch", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watch(self, what: str, context: grpc.ServicerContext, hard_end: float) -> Iterator[Watched]:
        """Watch the stream behind ``context`` while the block runs."""
        w = Watched(what, context, hard_end, time.monotonic(), self.rounds_closed())
        with self._lock:
            self._watched[id(w)] = w
        try:
            yield w
        finally:
            with self._lock:
                del self._watched[id(w)]

    def check(self, now: float) -> list[Watched]:
        """Cancel what is overdue at ``now``; returns those cancelled."""
        with self._lock:
            watched = list(self._watched.values())
        cancelled = []
        closed = self.rounds_closed()
        for w in watched:
            if w.tripped or w.read:
                continue
            if now > w.hard_end:
                w.tripped = "past the round's deadline"
            elif closed != w.epoch:
                w.tripped = "its round closed"
            elif not w.paused and now - w.last > self.idle_s:
                w.tripped = f"no message for {now - w.last:.0f} s (stream_idle_timeout_s)"
            else:
                continue
            log.warning("%s cancelled: %s", w.what, w.tripped)
            w.context.cancel()
            cancelled.append(w)
        return cancelled

    def _loop(self) -> None:
        period = min(1.0, self.idle_s / 4)
        while not self._stop.wait(period):
            self.check(time.monotonic())

    def close(self) -> None:
        """Stop the watching thread."""
        self._stop.set()


def watched_messages(messages: Iterator[T], w: Watched) -> Iterator[T]:
    """``messages``, noting each as movement of the watched stream, and its end."""
    for msg in messages:
        w.touch()
        yield msg
    w.read = True


class Slots:
    """Room for ``slots`` streams of one kind (``what``) at once; the others wait their turn."""

    def __init__(self, slots: int, what: str) -> None:
        self.slots = slots
        self.what = what
        self._sem = threading.BoundedSemaphore(slots)

    @contextlib.contextmanager
    def take(self, w: Watched) -> Iterator[None]:
        """Hold one slot while the block runs, waiting for one (not counted as idleness of
        the stream ``w``) until its hard end; RpcError (RESOURCE_EXHAUSTED) if none frees."""
        w.paused = True
        try:
            while not self._sem.acquire(timeout=0.5):
                if time.monotonic() > w.hard_end or w.tripped:
                    raise RpcError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"all {self.slots} {self.what} slots stayed busy until the round's "
                        "deadline",
                    )
        finally:
            w.paused = False
            w.touch()
        try:
            yield
        finally:
            self._sem.release()


class _OnPool:
    """A handler's behavior marked to run on ``pool`` (grpcio's per-handler thread pool,
    read by ``grpc._server._select_thread_pool_for_behavior``)."""

    def __init__(self, behavior: Callable[..., Any], pool: ThreadPoolExecutor) -> None:
        self.behavior = behavior
        self.experimental_thread_pool = pool

    def __call__(self, *args: Any) -> Any:
        return self.behavior(*args)


class CallerPools:
    """Server threads per caller: ``per_silo`` for each enrolled silo, ``unidentified`` shared
    by callers that name none. gRPC waits for a unary call's one request on a server thread,
    before any handler (and so any per-peer count) runs: a caller that opens calls and never
    sends the request holds a thread each. On its own pool it holds only its own threads;
    its further calls queue behind them, and every other caller keeps its threads."""

    def __init__(self, silos: list[str], per_silo: int, unidentified: int) -> None:
        self._pools = {s: ThreadPoolExecutor(per_silo, f"calls-{s[:32]}") for s in silos}
        self._pools[""] = ThreadPoolExecutor(unidentified, "calls-unidentified")

    def route(self, caller: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` with its behavior run on ``caller``'s pool."""
        kind = ("unary", "stream")[handler.request_streaming] + "_"
        kind += ("unary", "stream")[handler.response_streaming]
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        behavior = _OnPool(getattr(handler, kind), self._pools[caller])
        return make(behavior, handler.request_deserializer, handler.response_serializer)

    def close(self) -> None:
        """Let the pools' threads go (the server is stopped: no call is left on them)."""
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
