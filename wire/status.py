"""Which gRPC status each drop reason puts on the wire."""

from __future__ import annotations

import grpc

from secagg.protocol.errors import DropReason

STATUS_OF: dict[DropReason, grpc.StatusCode] = {
    DropReason.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    DropReason.DISCONNECTED: grpc.StatusCode.CANCELLED,
    DropReason.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    DropReason.OUT_OF_PHASE: grpc.StatusCode.FAILED_PRECONDITION,
    DropReason.DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
    DropReason.BAD_SIGNATURE: grpc.StatusCode.UNAUTHENTICATED,
    DropReason.WRONG_LENGTH: grpc.StatusCode.INVALID_ARGUMENT,
    DropReason.NOT_A_MEMBER: grpc.StatusCode.PERMISSION_DENIED,
    DropReason.ABORTED: grpc.StatusCode.ABORTED,
    DropReason.OVERSIZED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
