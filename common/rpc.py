"""The Coordinator service's stub and handler registration, with fast model streams.

The generated code (de)serializes every ModelChunk through protobuf. For the two model
streams these use ``lssfl.common.wire``'s ``to_wire`` / ``parse_chunk`` instead: data
chunks travel pre-serialized and arrive as views of the received bytes, so megabytes are
not copied again on each side. Every other method keeps the generated behaviour.
"""

from __future__ import annotations

from typing import Any

import grpc
import grpc.experimental

from lssfl.common.wire import MAX_MESSAGE_BYTES, parse_chunk, to_wire
from lssfl.proto import coordinator_pb2 as cpb
from lssfl.proto import coordinator_pb2_grpc as cgrpc

# The service's full name ("lssfl.v1.Coordinator"), as the .proto file declares it.
SERVICE = cpb.DESCRIPTOR.services_by_name["Coordinator"].full_name

# For the coordinator's server and the silos' channels alike.
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# For the silos' channels: the model download (unary-stream) is read on the calling thread
# instead of being handed over message by message from gRPC's channel-spin thread; on a
# 2-core machine that took a sixth off a ResNet-18 download (bench/transport.py).
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    *GRPC_OPTIONS,
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
]


def coordinator_stub(channel: grpc.Channel) -> cgrpc.CoordinatorStub:
    """The Coordinator client on ``channel``, model streams without extra copies."""
    stub = cgrpc.CoordinatorStub(channel)
    stub.DownloadModel = channel.unary_stream(
        f"/{SERVICE}/DownloadModel",
        request_serializer=cpb.DownloadRequest.SerializeToString,
        response_deserializer=parse_chunk,
    )
    stub.UploadResult = channel.stream_unary(
        f"/{SERVICE}/UploadResult",
        request_serializer=to_wire,
        response_deserializer=cpb.UploadReply.FromString,
    )
    return stub


def add_coordinator_servicer(servicer: cgrpc.CoordinatorServicer, server: grpc.Server) -> None:
    """Register ``servicer``'s methods on ``server``, model streams without extra copies."""

    def unary(method: Any, request: Any, reply: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method,
            request_deserializer=request.FromString,
            response_serializer=reply.SerializeToString,
        )

    handlers = {
        "Join": unary(servicer.Join, cpb.JoinRequest, cpb.JoinReply),
        "GetTask": unary(servicer.GetTask, cpb.TaskRequest, cpb.Task),
        "Heartbeat": unary(servicer.Heartbeat, cpb.HeartbeatRequest, cpb.HeartbeatReply),
        "ReportFailure": unary(servicer.ReportFailure, cpb.FailureReport, cpb.FailureReply),
        "ReportEvaluation": unary(
            servicer.ReportEvaluation, cpb.EvaluationReport, cpb.EvaluationReply
        ),
        "DownloadModel": grpc.unary_stream_rpc_method_handler(
            servicer.DownloadModel,
            request_deserializer=cpb.DownloadRequest.FromString,
            response_serializer=to_wire,
        ),
        "UploadResult": grpc.stream_unary_rpc_method_handler(
            servicer.UploadResult,
            request_deserializer=parse_chunk,
            response_serializer=cpb.UploadReply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
