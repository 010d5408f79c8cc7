"""The library an app embeds: one call takes part in one secure-aggregation round.

    client = Client("server:50051", ca_cert="ca.pem", identity_key="alice.identity", client_id="alice")
    outcome = client.participate(update)          # a numpy vector; bounded, encoded, masked here

The update is bounded (L2 to B, coordinates to c) and fixed-point encoded as the round demands
before it is masked, so the server only ever receives masked words.  Connection set-up is
retried with exponential backoff; a round in progress is never retried (its keys are spent).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import inspect
import logging
import math
import os
import queue
import secrets
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from secagg.protocol.client import ClientMachine
from secagg.protocol.graph import commit_contribution
from secagg.protocol.policy import ClientPolicy, PolicyViolation
from secagg.protocol.encoding import EncodingParams, encode
from secagg.protocol.errors import AbortError, LocalProtocolError, RemoteProtocolError
from secagg.protocol.messages import Phase
from secagg.protocol.signatures import sign
from secagg.v1 import secagg_pb2 as pb
from secagg.v1 import secagg_pb2_grpc as pb_grpc
from secagg.wire import convert
from secagg.wire.identity import CLIENT_ID, PKIError, certificate_binding, hello_message, identity_public_key, load_identity_key, read_message

from .arrays import Layout, flatten
from .errors import ClientError, ConnectionFailed, CredentialsError, PolicyRefused, Rejected, RoundAborted, RoundFailed
from .tls import fetch_server_certificate, pem

log = logging.getLogger("secagg.client")
MAX_MESSAGE_BYTES = 8 << 20
EPOCHS_REMEMBERED = 64   # (server, epoch) member sets kept per client object, oldest dropped first
ABORT_LINGER_SECONDS = 0.5   # how long an abort waits for the server to close the stream before the call is cancelled


@dataclass(frozen=True)
class RoundInfo:
    """What the round announced; an update callable gets it to train against the right model."""

    round_id: str
    model_version: int
    dim: int                     # the update length the round expects
    group: int
    index: int
    members: int
    params: EncodingParams


# an update: a vector, arrays of any shapes (a list/tuple, e.g. Flower's NDArrays), anything with __array__
Update = object
UpdateSource = Update | Callable[[RoundInfo], "Update | Awaitable[Update]"]
TrainFn = Callable[[object, RoundInfo], "Update | Awaitable[Update]"]
Encoder = Callable[[np.ndarray, EncodingParams, int, bytes], np.ndarray]


@dataclass(frozen=True)
class RoundOutcome:
    round_id: str
    outcome: str                 # completed | failed | aborted
    reason: str
    model_version: int
    group_accepted: bool
    aggregate_digest: str
    model: np.ndarray | None = field(default=None, repr=False)
    bytes_sent: int = 0
    bytes_received: int = 0
    layout: Layout | None = field(default=None, repr=False)   # the shapes of the update we submitted

    @property
    def ok(self) -> bool:
        return self.outcome == "completed"

    def model_as(self, shapes: object = None) -> np.ndarray | list[np.ndarray] | tuple[np.ndarray, ...]:
        """The new model (``fetch_model=True``) cut into ``shapes``: a ``Layout``, a list of shapes,
        or example arrays; by default the shapes of the update we submitted."""
        if self.model is None:
            raise ClientError(f"round {self.round_id} has no model to shape: it {self.outcome}, or fetch_model was not set")
        layout = Layout.of(shapes) if shapes is not None else self.layout
        return self.model if layout is None else layout.unflatten(self.model)


class _NoRoundYet(ClientError):
    """The lobby wait ended without a round (``run`` keeps waiting)."""


def _read_bytes(value: bytes | str | os.PathLike[str] | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"cannot read {what} {value}: {exc.strerror}") from None


@dataclass
class ClientSettings:
    address: str
    ca_cert: bytes | str | os.PathLike[str]
    identity_key: bytes | str | os.PathLike[str] = field(repr=False)
    client_id: str
    client_cert: bytes | str | os.PathLike[str] | None = None
    client_key: bytes | str | os.PathLike[str] | None = field(default=None, repr=False)
    server_name: str | None = None           # TLS name override (e.g. "localhost")
    connect_timeout: float = 10.0
    retries: int = 3                         # connection attempts after the first (refused, timed out)
    backoff: float = 0.5                     # first retry delay, doubled each time (with jitter)
    wait_seconds: float = 300.0              # how long to wait in the lobby for a round
    policy: ClientPolicy = field(default_factory=ClientPolicy)   # what a round must satisfy (checked before any key exists)
    trusted_identities: Collection[bytes] | Mapping[str, bytes] | None = None   # keys, or client id -> key (pins seats); implies active mode
    randbytes: Callable[[int], bytes] = field(default=os.urandom, repr=False)


class AsyncClient:
    """asyncio form; use ``Client`` from synchronous code."""

    def __init__(self, address: str, *, ca_cert: bytes | str | os.PathLike[str], identity_key: bytes | str | os.PathLike[str],
                 client_id: str, **options: object) -> None:
        self.settings = ClientSettings(address, ca_cert, identity_key, client_id, **options)  # type: ignore[arg-type]
        if not CLIENT_ID.fullmatch(client_id):
            raise ClientError("client_id must match [A-Za-z0-9._-]{1,64}")
        s = self.settings
        for name in ("connect_timeout", "backoff", "wait_seconds"):
            value = getattr(s, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ClientError(f"{name} must be a positive number of seconds, got {value!r}")
        if isinstance(s.retries, bool) or not isinstance(s.retries, int) or s.retries < 0:
            raise ClientError(f"retries must be a non-negative integer, got {s.retries!r}")
        key = s.identity_key
        try:
            self._identity = key if isinstance(key, bytes) else load_identity_key(key)
            if isinstance(key, bytes):
                identity_public_key(key)   # 32 raw bytes, or a clear error now
        except (PKIError, ValueError) as exc:
            raise CredentialsError(str(exc)) from None
        for what, value in (("CA certificate", s.ca_cert), ("client key", s.client_key), ("client certificate", s.client_cert)):
            _read_bytes(value, what)   # unreadable files fail now, not at the first call
        self._channel: grpc.aio.Channel | None = None
        self._server_der: bytes | None = None
        self._last_read_ms = 0
        self._epoch_members: dict[tuple[bytes, int], tuple[str, ...]] = {}   # (server binding, epoch) -> our group's members
        if not isinstance(s.policy, ClientPolicy):
            raise ClientError("policy must be a secagg.client.ClientPolicy")

    def __repr__(self) -> str:
        return f"AsyncClient({self.settings.address!r}, client_id={self.settings.client_id!r})"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _connect(self) -> grpc.aio.Channel:
        """A ready channel.  Each attempt first opens one verified TLS connection of our own (it
        reads the server certificate we bind to, and names the cause of a failure); causes that
        retrying cannot fix fail at once, the others are retried with backoff and logged."""
        if self._channel is not None:
            return self._channel
        s = self.settings
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if s.server_name:
            options.append(("grpc.ssl_target_name_override", s.server_name))
        delay, cause = s.backoff, ""
        for attempt in range(s.retries + 1):
            try:
                await self.server_binding()
                assert self._server_der is not None
                pinned = grpc.ssl_channel_credentials(   # trust exactly the certificate we bind to, nothing else
                    root_certificates=pem(self._server_der), private_key=_read_bytes(s.client_key, "client key"),
                    certificate_chain=_read_bytes(s.client_cert, "client certificate"))
                channel = grpc.aio.secure_channel(s.address, pinned, options=options)
                try:
                    await asyncio.wait_for(channel.channel_ready(), s.connect_timeout)
                except (TimeoutError, grpc.aio.AioRpcError):
                    await channel.close()
                    self._server_der = None   # re-read the certificate next time (it may have been rotated)
                    raise ConnectionFailed(f"gRPC channel to {s.address} not ready within {s.connect_timeout:g} s "
                                           "(or it presented another certificate than the one we read)") from None
                self._channel = channel
                return channel
            except ConnectionFailed as exc:
                if not exc.retryable:
                    raise
                cause = str(exc)
            if attempt == s.retries:
                break
            wait = delay * (0.5 + secrets.SystemRandom().random())
            log.warning("%s (attempt %d of %d); retrying in %.1f s", cause, attempt + 1, s.retries + 1, wait)
            await asyncio.sleep(wait)
            delay *= 2
        raise ConnectionFailed(f"cannot reach {s.address} after {s.retries + 1} attempts: {cause}")

    async def server_binding(self) -> bytes:
        """SHA-256 of the certificate the server presents, read over our own verified TLS connection;
        hellos and reads are signed over it, and the gRPC channel is pinned to that certificate."""
        if self._server_der is None:
            s = self.settings
            self._server_der = await asyncio.to_thread(
                fetch_server_certificate, s.address, _read_bytes(s.ca_cert, "CA certificate") or b"", s.server_name,
                _read_bytes(s.client_cert, "client certificate"), _read_bytes(s.client_key, "client key"), s.connect_timeout)
        return certificate_binding(self._server_der)

    async def _read_auth(self, method: str, argument: int = 0) -> pb.ReadAuth:
        s = self.settings
        binding = await self.server_binding()
        # Ed25519 is deterministic and the server accepts each signature once: never reuse a timestamp.
        ts = self._last_read_ms = max(int(time.time() * 1000), self._last_read_ms + 1)
        sig = sign(self._identity, read_message(method, binding, s.client_id, ts, argument))
        return pb.ReadAuth(client_id=s.client_id, timestamp_ms=ts, server_binding=binding, signature=sig)

    async def get_model(self, version: int = 0, *, shapes: object = None) -> tuple[int, object]:
        """Download a model version (0: the latest); signed, size-bounded, SHA-256 and version checked.
        With ``shapes`` (a ``Layout``, a list of shapes, or example arrays) the model comes back in them."""
        ver, values = await self._download(version)
        return ver, values if shapes is None else Layout.of(shapes).unflatten(values)

    async def _download(self, version: int) -> tuple[int, np.ndarray]:
        stub = pb_grpc.SecAggStub(await self._connect())
        request = pb.GetModelRequest(version=version, auth=await self._read_auth("GetModel", version))
        parts, ver, dim, digest, got = [], 0, 0, "", 0
        limit = self.settings.policy.max_dim
        call = stub.GetModel(request, timeout=self.settings.wait_seconds)
        try:
            async for chunk in call:
                if not parts:
                    ver, dim, digest = chunk.version, chunk.dim, chunk.digest
                    if dim > limit:
                        raise ClientError(f"model v{ver} announces {dim} values, more than this client's max_dim {limit}")
                    if version and ver != version:
                        raise ClientError(f"asked for model v{version}, the server sent v{ver}")
                if chunk.offset != got or len(chunk.values) % 8:
                    raise ClientError(f"model v{ver} arrived out of order or in ragged chunks; download it again")
                got += len(chunk.values) // 8
                if got > dim:
                    raise ClientError(f"model v{ver} sent more than its announced {dim} values")
                parts.append(np.frombuffer(chunk.values, dtype="<f8"))
        except grpc.aio.AioRpcError as exc:
            raise Rejected(exc.code().name, exc.details() or "") from None
        finally:
            call.cancel()   # a refused download must not stay open with the server still sending
        values = np.concatenate(parts) if parts else np.zeros(0)
        if values.size != dim:
            raise ClientError(f"model v{ver} arrived with {values.size} of {dim} values")
        if hashlib.sha256(values.astype("<f8").tobytes()).hexdigest() != digest:
            raise ClientError(f"model v{ver} failed its SHA-256 check; download it again")
        if not np.all(np.isfinite(values)):
            raise ClientError(f"model v{ver} contains NaN or infinity; refusing it")
        return ver, values.astype(np.float64)

    async def status(self) -> pb.StatusReply:
        stub = pb_grpc.SecAggStub(await self._connect())
        try:
            return await stub.GetStatus(pb.StatusRequest(auth=await self._read_auth("GetStatus")), timeout=self.settings.connect_timeout)
        except grpc.aio.AioRpcError as exc:
            raise Rejected(exc.code().name, exc.details() or "") from None

    async def participate(self, update: UpdateSource, *, on_phase: Callable[[Phase], None] | None = None,
                          fetch_model: bool = False, rounding_seed: bytes | None = None,
                          encoder: Encoder | None = None, lazy: bool = False,
                          vector_slots: asyncio.Semaphore | None = None) -> RoundOutcome:
        """Take part in the next round with ``update``; returns when the round has ended.

        ``update`` is a vector, or a callable given the ``RoundInfo`` once the round is announced
        (sync or async; train against ``info.model_version`` there).  ``on_phase(phase)`` runs
        before each message we send (progress display; raising from it abandons the round, which
        the server sees as a dropout).  ``rounding_seed`` fixes the stochastic rounding
        (simulations); by default it is fresh randomness.  ``encoder`` replaces bounding and
        encoding: for attack simulations only, since the server must never trust a client's
        library anyway.

        ``lazy``: call the update callable only when the masked input is due (after the key
        phases), and let go of the vector once it is sent, so no D-vector is held through the
        key phases.  ``vector_slots`` (implies ``lazy``): a semaphore shared by the clients of
        one process; a client holds one of its slots from building its vector until the last
        chunk is written, so a process running many clients holds at most that many vectors.
        """
        lazy = lazy or vector_slots is not None
        self._layout: Layout | None = None
        if isinstance(update, np.ndarray) or not callable(update):
            update = self._check_update(update)
        stub = pb_grpc.SecAggStub(await self._connect())
        call = stub.Participate()
        self._sent = self._received = 0
        try:
            return await self._run(call, update, on_phase, fetch_model, rounding_seed, encoder, lazy, vector_slots)
        except grpc.aio.AioRpcError as exc:
            raise Rejected(exc.code().name, exc.details() or "") from None
        finally:
            call.cancel()
            # let the cancelled call finish on this loop: a gRPC completion arriving after the loop
            # has closed is what printed "Event loop is closed" tracebacks from another loop
            try:
                await asyncio.wait_for(asyncio.shield(call.code()), 2.0)
            except (Exception, asyncio.CancelledError):  # noqa: BLE001 - best effort; the call is cancelled either way
                pass

    async def run(self, train_fn: TrainFn, rounds: int | None = None, *, shapes: object = None,
                  on_round: Callable[[RoundOutcome], None] | None = None, **options: object) -> list[RoundOutcome]:
        """Take part in round after round: for each, download the announced model (in ``shapes``,
        when given), call ``train_fn(model, info)`` for the update and submit it.  Returns the
        outcomes after ``rounds`` rounds (``None``: until cancelled).  A round that fails or is
        aborted is logged and the next one joined; waiting longer than ``wait_seconds`` for a
        round just keeps waiting.  ``options`` go to ``participate`` (``on_phase``, ``fetch_model``...)."""
        layout = None if shapes is None else Layout.of(shapes)
        if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
            raise ClientError(f"rounds must be a positive integer or None, got {rounds!r}")

        async def update(info: RoundInfo) -> object:
            _, model = await self.get_model(info.model_version)
            if layout is not None:
                if layout.size != model.size:
                    raise ClientError(f"the model has {model.size} values, the shapes given to run() hold {layout.size}")
                model = layout.unflatten(model)
            produced = train_fn(model, info)
            return await produced if inspect.isawaitable(produced) else produced

        outcomes: list[RoundOutcome] = []
        while rounds is None or len(outcomes) < rounds:
            try:
                out = await self.participate(update, **options)  # type: ignore[arg-type]
            except _NoRoundYet:
                log.info("%s: no round yet; still waiting", self.settings.client_id)
                continue
            except PolicyRefused:
                raise   # the server's settings; every round would be refused the same way
            except (RoundAborted, RoundFailed) as exc:
                log.warning("%s: round abandoned (%s); joining the next one", self.settings.client_id, exc)
                out = RoundOutcome("", "aborted", str(exc), 0, False, "")
            except Rejected as exc:
                if exc.code not in ("DEADLINE_EXCEEDED", "ABORTED", "UNAVAILABLE"):
                    raise
                log.warning("%s: round ended for us (%s); joining the next one", self.settings.client_id, exc)
                out = RoundOutcome("", "aborted", str(exc), 0, False, "")
            else:
                if out.ok:
                    log.info("%s: round %s completed; model v%d", self.settings.client_id, out.round_id, out.model_version)
                else:
                    log.warning("%s: round %s %s (%s); joining the next one", self.settings.client_id, out.round_id, out.outcome,
                                out.reason)
            outcomes.append(out)
            if on_round is not None:
                on_round(out)
        return outcomes

    def _trust_anchors(self, member_ids: Collection[str]) -> tuple[frozenset[bytes] | None, dict[int, bytes] | None]:
        """The app's trusted keys (our own included), or seat -> key pins from a client id -> key map."""
        trusted, own = self.settings.trusted_identities, identity_public_key(self._identity)
        if trusted is None:
            return None, None
        if isinstance(trusted, Mapping):
            keys = {**trusted, self.settings.client_id: own}
            return None, {i + 1: keys[mid] for i, mid in enumerate(member_ids) if mid in keys}
        return frozenset(trusted) | {own}, None

    def _check_update(self, update: object) -> np.ndarray:
        """The update as one float64 vector (any shapes, a list of arrays, anything with __array__);
        its layout is kept so the outcome can give the model back in the same shapes."""
        x, self._layout = flatten(update)
        if not np.all(np.isfinite(x)):
            raise ClientError("update contains NaN or infinity; fix the training step before submitting")
        return x

    async def _write(self, call: grpc.aio.StreamStreamCall, msg: pb.ClientMessage) -> None:
        self._sent += msg.ByteSize()
        try:
            await call.write(msg)
        except asyncio.InvalidStateError:   # the server already ended the call: say why, as a read would
            code = await call.code()
            raise Rejected(code.name, (await call.details()) or "the server ended the stream") from None

    async def _abort(self, call: grpc.aio.StreamStreamCall, reason: str) -> None:
        """Tell the server why we leave and let the message reach it: half-close, then give the server
        a moment to end the stream, since cancelling at once can drop the abort still in flight."""
        try:
            await self._write(call, pb.ClientMessage(abort=pb.ClientAbort(reason=reason[:200])))
            await call.done_writing()
            await asyncio.wait_for(asyncio.shield(call.code()), ABORT_LINGER_SECONDS)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError, Rejected):
            pass   # the server is gone or slow; the call is cancelled next either way

    async def _read(self, call: grpc.aio.StreamStreamCall, timeout: float, waiting_for: str) -> pb.ServerMessage:
        # not wait_for(call.read()): a read abandoned by a timeout stays pending in gRPC's core, and
        # its completion, arriving after this loop has closed, was an "Event loop is closed" traceback
        read = asyncio.ensure_future(call.read())
        try:
            done, _ = await asyncio.wait({read}, timeout=timeout)
        finally:
            if not read.done():
                call.cancel()   # fails the pending read at once; wait for it here, on this loop
                await asyncio.wait({read}, timeout=2.0)
                if read.done() and not read.cancelled():
                    read.exception()   # retrieved: a cancelled read's error is expected
        if not done:
            error = _NoRoundYet if waiting_for == "round configuration" else ClientError
            raise error(f"no {waiting_for} from the server within {timeout:g} s")
        msg = read.result()
        if msg is grpc.aio.EOF:
            code = await call.code()
            raise Rejected(code.name, (await call.details()) or "stream ended") from None
        self._received += msg.ByteSize()
        return msg

    async def _produce(self, call: grpc.aio.StreamStreamCall, update: UpdateSource, info: RoundInfo) -> np.ndarray:
        """The round's update vector: ``update`` itself or what its callable returns for ``info``;
        a wrong length is refused (and the server told) before anything is masked."""
        if not isinstance(update, np.ndarray):
            produced = update(info)  # type: ignore[operator]
            if inspect.isawaitable(produced):
                produced = await produced
            update = self._check_update(produced)
        if update.size != info.dim:
            await self._abort(call, f"update has {update.size} values, round needs {info.dim}")
            raise ClientError(f"update has {update.size} values but round {info.round_id} needs {info.dim}")
        return update

    async def _run(self, call: grpc.aio.StreamStreamCall, update: UpdateSource, on_phase: Callable[[Phase], None] | None,
                   fetch_model: bool, rounding_seed: bytes | None, encoder: Encoder | None, lazy: bool = False,
                   vector_slots: asyncio.Semaphore | None = None) -> RoundOutcome:
        s = self.settings
        binding = await self.server_binding()
        contribution = s.randbytes(32)            # fresh this round: fixes our ring position and the config digest
        first = await self._read(call, s.connect_timeout, "challenge")
        if first.WhichOneof("body") != "challenge":
            raise ClientError("server did not start with a challenge; is this a secagg server?")
        announced = first.challenge.dim   # the model's length (0: an older server that does not say)
        if isinstance(update, np.ndarray) and announced and update.size != announced:   # refuse before taking a seat
            raise ClientError(f"update has {update.size} values but the server's model needs {announced}; "
                              "not joining (a wrong-length update would only be dropped from the round)")
        commitment = commit_contribution(contribution)
        await self._write(call, pb.ClientMessage(hello=pb.Hello(
            client_id=s.client_id, library_version="secagg/0.1", server_binding=binding, contribution_commitment=commitment,
            signature=sign(self._identity, hello_message(first.challenge.nonce, s.client_id, binding, commitment)))))
        msg = await self._read(call, s.wait_seconds, "round configuration")
        if msg.WhichOneof("body") != "round_config":
            raise ClientError(f"expected the round configuration, got {msg.WhichOneof('body')}")
        rc = msg.round_config
        try:
            cfg = convert.group_config_from_pb(rc)
            s.policy.check(cfg, pinned=s.trusted_identities is not None)   # before any key, graph or vector exists
            s.policy.check_chunking(rc.chunk_words)
            params = convert.encoding_from_pb(rc.encoding)
            if cfg.member_ids[rc.index - 1] != s.client_id:
                raise AbortError(f"the round configuration seats {cfg.member_ids[rc.index - 1]!r} where we are; refusing")
            s.policy.check_grouping(rc.grouping, rc.epoch, rc.member_ids, self._epoch_members.get((binding, rc.epoch)))
            self._epoch_members[(binding, rc.epoch)] = tuple(sorted(rc.member_ids))
            while len(self._epoch_members) > EPOCHS_REMEMBERED:
                del self._epoch_members[next(iter(self._epoch_members))]
        except (convert.WireError, AbortError) as exc:
            await self._abort(call, str(exc))
            if isinstance(exc, PolicyViolation):
                raise PolicyRefused(exc.setting, exc.offered, exc.required, str(exc)) from None
            raise RoundAborted(str(exc)) from None
        try:   # the seat, our commitment and the identities are checked before any training is spent on the round
            trusted, pinned = self._trust_anchors(rc.member_ids)
            machine = ClientMachine(cfg, rc.index, contribution=contribution, identity_key=self._identity, trusted_identities=trusted,
                                    pinned_identities=pinned, policy=s.policy, randbytes=s.randbytes)
        except (AbortError, LocalProtocolError) as exc:
            await self._abort(call, str(exc))
            raise RoundAborted(str(exc)) from None
        info = RoundInfo(rc.round_id, rc.model_version, cfg.dim - 2, rc.group, rc.index, cfg.members, params)
        if not lazy:
            update = await self._produce(call, update, info)
        # a phase may take the server's deadline three times over, never longer than we wait for a round
        timeout = min(max(rc.phase_timeout_seconds, 1.0) * 3, s.wait_seconds)
        try:
            seed = rounding_seed or s.randbytes(32)

            def encoded_input(vector: np.ndarray) -> np.ndarray:
                return encoder(vector, params, cfg.members, seed) if encoder else encode(vector, params, cfg.members, rounding_seed=seed)

            encoded = None if lazy else encoded_input(update)  # type: ignore[arg-type]

            def step(phase: Phase) -> None:
                if on_phase is not None:
                    on_phase(phase)

            step(Phase.ADVERTISE_KEYS)
            await self._write(call, convert.advertise_to_pb(machine.advertise_keys()))
            while True:
                msg = await self._read(call, timeout, "next phase message")
                kind = msg.WhichOneof("body")
                if kind == "keys_broadcast":
                    reply = machine.share_keys(convert.keys_broadcast_from_pb(msg.keys_broadcast))
                    step(Phase.SHARE_KEYS)
                    await self._write(call, convert.share_keys_to_pb(reply))
                elif kind == "shares_delivery":
                    async with vector_slots or contextlib.nullcontext():
                        if encoded is None:
                            encoded = encoded_input(await self._produce(call, update, info))
                        masked = machine.masked_input(convert.shares_delivery_from_pb(rc.index, msg.shares_delivery), encoded)
                        encoded = None
                        step(Phase.MASKED_INPUT)
                        for chunk in convert.masked_input_chunks(masked.vector, rc.chunk_words):
                            await self._write(call, chunk)
                        del masked   # sent: a lazy client holds no vector from here on
                elif kind == "consistency_request":
                    reply = machine.consistency_check(convert.consistency_request_from_pb(msg.consistency_request))
                    step(Phase.CONSISTENCY_CHECK)
                    await self._write(call, convert.consistency_signature_to_pb(reply))
                elif kind == "unmask_request":
                    reply = machine.unmask(convert.unmask_request_from_pb(msg.unmask_request))
                    step(Phase.UNMASKING)
                    await self._write(call, convert.unmask_response_to_pb(reply))
                elif kind == "result":
                    r = msg.result
                    break
                else:
                    raise ClientError(f"unexpected {kind} from the server")
        except (AbortError, RemoteProtocolError, LocalProtocolError, convert.WireError) as exc:
            await self._abort(call, str(exc))
            raise RoundAborted(str(exc)) from None
        model = None
        if fetch_model and r.outcome == "completed":
            _, model = await self._download(r.model_version)
        return RoundOutcome(r.round_id, r.outcome, r.reason, r.model_version, r.group_accepted, r.aggregate_digest, model,
                            self._sent, self._received, self._layout)


class _LoopThread:
    """One event loop in a daemon thread, alive as long as its Client: gRPC completions that
    arrive late still find their loop open (a closed loop printed "Event loop is closed")."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def stop(self, client: AsyncClient) -> None:
        """Close the client's channel, let its last completions arrive, then stop and close the loop."""
        if self.loop.is_closed():
            return

        async def finish() -> None:
            try:
                await client.close()
            finally:
                await asyncio.sleep(0.05)

        if threading.current_thread() is self.thread:   # collected on our own loop: cannot wait here
            self.loop.create_task(finish()).add_done_callback(lambda _: self.loop.stop())
            return
        if self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(finish(), self.loop).result(5.0)
            except Exception:  # noqa: BLE001, S110 - closing a broken channel is best effort
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5.0)
        if not self.loop.is_running():
            self.loop.close()


class Client:
    """Synchronous form, usable from any thread (and from a notebook, where a loop is running).

    Each Client keeps one connection and one event loop in a background thread until
    ``close()`` (or ``with Client(...) as c:``, or garbage collection); update callables and
    ``run``'s ``train_fn`` run in the calling thread.
    """

    def __init__(self, address: str, **kwargs: object) -> None:
        self._address, self._kwargs = address, kwargs
        self._client = AsyncClient(address, **kwargs)  # validates the arguments now  # type: ignore[arg-type]
        self._loop: _LoopThread | None = None
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None

    def __repr__(self) -> str:
        return f"Client({self._address!r}, client_id={self._kwargs.get('client_id')!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and stop the background loop (a later call starts them again)."""
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()
            self._loop = self._finalizer = None

    def _thread(self) -> _LoopThread:
        with self._lock:
            if self._loop is None:
                self._loop = _LoopThread(f"secagg-client-{self._kwargs.get('client_id')}")
                self._finalizer = weakref.finalize(self, self._loop.stop, self._client)
            return self._loop

    def _call(self, make: Callable[[Callable[..., Awaitable[object]]], Awaitable[object]]) -> object:
        """Run ``make(in_caller)`` on the background loop; ``in_caller(fn, *args)`` runs ``fn`` in
        this thread (user code: training), so this thread serves those requests while it waits.
        Ctrl-C (KeyboardInterrupt) cancels the coroutine, waits for its clean-up, and is re-raised."""
        lt = self._thread()
        jobs: queue.SimpleQueue[tuple[Callable[..., object], tuple[object, ...], concurrent.futures.Future[object]] | None] = queue.SimpleQueue()
        finished = threading.Event()

        async def in_caller(fn: Callable[..., object], *args: object) -> object:
            fut: concurrent.futures.Future[object] = concurrent.futures.Future()
            jobs.put((fn, args, fut))
            return await asyncio.wrap_future(fut)

        async def body() -> object:
            try:
                return await make(in_caller)
            finally:
                finished.set()
                jobs.put(None)

        future = asyncio.run_coroutine_threadsafe(body(), lt.loop)
        try:
            while True:
                job = jobs.get()
                if job is None:
                    break
                fn, args, fut = job
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(fn(*args))
                except Exception as exc:  # noqa: BLE001 - handed to the coroutine, which raises it to us
                    fut.set_exception(exc)
                except BaseException:
                    fut.cancel()
                    raise
            return future.result()
        except BaseException:   # KeyboardInterrupt, SystemExit: abandon the round cleanly, then re-raise
            future.cancel()
            finished.wait(10.0)
            raise

    def _sync_callable(self, fn: object, in_caller: Callable[..., Awaitable[object]]) -> object:
        if isinstance(fn, np.ndarray) or not callable(fn) or inspect.iscoroutinefunction(fn):
            return fn

        async def proxied(*args: object) -> object:
            produced = await in_caller(fn, *args)
            return await produced if inspect.isawaitable(produced) else produced

        return proxied

    def participate(self, update: UpdateSource, **kwargs: object) -> RoundOutcome:
        """``AsyncClient.participate``; a callable ``update`` runs in this thread."""
        return self._call(lambda in_caller: self._client.participate(  # type: ignore[return-value]
            self._sync_callable(update, in_caller), **kwargs))  # type: ignore[arg-type]

    def run(self, train_fn: TrainFn, rounds: int | None = None, **kwargs: object) -> list[RoundOutcome]:
        """``AsyncClient.run``: round after round, ``train_fn(model, info)`` in this thread; Ctrl-C stops it."""
        return self._call(lambda in_caller: self._client.run(  # type: ignore[return-value]
            self._sync_callable(train_fn, in_caller), rounds, **kwargs))  # type: ignore[arg-type]

    def get_model(self, version: int = 0, *, shapes: object = None) -> tuple[int, object]:
        return self._call(lambda _: self._client.get_model(version, shapes=shapes))  # type: ignore[return-value]

    def status(self) -> pb.StatusReply:
        return self._call(lambda _: self._client.status())  # type: ignore[return-value]

    def server_binding(self) -> bytes:
        return self._call(lambda _: self._client.server_binding())  # type: ignore[return-value]


__all__ = ["AsyncClient", "Client", "ClientPolicy", "Layout", "RoundInfo", "RoundOutcome", "RoundFailed"]
