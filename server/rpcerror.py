"""Refusals at the gRPC edge (the service, its stream bounds) and the status codes of the
state machine's refusals."""

from __future__ import annotations

import grpc

from lssfl.server.admission import Refusal, RefusalKind

# The one table from the coordinator's refusal kinds to gRPC status codes.
STATUS_FOR: dict[RefusalKind, grpc.StatusCode] = {
    RefusalKind.PERMISSION: grpc.StatusCode.PERMISSION_DENIED,
    RefusalKind.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    RefusalKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
}


class RpcError(Exception):
    """A refusal the service turns into a gRPC status; the message says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def of(cls, refusal: Refusal) -> RpcError:
        """The state machine's ``refusal`` as the status the silo reads."""
        return cls(STATUS_FOR[refusal.kind], refusal.message)
