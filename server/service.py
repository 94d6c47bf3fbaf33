"""The gRPC face of the Coordinator: translate refusals into status codes, never crash."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lssfl.common.config import SecuritySection
from lssfl.common.rpc import GRPC_OPTIONS, add_coordinator_servicer
from lssfl.common.security import CA_CERT, SERVER_CERT, SERVER_KEY, TOKEN_HEADER, TOKENS, TokenTable
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import coordinator_pb2_grpc as cgrpc
from lssfl.proto import tensor_pb2 as pb
from lssfl.server.coordinator import Coordinator, RpcError

log = logging.getLogger("lssfl.service")
T = TypeVar("T")


class Gatekeeper:
    """Checks on every RPC that the caller is the silo it claims to be and not revoked."""

    def __init__(self, security: SecuritySection) -> None:
        self.revoked = set(security.revoked)
        self.mutual_tls = security.mutual_tls
        self.tokens = (
            TokenTable.load(Path(security.dir) / TOKENS)
            if security.tokens and security.dir
            else None
        )

    def check(self, context: grpc.ServicerContext, silo_id: str) -> None:
        if silo_id in self.revoked:
            log.warning("refused revoked silo %r (%s)", silo_id, context.peer())
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, f"silo {silo_id!r} is revoked")
        if self.tokens is not None:
            metadata = dict(context.invocation_metadata())
            value = str(metadata.get(TOKEN_HEADER, ""))
            token = value.removeprefix("Bearer ").strip()
            if not token:
                log.warning(
                    "refused call without a token for silo %r (%s)", silo_id, context.peer()
                )
                raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
            if self.tokens.silo_for(token) != silo_id:
                log.warning("refused wrong token for silo %r (%s)", silo_id, context.peer())
                raise RpcError(
                    grpc.StatusCode.UNAUTHENTICATED, f"token is not valid for silo {silo_id!r}"
                )
        if self.mutual_tls:
            names = context.auth_context().get("x509_common_name", [])
            if [n.decode() for n in names] != [silo_id]:
                log.warning("refused certificate %r for silo %r", names, silo_id)
                raise RpcError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"client certificate is not issued to silo {silo_id!r}",
                )


class CoordinatorServicer(cgrpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self.gate = Gatekeeper(coordinator.cfg.security)

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RpcError as exc:
            context.abort(exc.code, str(exc))
        except Exception as exc:  # a bug must cost one call, not the coordinator
            log.exception("internal error")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        raise AssertionError("unreachable")

    def _checked(self, context: grpc.ServicerContext, silo_id: str, fn: Callable[[], T]) -> T:
        self.gate.check(context, silo_id)
        return fn()

    def Join(self, request: cpb.JoinRequest, context: grpc.ServicerContext) -> cpb.JoinReply:
        return self._call(
            context, lambda: self._checked(context, request.silo_id, lambda: self.c.join(request))
        )

    def GetTask(self, request: cpb.TaskRequest, context: grpc.ServicerContext) -> cpb.Task:
        return self._call(
            context,
            lambda: self._checked(context, request.silo_id, lambda: self.c.get_task(request)),
        )

    def DownloadModel(
        self, request: cpb.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        yield from self._call(
            context,
            lambda: self._checked(context, request.silo_id, lambda: self.c.download(request)),
        )

    def UploadResult(
        self, request_iterator: Iterator[pb.ModelChunk], context: grpc.ServicerContext
    ) -> cpb.UploadReply:
        return self._call(
            context, lambda: self.c.upload(request_iterator, lambda s: self.gate.check(context, s))
        )

    def Heartbeat(
        self, request: cpb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> cpb.HeartbeatReply:
        return self._call(
            context,
            lambda: self._checked(context, request.silo_id, lambda: self.c.heartbeat(request)),
        )


def server_credentials(security: SecuritySection) -> grpc.ServerCredentials | None:
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
    health_servicer.set("lssfl.v1.Coordinator", health_pb2.HealthCheckResponse.SERVING)
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
    return server, bound
