"""The gRPC face of the Coordinator: translate refusals into status codes, never crash."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lssfl.common.config import SecuritySection
from lssfl.common.peertext import peer_text
from lssfl.common.rpc import GRPC_OPTIONS, SERVICE, add_coordinator_servicer
from lssfl.common.security import (
    CA_CERT,
    REVOKED,
    SERVER_CERT,
    SERVER_KEY,
    SILO_HEADER,
    TOKEN_HEADER,
    TOKENS,
    RevokedFile,
    TokenTable,
)
from lssfl.common.wire import MAX_MESSAGE_BYTES, Message, WireError, read_header
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import coordinator_pb2_grpc as cgrpc
from lssfl.server.admission import Refused
from lssfl.server.coordinator import Coordinator
from lssfl.server.meter import UP
from lssfl.server.rpcerror import RpcError
from lssfl.server.streams import (
    CALLS_PER_SILO,
    DOWNLOADS_AT_ONCE,
    STREAMS_PER_SILO,
    CallerPools,
    PeerLimits,
    Slots,
    StreamWatch,
    Watched,
    watched_messages,
)

log = logging.getLogger("lssfl.service")
R = TypeVar("R")


def _current_round(reply: Any) -> int:
    """The round a reply names as current (Join, Heartbeat, ReportFailure)."""
    return int(reply.current_round)


class Gatekeeper:
    """Checks on every RPC that the caller is the silo it claims to be and not revoked."""

    def __init__(self, security: SecuritySection, silos: list[str]) -> None:
        self.silos = set(silos)
        self.revoked = set(security.revoked)
        # `lssfl certs revoke` writes this file; it counts from the next call, no restart.
        self.revoked_file = RevokedFile(Path(security.dir) / REVOKED) if security.dir else None
        self.mutual_tls = security.mutual_tls
        self.tokens = (
            TokenTable.load(Path(security.dir) / TOKENS)
            if security.tokens and security.dir
            else None
        )

    def caller(self, metadata: Mapping[str, str | bytes]) -> str:
        """The silo a call comes from, by its metadata alone ("" when it does not say and
        tokens are off); RpcError for a missing or wrong token or an unknown silo. Cheap:
        it runs before the call gets a server thread."""
        claimed = str(metadata.get(SILO_HEADER, ""))
        if self.tokens is not None:
            token = str(metadata.get(TOKEN_HEADER, "")).removeprefix("Bearer ").strip()
            silo = self.tokens.silo_for(token) if token else None
            if silo is None:
                raise RpcError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing bearer token" if not token else "token is not valid for any silo",
                )
            if claimed and claimed != silo:
                raise RpcError(
                    grpc.StatusCode.UNAUTHENTICATED, f"token is not valid for silo {claimed!r}"
                )
            return silo
        if claimed and claimed not in self.silos:
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, f"unknown silo {claimed[:64]!r}")
        return claimed

    def same_silo(self, caller: str, silo_id: str) -> None:
        """Refuse a call from ``caller`` (its token's or silo header's silo) that speaks for
        another silo."""
        if caller and silo_id != caller:
            log.warning("refused wrong token for silo %r (from silo %r)", silo_id[:64], caller)
            raise RpcError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"token is not valid for silo {silo_id[:64]!r}"
                if self.tokens is not None
                else f"the call's {SILO_HEADER} header names silo {caller!r}, not {silo_id[:64]!r}",
            )

    def check(self, context: grpc.ServicerContext, silo_id: str) -> None:
        """Refuse (RpcError) a caller that is not ``silo_id`` or is revoked."""
        name = peer_text(silo_id)
        if silo_id in self.revoked or (self.revoked_file and silo_id in self.revoked_file):
            log.warning("refused revoked silo %r (%s)", name, context.peer())
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, f"silo {name!r} is revoked")
        if self.tokens is not None:
            metadata = dict(context.invocation_metadata())
            value = str(metadata.get(TOKEN_HEADER, ""))
            token = value.removeprefix("Bearer ").strip()
            if not token:
                log.warning("refused call without a token for silo %r (%s)", name, context.peer())
                raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
            if self.tokens.silo_for(token) != silo_id:
                log.warning("refused wrong token for silo %r (%s)", name, context.peer())
                raise RpcError(
                    grpc.StatusCode.UNAUTHENTICATED, f"token is not valid for silo {name!r}"
                )
        if self.mutual_tls:
            names = context.auth_context().get("x509_common_name", [])
            if [n.decode() for n in names] != [silo_id]:
                log.warning("refused certificate %r for silo %r", names, name)
                raise RpcError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"client certificate is not issued to silo {name!r}",
                )


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that refuses without reading the request: a request-streaming handler gets
    its thread at once instead of waiting for a request that may never come."""

    def refuse(_requests: Iterator[Any], context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    return grpc.stream_unary_rpc_method_handler(refuse)


class CallerCheck(grpc.ServerInterceptor):
    """Refuses calls with a wrong or missing token, or from an unknown silo, before the call
    is handed to a server thread (interceptors run on gRPC's dispatching thread), and hands
    the others to their caller's own threads."""

    def __init__(
        self,
        gate: Gatekeeper,
        count_refusal: Callable[[str], None],
        pools: CallerPools,
    ) -> None:
        self.gate = gate
        self.count_refusal = count_refusal
        self.pools = pools

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """The call's handler, or one that refuses it at once."""
        if not handler_call_details.method.startswith(f"/{SERVICE}/"):
            return continuation(handler_call_details)  # the health service
        try:
            caller = self.gate.caller(dict(handler_call_details.invocation_metadata))
        except RpcError as exc:
            log.warning("refused %s: %s", handler_call_details.method.rsplit("/", 1)[-1], exc)
            self.count_refusal(exc.code.name)
            return _refusal(exc.code, str(exc))
        handler = continuation(handler_call_details)
        return None if handler is None else self.pools.route(caller, handler)


def _upload_slots(coordinator: Coordinator) -> Slots:
    """``max_inflight_upload_mb`` (default: four models) as a number of whole models."""
    model_bytes = max(1, sum(t.nbytes for t in coordinator.global_state.values()))
    cap_mb = coordinator.cfg.coordinator.max_inflight_upload_mb
    cap = 4 * model_bytes if cap_mb is None else int(cap_mb * 2**20)
    return Slots(max(1, cap // model_bytes), "upload")


class CoordinatorServicer(cgrpc.CoordinatorServicer):
    """The Coordinator service: each RPC checked and bounded, then handed to the Coordinator."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.meter = coordinator.meter  # what enters and leaves is counted here, at the edge
        self.gate = Gatekeeper(coordinator.cfg.security, coordinator.cfg.silos)
        self.limits = PeerLimits()
        self.watch = StreamWatch(
            coordinator.cfg.coordinator.stream_idle_timeout_s, lambda: coordinator.rounds_closed
        )
        self.slots = _upload_slots(coordinator)
        # Downloads sending at once: each holds gRPC's send buffers and flow-control window,
        # and a few keep the link busy; the others wait their turn, unread.
        self.download_slots = Slots(DOWNLOADS_AT_ONCE, "download")
        # Calls in progress from callers that name no silo (tokens off, no silo header).
        self.unidentified_calls = max(4, 2 * len(coordinator.cfg.silos))

    @contextlib.contextmanager
    def _bounded(
        self, context: grpc.ServicerContext, silo_id: str | None, what: str | None = None
    ) -> Iterator[Watched | None]:
        """Run the block as one call of its caller, counted against the caller's bounds, as a
        watched model stream when ``what`` names one. A refusal aborts the call with its
        status code; a bug costs this call, not the coordinator."""
        watched: Watched | None = None
        try:
            peer = self.gate.caller(dict(context.invocation_metadata()))
            if silo_id is not None:
                self.gate.same_silo(peer, silo_id)
            # Calls in progress are bounded by the caller's own threads (CallerPools): one
            # beyond them waits for one. Model streams hold theirs long, so they are counted.
            with contextlib.ExitStack() as stack:
                if what is not None:
                    stack.enter_context(self.limits.hold(peer, "model streams", STREAMS_PER_SILO))
                    label = f"{what} of silo {peer or silo_id or '?'} ({context.peer()})"
                    watched = stack.enter_context(
                        self.watch.watch(label, context, self.coordinator.stream_deadline())
                    )
                if silo_id is not None:
                    self.gate.check(context, silo_id)
                yield watched
        except (RpcError, Refused) as exc:
            error = RpcError.of(exc.refusal) if isinstance(exc, Refused) else exc
            self.coordinator.count_refusal(error.code.name)
            context.abort(error.code, str(error))
        except grpc.RpcError:
            if watched is not None and watched.tripped:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"cancelled: {watched.tripped}")
            # Reading the request stream failed: gRPC ended the call because the client
            # cancelled or went away, or sent a message over the size limit (the client got
            # RESOURCE_EXHAUSTED; from here the two look the same). Not an internal error.
            log.info(
                "call from %s ended by the client: cancelled, disconnected or a message over "
                "%d MiB",
                context.peer() or "?",
                MAX_MESSAGE_BYTES >> 20,
            )
            raise
        except Exception as exc:
            if watched is not None and watched.tripped:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"cancelled: {watched.tripped}")
            log.exception("internal error")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")

    def _unary(
        self,
        context: grpc.ServicerContext,
        request: Any,
        method: Callable[[Any], R],
        round_of: Callable[[R], int],
    ) -> R:
        """``method(request)`` for a caller checked to be ``request.silo_id``, within its
        bounds; the request and reply counted by the meter in the round ``round_of(reply)``."""
        with self._bounded(context, request.silo_id):
            reply = method(request)
        self.meter.call(round_of(reply), request.silo_id, request, reply)
        return reply

    def Join(self, request: cpb.JoinRequest, context: grpc.ServicerContext) -> cpb.JoinReply:
        """A silo enrols for the run."""
        return self._unary(context, request, self.coordinator.join, _current_round)

    def GetTask(self, request: cpb.TaskRequest, context: grpc.ServicerContext) -> cpb.Task:
        """A silo's long poll for its next task."""
        return self._unary(context, request, self.coordinator.get_task, lambda task: task.round)

    def DownloadModel(
        self, request: cpb.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """This round's model as a stream of pre-serialized chunks."""
        with self._bounded(
            context, request.silo_id, f"round {request.round} download"
        ) as stream_watch:
            assert stream_watch is not None
            messages = self.coordinator.download(request)
            self.meter.add(request.round, request.silo_id, UP, request.ByteSize())
            with self.download_slots.take(stream_watch):
                # Pre-serialized ModelChunk messages: the serializer passes bytes through.
                for msg in self.meter.sent(request.round, request.silo_id, messages):
                    yield msg
                    stream_watch.touch()  # the previous message went out: the reader keeps up

    def UploadResult(
        self, request_iterator: Iterator[Message], context: grpc.ServicerContext
    ) -> cpb.UploadReply:
        """A silo's trained model: header first (who, which round), then tensors."""
        with self._bounded(context, None, "upload") as stream_watch:
            assert stream_watch is not None
            messages = watched_messages(iter(request_iterator), stream_watch)
            try:
                header = read_header(messages, "upload")
            except WireError:
                log.warning("rejected upload: upload must start with its header")
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT, "upload must start with its header"
                ) from None
            head = header.upload
            self.gate.same_silo(self.gate.caller(dict(context.invocation_metadata())), head.silo_id)
            self.gate.check(context, head.silo_id)
            done = self.coordinator.admit_upload(header)
            if done is not None:
                return done
            # Counted from the header on, once the coordinator has admitted the silo and round.
            stream = self.meter.received(
                head.round, head.silo_id, itertools.chain([header], messages)
            )
            next(stream)
            return self.coordinator.upload(
                header, stream, slot=lambda: self.slots.take(stream_watch)
            )
        raise AssertionError("unreachable")  # _bounded returns or aborts

    def Heartbeat(
        self, request: cpb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> cpb.HeartbeatReply:
        """A silo's sign of life."""
        return self._unary(context, request, self.coordinator.heartbeat, _current_round)

    def ReportFailure(
        self, request: cpb.FailureReport, context: grpc.ServicerContext
    ) -> cpb.FailureReply:
        """A silo could not do its task this round."""
        return self._unary(context, request, self.coordinator.report_failure, _current_round)

    def ReportEvaluation(
        self, request: cpb.EvaluationReport, context: grpc.ServicerContext
    ) -> cpb.EvaluationReply:
        """A silo's measure of the final model on its own held-out data."""
        # The coordinator accepted it for request.round, the round being evaluated.
        return self._unary(
            context, request, self.coordinator.report_evaluation, lambda _reply: request.round
        )


def server_credentials(security: SecuritySection) -> grpc.ServerCredentials | None:
    """TLS credentials from ``security.dir``, or None when TLS is off."""
    if not security.tls:
        return None
    folder = Path(security.dir or ".")
    ca = (folder / CA_CERT).read_bytes() if security.mutual_tls else None
    return grpc.ssl_server_credentials(
        [((folder / SERVER_KEY).read_bytes(), (folder / SERVER_CERT).read_bytes())],
        root_certificates=ca,
        require_client_auth=security.mutual_tls,
    )


# glibc's mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


def _return_freed_buffers() -> None:
    """Make the megabyte message buffers of model streams go back to the OS when freed.

    By default glibc gives each busy thread its own arena and raises its mmap threshold each
    time a large block is freed, so a 1 MB chunk soon comes from an arena and stays there
    once freed: with a hundred silos streaming, the coordinator's RSS grew by about one
    model per silo (bench/coordinator_scale.py: 4.5 GB at 100 silos against 1.4 GB at 5).
    A fixed threshold keeps such buffers mmapped; two arenas bound what freed small blocks
    can pin. Without glibc (musl, macOS) this does nothing.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
    mallopt(_M_ARENA_MAX, 2)


def serve(coordinator: Coordinator, host: str, port: int) -> tuple[grpc.Server, int]:
    """Start the service; returns the server and the port it bound (``port=0``: any free)."""
    _return_freed_buffers()
    servicer = CoordinatorServicer(coordinator)
    # Each silo's calls run on its own threads, as many as its bound, and the unidentified
    # callers' on theirs: a peer at its bound is refused at once, and one that holds its
    # threads (even with requests it never sends) cannot starve the others. gRPC's own pool
    # is left the health service and the refusals, which end at once.
    pools = CallerPools(coordinator.cfg.silos, CALLS_PER_SILO, servicer.unidentified_calls)
    # No SO_REUSEPORT: with it a second coordinator binds the same port and the kernel splits
    # the silos' connections between the two.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[CallerCheck(servicer.gate, coordinator.count_refusal, pools)],
        options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)],
    )
    weakref.finalize(server, pools.close)
    add_coordinator_servicer(servicer, server)
    # The standard gRPC health service, for load balancers and container health checks.
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = (
            server.add_secure_port(f"{host}:{port}", creds)
            if (creds := server_credentials(coordinator.cfg.security))
            else server.add_insecure_port(f"{host}:{port}")
        )
    except RuntimeError:  # grpcio raises where older versions returned 0
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}: the port is in use or not allowed")
    server.start()
    security = coordinator.cfg.security
    if not (security.tokens or security.mutual_tls):
        log.warning(
            "silo identities are NOT authenticated (security.tokens and mutual_tls are off): "
            "any client that reaches %s:%d can act as any enrolled silo",
            host,
            bound,
        )
    return server, bound
