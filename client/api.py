"""The library an app embeds: one call takes part in one secure-aggregation round.

    client = Client("server:50051", ca_cert="ca.pem", identity_key="alice.identity", client_id="alice")
    outcome = client.participate(update)          # a numpy vector; bounded, encoded, masked here

The update is bounded (L2 to B, coordinates to c) and fixed-point encoded as the round demands
before it is masked, so the server only ever receives masked words.  Connection set-up is
retried with exponential backoff; a round in progress is never retried (its keys are spent).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import math
import os
import secrets
import time
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

from .errors import ClientError, ConnectionFailed, CredentialsError, PolicyRefused, Rejected, RoundAborted, RoundFailed
from .tls import fetch_server_certificate, pem

log = logging.getLogger("secagg.client")
MAX_MESSAGE_BYTES = 8 << 20


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


UpdateSource = np.ndarray | Callable[[RoundInfo], "np.ndarray | Awaitable[np.ndarray]"]
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

    @property
    def ok(self) -> bool:
        return self.outcome == "completed"


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

    async def get_model(self, version: int = 0) -> tuple[int, np.ndarray]:
        """Download a model version (0: the latest); signed, size-bounded, SHA-256 and version checked."""
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
                          encoder: Encoder | None = None) -> RoundOutcome:
        """Take part in the next round with ``update``; returns when the round has ended.

        ``update`` is a vector, or a callable given the ``RoundInfo`` once the round is announced
        (sync or async; train against ``info.model_version`` there).  ``on_phase(phase)`` runs
        before each message we send (progress display; raising from it abandons the round, which
        the server sees as a dropout).  ``rounding_seed`` fixes the stochastic rounding
        (simulations); by default it is fresh randomness.  ``encoder`` replaces bounding and
        encoding: for attack simulations only, since the server must never trust a client's
        library anyway.
        """
        if isinstance(update, np.ndarray) or not callable(update):
            update = self._check_update(update)
        stub = pb_grpc.SecAggStub(await self._connect())
        call = stub.Participate()
        self._sent = self._received = 0
        try:
            return await self._run(call, update, on_phase, fetch_model, rounding_seed, encoder)
        except grpc.aio.AioRpcError as exc:
            raise Rejected(exc.code().name, exc.details() or "") from None
        finally:
            call.cancel()

    def _trust_anchors(self, member_ids: Collection[str]) -> tuple[frozenset[bytes] | None, dict[int, bytes] | None]:
        """The app's trusted keys (our own included), or seat -> key pins from a client id -> key map."""
        trusted, own = self.settings.trusted_identities, identity_public_key(self._identity)
        if trusted is None:
            return None, None
        if isinstance(trusted, Mapping):
            keys = {**trusted, self.settings.client_id: own}
            return None, {i + 1: keys[mid] for i, mid in enumerate(member_ids) if mid in keys}
        return frozenset(trusted) | {own}, None

    @staticmethod
    def _check_update(update: object) -> np.ndarray:
        x = np.asarray(update, dtype=np.float64).ravel()
        if not np.all(np.isfinite(x)):
            raise ClientError("update contains NaN or infinity; fix the training step before submitting")
        return x

    async def _write(self, call: grpc.aio.StreamStreamCall, msg: pb.ClientMessage) -> None:
        self._sent += msg.ByteSize()
        await call.write(msg)

    async def _read(self, call: grpc.aio.StreamStreamCall, timeout: float, waiting_for: str) -> pb.ServerMessage:
        try:
            msg = await asyncio.wait_for(call.read(), timeout)
        except TimeoutError:
            raise ClientError(f"no {waiting_for} from the server within {timeout:g} s") from None
        if msg is grpc.aio.EOF:
            code = await call.code()
            raise Rejected(code.name, (await call.details()) or "stream ended") from None
        self._received += msg.ByteSize()
        return msg

    async def _run(self, call: grpc.aio.StreamStreamCall, update: UpdateSource, on_phase: Callable[[Phase], None] | None,
                   fetch_model: bool, rounding_seed: bytes | None, encoder: Encoder | None) -> RoundOutcome:
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
        except (convert.WireError, AbortError) as exc:
            await self._write(call, pb.ClientMessage(abort=pb.ClientAbort(reason=str(exc)[:200])))
            if isinstance(exc, PolicyViolation):
                raise PolicyRefused(exc.setting, exc.offered, exc.required, str(exc)) from None
            raise RoundAborted(str(exc)) from None
        try:   # the seat, our commitment and the identities are checked before any training is spent on the round
            trusted, pinned = self._trust_anchors(rc.member_ids)
            machine = ClientMachine(cfg, rc.index, contribution=contribution, identity_key=self._identity, trusted_identities=trusted,
                                    pinned_identities=pinned, policy=s.policy, randbytes=s.randbytes)
        except (AbortError, LocalProtocolError) as exc:
            await self._write(call, pb.ClientMessage(abort=pb.ClientAbort(reason=str(exc)[:200])))
            raise RoundAborted(str(exc)) from None
        info = RoundInfo(rc.round_id, rc.model_version, cfg.dim - 2, rc.group, rc.index, cfg.members, params)
        if not isinstance(update, np.ndarray):
            produced = update(info)
            if inspect.isawaitable(produced):
                produced = await produced
            update = self._check_update(produced)
        if update.size != info.dim:
            await self._write(call, pb.ClientMessage(abort=pb.ClientAbort(reason=f"update has {update.size} values, round needs {info.dim}")))
            raise ClientError(f"update has {update.size} values but round {rc.round_id} needs {info.dim}")
        # a phase may take the server's deadline three times over, never longer than we wait for a round
        timeout = min(max(rc.phase_timeout_seconds, 1.0) * 3, s.wait_seconds)
        try:
            seed = rounding_seed or s.randbytes(32)
            encoded = encoder(update, params, cfg.members, seed) if encoder else encode(update, params, cfg.members, rounding_seed=seed)

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
                    masked = machine.masked_input(convert.shares_delivery_from_pb(rc.index, msg.shares_delivery), encoded)
                    step(Phase.MASKED_INPUT)
                    for chunk in convert.masked_input_chunks(masked.vector, rc.chunk_words):
                        await self._write(call, chunk)
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
            try:
                await call.write(pb.ClientMessage(abort=pb.ClientAbort(reason=str(exc))))
            except grpc.aio.AioRpcError:
                pass
            raise RoundAborted(str(exc)) from None
        model = None
        if fetch_model and r.outcome == "completed":
            _, model = await self.get_model(r.model_version)
        return RoundOutcome(r.round_id, r.outcome, r.reason, r.model_version, r.group_accepted, r.aggregate_digest, model,
                            self._sent, self._received)


class Client:
    """Synchronous form: each call runs its own event loop (do not use inside a running loop)."""

    def __init__(self, address: str, **kwargs: object) -> None:
        self._address, self._kwargs = address, kwargs
        AsyncClient(address, **kwargs)  # validate arguments now, not at the first call  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"Client({self._address!r}, client_id={self._kwargs.get('client_id')!r})"

    def _run(self, method: str, *args: object, **kwargs: object) -> object:
        async def go() -> object:
            async with AsyncClient(self._address, **self._kwargs) as c:  # type: ignore[arg-type]
                return await getattr(c, method)(*args, **kwargs)

        return asyncio.run(go())

    def participate(self, update: np.ndarray, **kwargs: object) -> RoundOutcome:
        return self._run("participate", update, **kwargs)  # type: ignore[return-value]

    def get_model(self, version: int = 0) -> tuple[int, np.ndarray]:
        return self._run("get_model", version)  # type: ignore[return-value]

    def status(self) -> pb.StatusReply:
        return self._run("status")  # type: ignore[return-value]


__all__ = ["AsyncClient", "Client", "ClientPolicy", "RoundInfo", "RoundOutcome", "RoundFailed"]
