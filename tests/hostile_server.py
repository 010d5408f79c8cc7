"""A hostile secagg server for tests: speaks secagg.v1 over real gRPC + TLS on loopback and
scripts its side of every RPC, so the REAL ``AsyncClient`` can be attacked end to end.

Imported by ``tests/test_hostile_server.py`` as a sibling module (like ``grpc_harness``).

``hostile_server(tmp_path)`` starts a ``HostileServer`` (a ``secagg_pb2_grpc.SecAggServicer``
on ``grpc.aio.server()`` with a dev certificate from ``write_dev_pki``).  A test sets
``server.participate`` to an ``async def script(stream: Stream)`` and/or ``server.get_model``
to an ``async def gen(request, tally)`` generator; every client message of every stream is
logged in ``server.received`` as it arrives, so a test can assert what the victim revealed.

``Group`` is the hostile server's view of one secure-aggregation group: the victim on the
wire, the other seats filled by in-process sybils (real ``ClientMachine``s with their own
identity keys and contributions), and a real ``ServerMachine`` to compute honest-looking
replies that the test can tamper with, phase by phase.

``Victim`` is one real ``AsyncClient`` with a known update, a recording randomness source
(every contribution, key seed, self-mask seed, polynomial coefficient and nonce it drew) and an
``on_phase`` witness of each message it decided to send; ``assert_no_secrets`` checks texts
(errors, logs, abort reasons) against all of it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from secagg.client import AsyncClient, ClientPolicy
from secagg.protocol import thresholds
from secagg.protocol.client import ClientMachine
from secagg.protocol.driver import deterministic_randbytes
from secagg.protocol.encoding import EncodingParams, encode
from secagg.protocol.graph import commit_contribution, recommended_degree
from secagg.protocol.messages import GroupConfig, MaskedInput, Mode, Phase
from secagg.protocol.server import ServerMachine
from secagg.server.tls import DevPKI, identity_public_key, write_dev_pki
from secagg.v1 import secagg_pb2 as pb
from secagg.v1 import secagg_pb2_grpc as pb_grpc
from secagg.wire import convert
from secagg.wire.identity import certificate_binding

STEP = 5.0          # seconds any single step of a script may take
UPDATE_DIM = 8      # the victim's update length (the round's dim is this + 2)


def h32(*parts: object) -> bytes:
    return hashlib.sha256("|".join(map(str, parts)).encode()).digest()


# ---- the fake server -----------------------------------------------------------------------
class VictimLeft(Exception):
    """The victim ended its stream (abort message, cancel or EOF) while the script expected more."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class Stream:
    """One Participate stream as the hostile server sees it."""

    context: grpc.aio.ServicerContext
    number: int
    received: list[pb.ClientMessage] = field(default_factory=list)    # this stream's client messages, in order
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    ended: asyncio.Event = field(default_factory=asyncio.Event)          # the client side is finished

    async def send(self, msg: pb.ServerMessage) -> None:
        await self.context.write(msg)

    async def challenge(self, nonce: bytes | None = None) -> pb.Hello:
        await self.send(pb.ServerMessage(challenge=pb.Challenge(nonce=nonce or h32("nonce", self.number), server_version="hostile/0")))
        return await self.expect("hello")

    async def next(self, timeout: float = STEP) -> pb.ClientMessage:
        msg = await asyncio.wait_for(self.queue.get(), timeout)
        if msg is None:
            raise VictimLeft("stream ended")
        if msg.WhichOneof("body") == "abort":
            raise VictimLeft(msg.abort.reason)
        return msg

    async def expect(self, kind: str, timeout: float = STEP) -> Any:
        msg = await self.next(timeout)
        if msg.WhichOneof("body") != kind:
            raise AssertionError(f"hostile server expected {kind}, the victim sent {msg.WhichOneof('body')}")
        return getattr(msg, kind)

    async def until_closed(self, timeout: float = STEP) -> list[pb.ClientMessage]:
        """Wait for the victim to leave; the messages it sent meanwhile (an abort included)."""
        out = []
        while True:
            msg = await asyncio.wait_for(self.queue.get(), timeout)
            if msg is None:
                return out
            out.append(msg)

    def kinds(self) -> list[str]:
        return [m.WhichOneof("body") for m in self.received]


Script = Callable[[Stream], Awaitable[None]]


@dataclass
class Tally:
    """What a GetModel script managed to hand to gRPC before the client went away."""

    yielded: int = 0
    finished: bool = False          # the generator ran to its end
    stopped_by: str = ""            # what ended it early: the RPC cancelled, or a send that failed as the client left
    done: asyncio.Event = field(default_factory=asyncio.Event)


class HostileServer(pb_grpc.SecAggServicer):
    def __init__(self, pki: DevPKI) -> None:
        self.pki = pki
        self.port = 0
        self.binding = certificate_binding(pki.server_cert.read_bytes())
        self.participate: Script | None = None
        self.get_model: Callable[[pb.GetModelRequest, Tally], AsyncIterator[pb.ModelChunk]] | None = None
        self.streams: list[Stream] = []
        self.tallies: list[Tally] = []
        self.errors: list[BaseException] = []      # exceptions raised inside scripts (a test asserts it is empty)
        self.model_requests: list[pb.GetModelRequest] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def received(self) -> list[pb.ClientMessage]:
        return [m for s in self.streams for m in s.received]

    def kinds(self) -> list[str]:
        return [m.WhichOneof("body") for m in self.received]

    async def Participate(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        stream = Stream(context, len(self.streams))
        self.streams.append(stream)

        async def reader() -> None:
            try:
                while True:
                    msg = await context.read()
                    if msg is grpc.aio.EOF:
                        break
                    stream.received.append(msg)
                    stream.queue.put_nowait(msg)
            except BaseException:   # cancelled or broken: the client is gone
                pass
            finally:
                stream.queue.put_nowait(None)
                stream.ended.set()

        task = asyncio.create_task(reader())
        try:
            assert self.participate is not None, "no Participate script set"
            await self.participate(stream)
        except VictimLeft:
            pass
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except BaseException as exc:   # noqa: BLE001 - surfaced by the test through server.errors
            self.errors.append(exc)
        finally:
            # Let the reader log anything already on the wire before the RPC is torn down.
            try:
                await asyncio.wait_for(stream.ended.wait(), 0.5)
            except TimeoutError:
                pass
            task.cancel()

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        self.model_requests.append(request)
        tally = Tally()
        self.tallies.append(tally)
        assert self.get_model is not None, "no GetModel script set"
        try:
            async for chunk in self.get_model(request, tally):
                yield chunk
                tally.yielded += 1
            tally.finished = True
        except BaseException as exc:
            tally.stopped_by = type(exc).__name__
            raise
        finally:
            tally.done.set()

    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:  # noqa: N802
        return pb.StatusReply(model_version=1, dim=UPDATE_DIM)


@asynccontextmanager
async def hostile_server(tmp_path: Path, *, pki: DevPKI | None = None, name: str = "hostile-pki") -> AsyncIterator[HostileServer]:
    """A HostileServer on 127.0.0.1:0 with TLS (its own dev PKI unless ``pki`` is given)."""
    pki = pki or write_dev_pki(tmp_path / name)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
    servicer = HostileServer(pki)
    pb_grpc.add_SecAggServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials([(pki.server_key.read_bytes(), pki.server_cert.read_bytes())])
    servicer.port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield servicer
    finally:
        await server.stop(0)


# ---- the victim ----------------------------------------------------------------------------
class RecordingRandom:
    """A deterministic randomness source that remembers every value it handed out."""

    def __init__(self, seed: bytes) -> None:
        self._source = deterministic_randbytes(seed)
        self.drawn: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        out = self._source(n)
        self.drawn.append(out)
        return out


@dataclass
class Victim:
    client: AsyncClient
    client_id: str
    key: bytes
    rand: RecordingRandom
    update: np.ndarray
    phases: list[Phase] = field(default_factory=list)

    @property
    def public(self) -> bytes:
        return identity_public_key(self.key)

    def on_phase(self, phase: Phase) -> None:
        self.phases.append(phase)

    async def participate(self, timeout: float = 15.0, **kwargs: Any) -> Any:
        kwargs.setdefault("on_phase", self.on_phase)
        kwargs.setdefault("rounding_seed", h32("rounding", self.client_id))
        return await asyncio.wait_for(self.client.participate(kwargs.pop("update", self.update), **kwargs), timeout)

    def secrets(self) -> list[bytes]:
        """Everything secret the victim holds: its identity key and every random value it drew."""
        return [self.key, *(b for b in self.rand.drawn if len(b) >= 8)]


def victim_update(dim: int = UPDATE_DIM) -> np.ndarray:
    """Distinctive values (norm about 0.5, well inside the default bound) easy to spot in text."""
    rng = np.random.default_rng(20261202)
    return rng.uniform(0.1, 0.2, dim) * rng.choice([-1.0, 1.0], dim)


def make_victim(address: str, ca_cert: Path | bytes, key: bytes, client_id: str = "victim", *, seed: bytes | None = None,
                update: np.ndarray | None = None, **options: Any) -> Victim:
    rand = RecordingRandom(seed or h32("victim-rand", client_id))
    options.setdefault("connect_timeout", 3.0)
    options.setdefault("wait_seconds", 5.0)
    client = AsyncClient(address, ca_cert=ca_cert, identity_key=key, client_id=client_id, retries=0, randbytes=rand, **options)
    return Victim(client, client_id, key, rand, victim_update() if update is None else update)


def _significant(x: float, digits: int = 6) -> str:
    """The first ``digits`` significant digits of |x| as positional text (truncated): '0.137913'."""
    s = np.format_float_positional(abs(float(x)), precision=16, unique=False, trim="-")
    lead = len(s) - len(s.lstrip("0."))
    return s[: lead + digits]


def secret_forms(secret: bytes) -> list[str]:
    """How a secret could appear in text: hex (whole, first 8 bytes), bytes repr, base64."""
    forms = [secret.hex(), secret[:8].hex(), base64.b64encode(secret).decode()[:12]]
    r = repr(secret[:8])[2:-1]
    if len(r) >= 12:
        forms.append(r)
    return forms


def leaks(texts: Iterable[str], secrets: Iterable[bytes], update: np.ndarray | None) -> list[str]:
    """The secret forms and update values found in ``texts``."""
    blob = "\n".join(texts)
    low = blob.lower()
    found = [f for s in secrets for f in secret_forms(s) if f in blob or f.lower() in low]
    if update is not None:
        found += [f"update value {v!r}" for v in update if repr(float(v)) in blob or _significant(v) in blob]
    return found


def assert_no_secrets(victim: Victim, *texts: str, extra: Iterable[bytes] = ()) -> None:
    found = leaks(texts, [*victim.secrets(), *extra], victim.update)
    assert not found, f"secrets in error/log text: {found[:5]}"


# ---- round configurations and sybils -------------------------------------------------------
@dataclass
class Sybil:
    """A seat the hostile server fills itself: its own identity key and contribution."""

    index: int
    client_id: str
    key: bytes
    contribution: bytes
    seed: bytes
    machine: ClientMachine | None = None

    @property
    def commitment(self) -> bytes:
        return commit_contribution(self.contribution)

    @property
    def public(self) -> bytes:
        return identity_public_key(self.key)


def make_sybils(indices: Iterable[int], tag: str = "sybil") -> dict[int, Sybil]:
    """Deterministic sybils; the same ``tag`` gives the same keys and contributions (for replays)."""
    return {i: Sybil(i, f"{tag}-{i}", h32(tag, "key", i), h32(tag, "contribution", i), h32(tag, "rand", i)) for i in indices}


def encoding() -> pb.EncodingParams:
    return pb.EncodingParams(clip_norm=10.0, clip_value=0.0, precision_bits=16)


def round_config(*, index: int, members: int, victim_id: str, victim_commitment: bytes, sybils: dict[int, Sybil] | None = None,
                 mode: Mode = Mode.ACTIVE, neighbors: int = 0, threshold: int | None = None, dim: int = UPDATE_DIM + 2,
                 session: bytes | None = None, round_id: str = "hostile-round", **fields: Any) -> pb.RoundConfig:
    """A RoundConfig the victim would accept, unless a field is overridden.  Seats other than the
    victim's take the sybils' ids and commitments, or made-up ones."""
    sybils = sybils or {}
    ids, commitments = [], []
    for i in range(1, members + 1):
        if i == index:
            ids.append(victim_id)
            commitments.append(victim_commitment)
        elif i in sybils:
            ids.append(sybils[i].client_id)
            commitments.append(sybils[i].commitment)
        else:
            ids.append(f"m{i}")
            commitments.append(h32("made-up commitment", i))
    degree = members - 1 if not neighbors or neighbors >= members - 1 else neighbors
    if threshold is None:
        threshold = thresholds.default(degree + 1, mode)
    rc = pb.RoundConfig(round_id=round_id, group=0, index=index, session=session or h32("session", round_id), members=members,
                        threshold=threshold, dim=dim, modulus_bits=32, mode=convert.MODE_TO_PB[mode], neighbors=neighbors,
                        encoding=encoding(), model_version=1, phase_timeout_seconds=1.0, chunk_words=4096,
                        member_ids=ids, commitments=commitments, grouping="stable", epoch_rounds=10)
    for k, v in fields.items():
        if isinstance(v, list):
            del getattr(rc, k)[:]
            getattr(rc, k).extend(v)
        else:
            setattr(rc, k, v)
    return rc


class Group:
    """The hostile server's side of one group: the victim on ``stream``, sybils in the other
    seats, a real ServerMachine for honest-looking replies.  Each step sends the victim its
    message (or the test's replacement) and collects everyone's answers."""

    def __init__(self, stream: Stream, hello: pb.Hello, victim_public: bytes, *, members: int = 5, index: int = 3,
                 mode: Mode = Mode.ACTIVE, neighbors: int = 0, tag: str = "sybil", session: bytes | None = None,
                 round_id: str = "hostile-round", **fields: Any) -> None:
        self.stream, self.index, self.victim_public = stream, index, victim_public
        self.sybils = make_sybils((i for i in range(1, members + 1) if i != index), tag)
        self.rc = round_config(index=index, members=members, victim_id=hello.client_id, victim_commitment=bytes(hello.contribution_commitment),
                               sybils=self.sybils, mode=mode, neighbors=neighbors, session=session, round_id=round_id, **fields)
        self.config: GroupConfig = convert.group_config_from_pb(self.rc)
        self.params: EncodingParams = convert.encoding_from_pb(self.rc.encoding)
        identities = {i: s.public for i, s in self.sybils.items()} | {index: victim_public}
        self.server = ServerMachine(self.config, identities=identities if mode is Mode.ACTIVE else None)
        policy = ClientPolicy.lenient()
        for i, s in self.sybils.items():
            s.machine = ClientMachine(self.config, i, contribution=s.contribution, identity_key=s.key, policy=policy,
                                      randbytes=deterministic_randbytes(s.seed))
        self.inputs = {i: encode(np.zeros(self.config.dim - 2), self.params, members, rounding_seed=h32("rs", tag, i)) for i in self.sybils}
        self.outbox: dict[int, Any] = {}            # what the ServerMachine would send each member next
        self.signatures: dict[int, bytes] = {}      # consistency signatures collected, by seat

    @property
    def v(self) -> int:
        return self.index

    async def configure(self, rc: pb.RoundConfig | None = None) -> None:
        await self.stream.send(pb.ServerMessage(round_config=rc or self.rc))

    def _sybils_act(self, act: Callable[[ClientMachine, Any], Any]) -> None:
        for i, s in sorted(self.sybils.items()):
            if i in self.outbox or not self.outbox:
                assert s.machine is not None
                self.server.receive(act(s.machine, self.outbox.get(i)))

    def _close(self) -> None:
        self.outbox = self.server.close_phase()

    async def advertise(self) -> None:
        body = await self.stream.expect("advertise_keys")
        # the identity is the victim's registered key, as the real service passes it (never the client's claim)
        self.server.receive(convert.advertise_from_pb(self.v, body, self.victim_public))
        self._sybils_act(lambda m, _: m.advertise_keys())
        self._close()

    async def share_keys(self, to_victim: pb.ServerMessage | None = None) -> None:
        await self.stream.send(to_victim or convert.keys_broadcast_to_pb(self.outbox[self.v]))
        body = await self.stream.expect("share_keys")
        self._sybils_act(lambda m, kb: m.share_keys(kb))
        self.server.receive(convert.share_keys_from_pb(self.v, body))
        self._close()

    async def masked_input(self, to_victim: pb.ServerMessage | None = None) -> np.ndarray:
        await self.stream.send(to_victim or convert.shares_delivery_to_pb(self.outbox[self.v]))
        vector = np.zeros(self.config.dim, dtype=self.config.dtype)
        while True:
            chunk = await self.stream.expect("masked_input")
            words = convert.words_from_bytes(chunk.words, self.config.dtype)
            vector[chunk.offset : chunk.offset + words.size] = words
            if chunk.last:
                break
        self._sybils_act(lambda m, sd: m.masked_input(sd, self.inputs[m.index]))
        self.server.receive(MaskedInput(self.v, vector))
        self._close()
        return vector

    async def consistency(self, to_victim: pb.ServerMessage | None = None) -> None:
        await self.stream.send(to_victim or convert.consistency_request_to_pb(self.outbox[self.v]))
        body = await self.stream.expect("consistency_signature")
        for i, s in sorted(self.sybils.items()):
            assert s.machine is not None
            sig = s.machine.consistency_check(self.outbox[i])
            self.signatures[i] = sig.signature
            self.server.receive(sig)
        self.signatures[self.v] = bytes(body.signature)
        self.server.receive(convert.consistency_signature_from_pb(self.v, body))
        self._close()

    async def unmask(self, to_victim: pb.ServerMessage | None = None) -> pb.UnmaskResponse:
        await self.stream.send(to_victim or convert.unmask_request_to_pb(self.outbox[self.v]))
        body = await self.stream.expect("unmask_response")
        self._sybils_act(lambda m, req: m.unmask(req))
        self.server.receive(convert.unmask_response_from_pb(self.v, body))
        self._close()
        return body

    async def result(self, outcome: str = "completed") -> None:
        await self.stream.send(pb.ServerMessage(result=pb.RoundResult(round_id=self.rc.round_id, outcome=outcome, model_version=2,
                                                                      group_accepted=True, aggregate_digest="")))

    def unmask_request(self, *, survivors: Iterable[int] | None = None, dropped: Iterable[int] | None = None,
                       signatures: dict[int, bytes] | None = None) -> pb.ServerMessage:
        """The UnmaskRequest the ServerMachine would send, with any field replaced."""
        req = self.outbox[self.v]
        sigs = signatures if signatures is not None else {s.index: s.signature for s in req.signatures}
        return pb.ServerMessage(unmask_request=pb.UnmaskRequest(
            survivors=sorted(req.survivors if survivors is None else survivors),
            dropped=sorted(req.dropped if dropped is None else dropped),
            signatures=[pb.IndexedSignature(index=i, signature=s) for i, s in sorted(sigs.items())]))


def recommended(members: int) -> int:
    return recommended_degree(members)
