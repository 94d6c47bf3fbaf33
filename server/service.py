"""The gRPC face of the Coordinator: translate refusals into status codes, never crash."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TypeVar

import grpc

from lssfl.common.wire import MAX_MESSAGE_BYTES
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import coordinator_pb2_grpc as cgrpc
from lssfl.proto import tensor_pb2 as pb
from lssfl.server.coordinator import Coordinator, RpcError

log = logging.getLogger("lssfl.service")
T = TypeVar("T")

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class CoordinatorServicer(cgrpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RpcError as exc:
            context.abort(exc.code, str(exc))
        except Exception as exc:  # a bug must cost one call, not the coordinator
            log.exception("internal error")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        raise AssertionError("unreachable")

    def Join(self, request: cpb.JoinRequest, context: grpc.ServicerContext) -> cpb.JoinReply:
        return self._call(context, lambda: self.c.join(request))

    def GetTask(self, request: cpb.TaskRequest, context: grpc.ServicerContext) -> cpb.Task:
        return self._call(context, lambda: self.c.get_task(request))

    def DownloadModel(
        self, request: cpb.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        yield from self._call(context, lambda: self.c.download(request))

    def UploadResult(
        self, request_iterator: Iterator[pb.ModelChunk], context: grpc.ServicerContext
    ) -> cpb.UploadReply:
        return self._call(context, lambda: self.c.upload(request_iterator))

    def Heartbeat(
        self, request: cpb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> cpb.HeartbeatReply:
        return self._call(context, lambda: self.c.heartbeat(request))


def serve(coordinator: Coordinator, host: str, port: int) -> tuple[grpc.Server, int]:
    """Start the service; returns the server and the port it bound (``port=0``: any free)."""
    workers = max(16, 4 * len(coordinator.cfg.silos))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=GRPC_OPTIONS)
    cgrpc.add_CoordinatorServicer_to_server(CoordinatorServicer(coordinator), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound
