"""One connected client stream, as the round coordinator sees it.

The servicer owns the gRPC call; the coordinator only queues messages or a final status on the
session's outbox.  ``abort`` is idempotent: the first status wins and is what the client sees.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from secagg.v1 import secagg_pb2 as pb


@dataclass(frozen=True)
class Abort:
    code: grpc.StatusCode
    reason: str


_END = None


@dataclass(eq=False)
class Session:
    client_id: str
    identity: bytes                      # registered Ed25519 public key
    commitment: bytes = b""              # the hello's commitment to the client's round contribution
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    group: object | None = None          # the GroupRun it was assigned to
    index: int = 0                       # its index in that group
    closed: bool = False
    status: Abort | None = None

    def send(self, msg: pb.ServerMessage) -> None:
        if not self.closed:
            self.outbox.put_nowait(msg)

    def abort(self, code: grpc.StatusCode, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.status = Abort(code, reason)
            self.outbox.put_nowait(self.status)

    def finish(self) -> None:
        """End the stream with OK after what is queued."""
        if not self.closed:
            self.closed = True
            self.outbox.put_nowait(_END)
