"""The gRPC face of the Coordinator: translate refusals into status codes, never crash."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
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
    TOKEN_HEADER,
    TOKENS,
    RevokedFile,
    TokenTable,
)
from lssfl.common.wire import MAX_MESSAGE_BYTES, Message, WireError, read_header
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import coordinator_pb2_grpc as cgrpc
from lssfl.server.coordinator import Coordinator, RpcError
from lssfl.server.meter import UP

log = logging.getLogger("lssfl.service")
T = TypeVar("T")


class Gatekeeper:
    """Checks on every RPC that the caller is the silo it claims to be and not revoked."""

    def __init__(self, security: SecuritySection) -> None:
        self.revoked = set(security.revoked)
        # `lssfl certs revoke` writes this file; it counts from the next call, no restart.
        self.revoked_file = RevokedFile(Path(security.dir) / REVOKED) if security.dir else None
        self.mutual_tls = security.mutual_tls
        self.tokens = (
            TokenTable.load(Path(security.dir) / TOKENS)
            if security.tokens and security.dir
            else None
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


class CoordinatorServicer(cgrpc.CoordinatorServicer):
    """The Coordinator service: each RPC checked, then handed to the Coordinator."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self.meter = coordinator.meter  # what enters and leaves is counted here, at the edge
        self.gate = Gatekeeper(coordinator.cfg.security)

    def _answer(
        self,
        context: grpc.ServicerContext,
        silo_id: str | None,
        method: Callable[..., T],
        *args: Any,
    ) -> T:
        """``method(*args)`` for a caller checked to be ``silo_id`` (None: ``method`` checks,
        as an upload names its silo only in its header). A refusal aborts the call with its
        status code; a bug costs this call, not the coordinator."""
        try:
            if silo_id is not None:
                self.gate.check(context, silo_id)
            return method(*args)
        except RpcError as exc:
            self.c.count_refusal(exc.code)
            context.abort(exc.code, str(exc))
        except grpc.RpcError:
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
            log.exception("internal error")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        raise AssertionError("unreachable")  # abort raises

    def _upload(self, context: grpc.ServicerContext, chunks: Iterator[Message]) -> cpb.UploadReply:
        it = iter(chunks)
        try:
            header = read_header(it, "upload")
        except WireError:
            log.warning("rejected upload: upload must start with its header")
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, "upload must start with its header"
            ) from None
        head = header.upload
        self.gate.check(context, head.silo_id)
        done = self.c.admit_upload(header)
        if done is not None:
            return done
        # Counted from the header on, once the coordinator has admitted the silo and round.
        stream = self.meter.received(head.round, head.silo_id, itertools.chain([header], it))
        next(stream)
        return self.c.upload(header, stream)

    def Join(self, request: cpb.JoinRequest, context: grpc.ServicerContext) -> cpb.JoinReply:
        """A silo enrols for the run."""
        reply = self._answer(context, request.silo_id, self.c.join, request)
        self.meter.call(reply.current_round, request.silo_id, request, reply)
        return reply

    def GetTask(self, request: cpb.TaskRequest, context: grpc.ServicerContext) -> cpb.Task:
        """A silo's long poll for its next task."""
        task = self._answer(context, request.silo_id, self.c.get_task, request)
        self.meter.call(task.round, request.silo_id, request, task)
        return task

    def DownloadModel(
        self, request: cpb.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """This round's model as a stream of pre-serialized chunks."""
        messages = self._answer(context, request.silo_id, self.c.download, request)
        self.meter.add(request.round, request.silo_id, UP, request.ByteSize())
        # Pre-serialized ModelChunk messages: the handler's serializer passes bytes through.
        yield from self.meter.sent(request.round, request.silo_id, messages)

    def UploadResult(
        self, request_iterator: Iterator[Message], context: grpc.ServicerContext
    ) -> cpb.UploadReply:
        """A silo's trained model: header first (who, which round), then tensors."""
        return self._answer(context, None, self._upload, context, request_iterator)

    def Heartbeat(
        self, request: cpb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> cpb.HeartbeatReply:
        """A silo's sign of life."""
        reply = self._answer(context, request.silo_id, self.c.heartbeat, request)
        self.meter.call(reply.current_round, request.silo_id, request, reply)
        return reply

    def ReportFailure(
        self, request: cpb.FailureReport, context: grpc.ServicerContext
    ) -> cpb.FailureReply:
        """A silo could not do its task this round."""
        reply = self._answer(context, request.silo_id, self.c.report_failure, request)
        self.meter.call(reply.current_round, request.silo_id, request, reply)
        return reply

    def ReportEvaluation(
        self, request: cpb.EvaluationReport, context: grpc.ServicerContext
    ) -> cpb.EvaluationReply:
        """A silo's measure of the final model on its own held-out data."""
        reply = self._answer(context, request.silo_id, self.c.report_evaluation, request)
        # The coordinator accepted it for request.round, the round being evaluated.
        self.meter.call(request.round, request.silo_id, request, reply)
        return reply


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


def serve(coordinator: Coordinator, host: str, port: int) -> tuple[grpc.Server, int]:
    """Start the service; returns the server and the port it bound (``port=0``: any free)."""
    workers = max(16, 4 * len(coordinator.cfg.silos))
    # No SO_REUSEPORT: with it a second coordinator binds the same port and the kernel splits
    # the silos' connections between the two.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)],
    )
    add_coordinator_servicer(CoordinatorServicer(coordinator), server)
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
