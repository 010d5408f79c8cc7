"""The gRPC service: authenticates streams and moves messages; the coordinator does the rest."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.signatures import verify
from secagg.v1 import secagg_pb2 as pb
from secagg.v1 import secagg_pb2_grpc as pb_grpc
from secagg.wire import convert
from secagg.wire.identity import CLIENT_ID, NONCE_BYTES, READ_WINDOW_SECONDS, PKIError, certificate_binding, hello_message, read_message

from .budget import Privacy
from .config import ConfigError, ServerConfig
from .ledger import LedgerError, LedgerKeyError, default_key_path, open_for_server
from .ops import DatabaseLock, Metrics, add_health_and_reflection, check_extra, port_taken, set_serving
from .rounds import MAX_CLIENT_MESSAGE_BYTES, MAX_PREAUTH_MESSAGE_BYTES, AlreadyConnected, BudgetExhausted, Coordinator
from .session import Abort, Session
from .store import Store, StoreError

log = logging.getLogger("secagg.server")

MAX_MESSAGE_BYTES = 12 << 20   # gRPC's hard limit; the handlers refuse above 64 KiB before the hello and 8 MiB after
MODEL_CHUNK_VALUES = 1 << 17   # 1 MiB of float64 per chunk
SERVER_VERSION = "secagg/0.1"


class SecAggServicer(pb_grpc.SecAggServicer):
    def __init__(self, coordinator: Coordinator, store: Store, binding: bytes) -> None:
        """``binding``: SHA-256 of this server's certificate, which every signed hello and read must name."""
        self.coordinator = coordinator
        self.store = store
        self.binding = binding
        self._recent_reads: dict[bytes, float] = {}   # signature -> expiry: a signed read is used once

    async def _authorize_read(self, auth: pb.ReadAuth, method: str, argument: int, context: grpc.aio.ServicerContext) -> None:
        """Reads need a registered identity unless the operator allows public reads."""
        if self.coordinator.cfg.public_reads:
            return
        if not auth.client_id:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{method} needs a signed request from a registered client (the server does not allow public reads)")
        if not CLIENT_ID.fullmatch(auth.client_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "client_id must match [A-Za-z0-9._-]{1,64}")
        now = time.time()
        if abs(auth.timestamp_ms / 1000 - now) > READ_WINDOW_SECONDS:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"signed {method} request is older or newer than {READ_WINDOW_SECONDS:g} s; check the client's clock")
        if auth.server_binding != self.binding:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method} request is bound to another server's certificate")
        identity = await asyncio.to_thread(self.store.identity, auth.client_id)
        try:
            if identity is None:
                raise RemoteProtocolError("unregistered")
            verify(identity, auth.signature, read_message(method, self.binding, auth.client_id, auth.timestamp_ms, argument))
        except RemoteProtocolError:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{method} request is not signed by a registered client's identity key")
        self._recent_reads = {sig: t for sig, t in self._recent_reads.items() if t > now}
        if auth.signature in self._recent_reads:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"replayed {method} request; sign a fresh one")
        self._recent_reads[auth.signature] = now + 2 * READ_WINDOW_SECONDS

    async def Participate(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        cfg = self.coordinator.cfg
        nonce = secrets.token_bytes(NONCE_BYTES)
        await context.write(pb.ServerMessage(challenge=pb.Challenge(nonce=nonce, server_version=SERVER_VERSION, dim=cfg.dim)))
        try:
            data = await asyncio.wait_for(context.read(), cfg.phase_seconds)
        except TimeoutError:
            await self._refuse(context, None, grpc.StatusCode.DEADLINE_EXCEEDED, f"no hello within {cfg.phase_seconds:g} s")
        if data is grpc.aio.EOF:
            return
        first, problem = _parse(pb.ClientMessage, data, MAX_PREAUTH_MESSAGE_BYTES, "the first message (a hello)")
        if problem is not None:
            await self._refuse(context, None, *problem)
        if first.WhichOneof("body") != "hello":
            await self._refuse(context, None, grpc.StatusCode.FAILED_PRECONDITION, "the first message on a stream must be hello")
        hello = first.hello
        if not CLIENT_ID.fullmatch(hello.client_id):
            await self._refuse(context, None, grpc.StatusCode.INVALID_ARGUMENT, "client_id must match [A-Za-z0-9._-]{1,64}")
        if len(hello.contribution_commitment) != 32:
            await self._refuse(context, hello.client_id, grpc.StatusCode.INVALID_ARGUMENT,
                               "hello needs a 32-byte contribution_commitment (upgrade the client library)")
        identity = self.store.identity(hello.client_id)
        if identity is None:
            await self._refuse(context, hello.client_id, grpc.StatusCode.UNAUTHENTICATED,
                               f"client {hello.client_id!r} is not registered; an operator registers it with "
                               "`secagg register --db DB --client-id ID --key KEY`")
        if hello.server_binding != self.binding:
            await self._refuse(context, hello.client_id, grpc.StatusCode.UNAUTHENTICATED,
                               "hello is bound to another server's certificate (relayed, or the client saw a different "
                               "certificate); connect to this server directly")
        try:
            verify(identity, hello.signature, hello_message(nonce, hello.client_id, self.binding, hello.contribution_commitment))
        except RemoteProtocolError:
            await self._refuse(context, hello.client_id, grpc.StatusCode.UNAUTHENTICATED,
                               f"hello signature does not verify with {hello.client_id!r}'s registered identity key")
        session = Session(hello.client_id, identity, commitment=bytes(hello.contribution_commitment))
        try:
            self.coordinator.connect(session)
        except AlreadyConnected:
            await self._refuse(context, hello.client_id, grpc.StatusCode.ALREADY_EXISTS,
                               f"client {hello.client_id!r} already has an open stream; one stream per client")
        reader = asyncio.create_task(self._read(session, context))
        detail = "stream closed"
        try:
            while True:
                item = await session.outbox.get()
                if item is None:
                    return
                if isinstance(item, Abort):
                    detail = item.reason
                    await context.abort(item.code, item.reason)
                await context.write(item)
        except asyncio.CancelledError:
            detail = "stream cancelled by the client"
            raise
        finally:
            reader.cancel()
            self.coordinator.disconnect(session, detail)

    async def _refuse(self, context: grpc.aio.ServicerContext, client_id: str | None, code: grpc.StatusCode, reason: str) -> None:
        """Before authentication: recorded and logged through the coordinator's rate limit, then the status."""
        self.coordinator.preauth(client_id, code.name, reason)
        await context.abort(code, reason)

    async def _read(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        detail = "stream closed by the client"
        try:
            while not session.closed:
                data = await context.read()
                if data is grpc.aio.EOF:
                    if not context.peer() and not _deadline_expired(context):
                        # gRPC ended the call itself (the peer is gone from the call, the client did not cancel):
                        # what a message over its transport limit does; it answered RESOURCE_EXHAUSTED
                        self.coordinator.reject(session, DropReason.OVERSIZED,
                                                f"gRPC refused a message over its {MAX_MESSAGE_BYTES} byte transport limit "
                                                f"(the round limit is {MAX_CLIENT_MESSAGE_BYTES}); send smaller chunks")
                    break
                t0 = time.thread_time()
                view = convert.masked_chunk_view(data) if isinstance(data, bytes) and len(data) <= MAX_CLIENT_MESSAGE_BYTES else None
                msg, problem = (view, None) if view is not None else _parse(pb.ClientMessage, data, MAX_CLIENT_MESSAGE_BYTES, "a round message")
                parsed = time.thread_time() - t0
                if problem is not None:
                    code, reason = problem
                    why = DropReason.OVERSIZED if code is grpc.StatusCode.RESOURCE_EXHAUSTED else DropReason.MALFORMED
                    self.coordinator.reject(session, why, reason)
                    break
                await self.coordinator.handle(session, msg, len(data) if isinstance(data, bytes) else None, parsed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if session.closed:   # the server ended the stream (a rejection, a timeout, shutdown): nothing new to record
                return
            detail = f"broken stream ({type(exc).__name__})"
        self.coordinator.disconnect(session, detail)

    async def GetModel(self, data: bytes | pb.GetModelRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        request, problem = _parse(pb.GetModelRequest, data, MAX_PREAUTH_MESSAGE_BYTES, "a GetModel request")
        if problem is not None:
            await self._refuse(context, None, *problem)
        await self._authorize_read(request.auth, "GetModel", request.version, context)
        if request.version > MAX_MODEL_VERSION:   # SQLite integers are signed 64-bit
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model version {request.version}")
        try:
            mv = await asyncio.to_thread(self.store.model, request.version or None)
        except (StoreError, OverflowError) as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        values = np.ascontiguousarray(mv.params, dtype="<f8").ravel()
        digest = hashlib.sha256(values.tobytes()).hexdigest()   # over exactly the bytes we send
        for start in range(0, max(values.size, 1), MODEL_CHUNK_VALUES):
            part = values[start : start + MODEL_CHUNK_VALUES]
            yield pb.ModelChunk(version=mv.version, dim=values.size, offset=start, values=part.tobytes(),
                                digest=digest if start == 0 else "")

    async def GetStatus(self, data: bytes | pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:  # noqa: N802
        request, problem = _parse(pb.StatusRequest, data, MAX_PREAUTH_MESSAGE_BYTES, "a GetStatus request")
        if problem is not None:
            await self._refuse(context, None, *problem)
        await self._authorize_read(request.auth, "GetStatus", 0, context)
        c = self.coordinator
        return pb.StatusReply(model_version=self.store.latest_version() or 0, waiting_clients=len(c.lobby),
                              round_id=c.round_id, phase=c.phase, dim=c.cfg.dim)


MAX_MODEL_VERSION = (1 << 63) - 1


def _deadline_expired(context: grpc.aio.ServicerContext) -> bool:
    left = context.time_remaining()
    return left is not None and left <= 0


def _parse(cls: type, data: Any, limit: int, what: str) -> tuple[Any, tuple[grpc.StatusCode, str] | None]:
    """Bytes off the wire -> ``cls``, or (None, (status, reason)): over ``limit`` bytes is refused unparsed."""
    if isinstance(data, cls):
        return data, None
    if len(data) > limit:
        return None, (grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"{what} of {len(data)} bytes exceeds the {limit} byte limit; send smaller messages")
    try:
        return cls.FromString(data), None
    except DecodeError:
        return None, (grpc.StatusCode.INVALID_ARGUMENT,
                      f"unreadable message: {what} does not parse as {cls.DESCRIPTOR.full_name}; send well-formed secagg.v1 messages")


def add_servicer(servicer: SecAggServicer, server: grpc.aio.Server) -> None:
    """Like the generated ``add_SecAggServicer_to_server``, but requests reach the servicer as bytes, so
    a message that does not parse or is too large gets a precise status instead of gRPC's UNKNOWN
    and a logged traceback."""
    handlers = {
        "Participate": grpc.stream_stream_rpc_method_handler(servicer.Participate, request_deserializer=None,
                                                             response_serializer=pb.ServerMessage.SerializeToString),
        "GetModel": grpc.unary_stream_rpc_method_handler(servicer.GetModel, request_deserializer=None,
                                                         response_serializer=pb.ModelChunk.SerializeToString),
        "GetStatus": grpc.unary_unary_rpc_method_handler(servicer.GetStatus, request_deserializer=None,
                                                         response_serializer=pb.StatusReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("secagg.v1.SecAgg", handlers),))
    server.add_registered_method_handlers("secagg.v1.SecAgg", handlers)


@dataclass
class RunningServer:
    """A started server (see ``start``): ``port`` it listens on, ``task`` running the rounds (done once
    ``cfg.rounds`` rounds have run), ``stop()`` to shut it down."""

    server: grpc.aio.Server
    port: int
    coordinator: Coordinator
    store: Store
    task: asyncio.Task
    lock: DatabaseLock | None = None     # held until stop(): no second server on this database
    health: Any = None                   # the grpc.health.v1 servicer
    metrics: Metrics | None = None       # with cfg.metrics_port
    metrics_port: int | None = None      # where /metrics is served (None: off)

    async def wait(self) -> None:
        """Until the round loop ends (after ``cfg.rounds`` rounds and ``linger_seconds``)."""
        await asyncio.shield(self.task)

    async def stop(self, grace: float = 1.0) -> None:
        self.task.cancel()
        if self.health is not None:
            await self.health.enter_graceful_shutdown()   # health checks say NOT_SERVING from here on
        await self.server.stop(grace)
        self.coordinator.preauth.flush()   # rejections still counted in the window reach the events table
        if self.metrics is not None:
            self.metrics.close()
        self.store.close()
        if self.lock is not None:
            self.lock.release()   # last: nothing of ours writes the database after this


def close_interrupted_rounds(store: Store) -> None:
    """Rounds still "running" in the database were cut short by a crash or kill: say so."""
    for rec in store.rounds(limit=1000):
        if rec.outcome == "running":
            store.finish_round(rec.round_id, "failed", error="the server stopped during the round (found at restart)")


def ensure_model(store: Store, cfg: ServerConfig) -> None:
    """The first version is the initial model (zeros or --init-model); later ones must match dim."""
    latest = store.latest_version()
    if latest is None:
        try:
            init = np.zeros(cfg.dim) if not cfg.init_model else np.load(cfg.init_model, allow_pickle=False).astype(np.float64).ravel()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load --init-model {cfg.init_model}: {exc}") from None
        if init.size != cfg.dim:
            raise ConfigError(f"initial model has {init.size} values but dim is {cfg.dim}")
        store.append_model(init, round_id=None, reason="initial model")
        return
    size = store.model(latest).params.size
    if size != cfg.dim:
        raise ConfigError(f"the database's model has {size} values but dim is {cfg.dim}; use the matching --dim or another --db")


def server_binding(cfg: ServerConfig) -> bytes:
    """SHA-256 of the certificate this server presents: what clients bind their hellos and reads to."""
    try:
        return certificate_binding(Path(cfg.tls_cert).read_bytes())
    except (OSError, PKIError) as exc:
        raise ConfigError(f"cannot read the TLS certificate {cfg.tls_cert}: {exc}") from None


def credentials(cfg: ServerConfig) -> grpc.ServerCredentials:
    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None

    pair = [(read(cfg.tls_key, "TLS key"), read(cfg.tls_cert, "TLS certificate"))]
    if cfg.client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=read(cfg.client_ca, "client CA"), require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


async def start(cfg: ServerConfig, *, on_round: Callable[[str], None] | None = None) -> RunningServer:
    """Start the service (TLS always) and the round loop in the running event loop; returns once it
    listens.  ``on_round(round_id)`` runs after each round.  Refuses (ConfigError, one line) a
    database another server holds and a port something else listens on.  See docs/operating.md."""
    cfg.validate()
    check_extra()
    taken = port_taken(cfg.address)   # before creating anything, and before gRPC tries (and logs lines of its own)
    if taken is not None:
        raise taken
    lock = DatabaseLock.acquire(cfg.db)   # before anything reads or writes the database
    store: Store | None = None
    server: grpc.aio.Server | None = None
    metrics: Metrics | None = None
    try:
        try:
            store = Store(cfg.db)
        except StoreError as exc:
            raise ConfigError(f"cannot open the database: {exc}") from None
        key_path = cfg.ledger_key or default_key_path(cfg.db)
        try:   # before any write: never extend a chain that does not verify
            summary = open_for_server(store, key_path)
        except (LedgerKeyError, StoreError) as exc:
            raise ConfigError(f"cannot open the ledger: {exc}") from None
        except LedgerError as exc:
            raise ConfigError(f"refusing to start: the ledger of {cfg.db} does not verify: {exc}") from None
        log.info("ledger of %s verified: %d entries, head %s", cfg.db, summary.entries, summary.head)
        close_interrupted_rounds(store)
        ensure_model(store, cfg)
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),   # gRPC's default lets a second server listen too and take half the clients
        ])
        coordinator = Coordinator(cfg, store)
        if cfg.noise_multiplier:
            coordinator.privacy = Privacy(cfg, store)
        add_servicer(SecAggServicer(coordinator, store, server_binding(cfg)), server)
        health = add_health_and_reflection(server)
        host = cfg.address.rpartition(":")[0]
        try:
            port = server.add_secure_port(cfg.address, credentials(cfg))
        except RuntimeError as exc:
            raise port_taken(cfg.address) or ConfigError(f"cannot listen on {cfg.address}: {exc}") from None
        if not port:
            raise ConfigError(f"cannot listen on {cfg.address}")
        if cfg.metrics_port is not None:
            metrics = Metrics(coordinator, store)
            coordinator.metrics = metrics
            metrics.serve(host, cfg.metrics_port)
        await server.start()
        await set_serving(health)
        lock.describe(address=f"{host}:{port}")
    except BaseException:
        if metrics is not None:
            metrics.close()
        if server is not None:
            await server.stop(None)
        if store is not None:
            store.close()
        lock.release()
        raise

    async def loop() -> None:
        while not cfg.rounds or coordinator.rounds_done < cfg.rounds:
            try:
                rid = await coordinator.run_round()
            except BudgetExhausted as exc:
                log.warning("no more rounds: %s", exc)
                break
            if metrics is not None:
                try:
                    metrics.observe_round(await asyncio.to_thread(store.round, rid))
                except Exception:  # metrics must never stop the rounds
                    log.exception("could not update the metrics for %s", rid)
            if on_round:
                on_round(rid)
        await asyncio.sleep(cfg.linger_seconds)  # let clients fetch the last model before we stop

    task = asyncio.create_task(loop())
    return RunningServer(server, port, coordinator, store, task, lock=lock, health=health, metrics=metrics,
                         metrics_port=metrics.port if metrics is not None else None)
