"""Helpers for the gRPC tests: a real server on loopback and a scriptable "raw" client.

Imported by ``tests/test_grpc_*.py`` as a sibling module (pytest's default ``prepend`` import
mode puts ``tests/`` on ``sys.path``; the directory has no ``__init__.py``).

``running_server(tmp_path, n, **overrides)`` starts the real service (TLS from
``write_dev_pki``, a fresh SQLite store, ``n`` registered identities ``c0..c{n-1}``) inside the
test's event loop and yields a ``Harness``.  ``Harness.raw(cid)`` opens a Participate stream
by hand, answers the challenge with a correctly signed Hello and then lets the test send
anything; it drives a real ``ClientMachine`` so it can follow the protocol faithfully up to
the point where it misbehaves.

pytest-asyncio is not installed: ``async_test`` turns an ``async def`` test into a plain
test function that runs its body with ``asyncio.run`` (fixtures and parametrize still work,
since the wrapper keeps the signature).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from secagg.client import AsyncClient
from secagg.protocol.aggregation import sums_digest
from secagg.protocol.client import ClientMachine
from secagg.protocol.encoding import EncodingParams, bound, encode
from secagg.protocol.messages import ShareKeys
from secagg.protocol.signatures import sign
from secagg.server.config import ServerConfig
from secagg.server.service import RunningServer, start
from secagg.server.store import RoundRecord, Store
from secagg.server.tls import (
    DevPKI,
    identity_public_key,
    new_identity_key,
    write_dev_pki,
)
from secagg.v1 import secagg_pb2 as pb
from secagg.v1 import secagg_pb2_grpc as pb_grpc
from secagg.wire import convert
from secagg.protocol.graph import commit_contribution
from secagg.protocol.policy import ClientPolicy
from secagg.wire.identity import certificate_binding, hello_message

# The harness tests the service, not the client policy: its honest clients accept the small
# groups and semi-honest rounds the tests run (tests/test_hostile_server.py checks the policy).
TEST_POLICY = ClientPolicy.lenient()

DIM = 200
TEST_TIMEOUT = 60.0


def async_test(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an ``async def`` test body with ``asyncio.run`` (bounded by TEST_TIMEOUT)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        async def bounded() -> Any:
            return await asyncio.wait_for(fn(*args, **kwargs), TEST_TIMEOUT)

        return asyncio.run(bounded())

    return wrapper


def cid(i: int) -> str:
    return f"c{i}"


def seed_of(client_id: str, round_no: int = 0) -> bytes:
    """A fixed rounding seed per client and round, so an oracle can re-encode the inputs."""
    return hashlib.sha256(f"rounding|{client_id}|{round_no}".encode()).digest()


def update_of(client_id: str, dim: int = DIM, round_no: int = 0, scale: float = 1.0) -> np.ndarray:
    """A fixed update per client (norm about scale, well inside the default bound of 10)."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"update|{client_id}|{round_no}".encode()).digest()[:8], "big"))
    return rng.standard_normal(dim) * (scale / np.sqrt(dim))


# ---- the server ----------------------------------------------------------------------------
@dataclass
class Harness:
    tmp: Path
    pki: DevPKI
    cfg: ServerConfig
    srv: RunningServer
    keys: dict[str, bytes]
    _closers: list[Any] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.srv.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.srv.port}"

    @property
    def store(self) -> Store:
        return self.srv.store

    @property
    def params(self) -> EncodingParams:
        return self.cfg.encoding

    def client(self, client_id: str, key: bytes | None = None, **options: Any) -> AsyncClient:
        options.setdefault("policy", TEST_POLICY)
        c = AsyncClient(self.address, ca_cert=self.pki.ca_cert, identity_key=key or self.keys[client_id], client_id=client_id,
                        retries=0, **options)
        self._closers.append(c)
        return c

    async def raw(self, client_id: str, key: bytes | None = None, *, hello: bool = True) -> RawClient:
        """A raw stream for ``client_id``, signed with ``key`` (default: its registered key)."""
        r = RawClient(self, client_id, key if key is not None else self.keys.get(client_id, b""))
        self._closers.append(r)
        await r.open(hello=hello)
        return r

    async def participate(self, ids: Iterable[str], *, round_no: int = 0, updates: Mapping[str, np.ndarray] | None = None,
                          on_phase: Mapping[str, Callable[[Any], None]] | None = None, **kwargs: Any) -> dict[str, Any]:
        """Honest AsyncClients with fixed updates and rounding seeds; results or exceptions by id."""
        ids = list(ids)

        async def one(c: str) -> Any:
            u = updates[c] if updates is not None else update_of(c, self.cfg.dim, round_no)
            return await self.client(c).participate(u, rounding_seed=seed_of(c, round_no), on_phase=(on_phase or {}).get(c), **kwargs)

        outs = await asyncio.gather(*(one(c) for c in ids), return_exceptions=True)
        return dict(zip(ids, outs))

    async def wait_in_lobby(self, *ids: str, timeout: float = 10.0) -> None:
        """Until every id has an authenticated session (in the lobby or a round)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not all(i in self.srv.coordinator.sessions for i in ids):
            if loop.time() > end:
                raise TimeoutError(f"{ids} never joined; sessions: {sorted(self.srv.coordinator.sessions)}")
            await asyncio.sleep(0.01)

    async def rounds_finished(self, timeout: float = 30.0) -> None:
        """Until the server has run cfg.rounds rounds and its loop has ended."""
        await asyncio.wait_for(asyncio.shield(self.srv.task), timeout)

    def record(self) -> RoundRecord:
        """The newest round record."""
        return self.store.rounds(limit=1)[0]

    def events(self, client_id: str) -> list[Any]:
        """What the store recorded about ``client_id``'s streams (registration left out)."""
        return [e for e in self.store.events(client_id=client_id) if e.kind != "registered"]

    async def close_clients(self) -> None:
        for c in self._closers:
            try:
                await c.close()
            except Exception:  # noqa: BLE001, S110 - best-effort cleanup of already-broken channels
                pass
        self._closers.clear()


@asynccontextmanager
async def running_server(tmp_path: Path, n: int = 4, *, registered: Iterable[str] = (), **overrides: Any):
    """A real server on 127.0.0.1:0 (TLS, fresh SQLite db) with ``n`` registered clients c0..c{n-1}.

    ``overrides`` go to ServerConfig (defaults: one round, min_clients = max_clients = n, one
    group, dim DIM, a short lobby and 2.5 s phase deadlines).
    """
    pki = write_dev_pki(tmp_path / "pki")
    db = tmp_path / "secagg.db"
    keys = {cid(i): new_identity_key() for i in range(n)}
    keys.update({c: new_identity_key() for c in registered})
    with Store(db) as st:
        for c, k in keys.items():
            st.register_identity(c, identity_public_key(k))
    settings: dict[str, Any] = {
        "address": "127.0.0.1:0", "db": str(db), "tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key),
        "dim": DIM, "rounds": 1, "min_clients": n, "max_clients": n, "lobby_seconds": 0.05, "groups": 1, "phase_seconds": 2.5,
        "mode": "semi-honest",   # the service tests were written for it; active-mode tests say so
    }
    if "linger_seconds" in {f.name for f in dataclasses.fields(ServerConfig)}:
        settings["linger_seconds"] = 0.0   # the harness keeps serving until the test ends anyway
    settings.update(overrides)
    cfg = ServerConfig(**settings)
    srv = await start(cfg)
    h = Harness(tmp_path, pki, cfg, srv, keys)
    try:
        yield h
    finally:
        await h.close_clients()
        await srv.stop(grace=0.2)


# ---- the raw client ------------------------------------------------------------------------
class RawClient:
    """One Participate stream driven by hand.  After ``join`` it holds a real ClientMachine
    (``self.machine``) and an encoded input (``self.encoded``), so it can answer each phase
    correctly until the test makes it misbehave."""

    def __init__(self, h: Harness, client_id: str, key: bytes) -> None:
        self.h, self.client_id, self.key = h, client_id, key
        self.channel: grpc.aio.Channel | None = None
        self.call: Any = None
        self.config: pb.RoundConfig | None = None
        self.machine: ClientMachine | None = None
        self.encoded: np.ndarray | None = None
        self.update = update_of(client_id, h.cfg.dim)
        self.contribution = hashlib.sha256(f"contribution|{client_id}|{id(self)}".encode()).digest()
        self.binding = certificate_binding(h.pki.server_cert.read_bytes())

    async def open(self, *, hello: bool = True) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=self.h.pki.ca_cert.read_bytes())
        self.channel = grpc.aio.secure_channel(self.h.address, creds, options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
        self.call = pb_grpc.SecAggStub(self.channel).Participate()
        first = await self.recv()
        assert first.WhichOneof("body") == "challenge", first
        self.nonce = first.challenge.nonce
        if hello:
            await self.send(self.hello())

    def hello(self, *, client_id: str | None = None, key: bytes | None = None, binding: bytes | None = None) -> pb.ClientMessage:
        c = client_id or self.client_id
        b = self.binding if binding is None else binding
        commitment = commit_contribution(self.contribution)
        sig = sign(key or self.key, hello_message(self.nonce, c, b, commitment))
        return pb.ClientMessage(hello=pb.Hello(client_id=c, signature=sig, library_version="raw-test", server_binding=b,
                                               contribution_commitment=commitment))

    async def send(self, msg: pb.ClientMessage) -> None:
        await self.call.write(msg)

    async def recv(self, timeout: float = 15.0) -> pb.ServerMessage:
        msg = await asyncio.wait_for(self.call.read(), timeout)
        if msg is grpc.aio.EOF:
            raise AssertionError(f"stream ended with {await self.call.code()}: {await self.call.details()}")
        return msg

    async def expect(self, kind: str, timeout: float = 15.0) -> Any:
        msg = await self.recv(timeout)
        assert msg.WhichOneof("body") == kind, f"expected {kind}, got {msg}"
        return getattr(msg, kind)

    async def join(self, timeout: float = 15.0) -> pb.RoundConfig:
        rc = await self.expect("round_config", timeout)
        self.config = rc
        gc = convert.group_config_from_pb(rc)
        self.machine = ClientMachine(gc, rc.index, contribution=self.contribution, identity_key=self.key, policy=TEST_POLICY)
        self.encoded = encode(self.update, convert.encoding_from_pb(rc.encoding), gc.members, rounding_seed=seed_of(self.client_id))
        return rc

    async def advertise(self) -> None:
        assert self.machine is not None
        await self.send(convert.advertise_to_pb(self.machine.advertise_keys()))

    async def share_keys(self, tamper: Callable[[ShareKeys], ShareKeys] | None = None) -> None:
        assert self.machine is not None
        kb = await self.expect("keys_broadcast")
        reply = self.machine.share_keys(convert.keys_broadcast_from_pb(kb))
        await self.send(convert.share_keys_to_pb(tamper(reply) if tamper else reply))

    async def masked_chunks(self) -> list[pb.ClientMessage]:
        """Wait for the shares, mask the input; the chunks the server expects, not yet sent."""
        assert self.machine is not None and self.config is not None
        sd = await self.expect("shares_delivery")
        masked = self.machine.masked_input(convert.shares_delivery_from_pb(self.config.index, sd), self.encoded)
        return list(convert.masked_input_chunks(masked.vector, self.config.chunk_words))

    async def follow(self, *, hold: str | None = None, until: Callable[[], Awaitable[Any]] | None = None,
                     before_masked_input: Callable[[], Awaitable[Any]] | None = None) -> pb.RoundResult:
        """Take part honestly from RoundConfig to RoundResult (semi-honest or active).  Before
        sending its ``hold`` phase message (a phase label) it awaits ``until()``: a test can keep
        a phase open, deterministically, while another client misbehaves in it."""
        if before_masked_input is not None:
            hold, until = "masked_input", before_masked_input

        async def gate(label: str) -> None:
            if label == hold and until is not None:
                await until()

        await self.join()
        await gate("advertise_keys")
        await self.advertise()
        await gate("share_keys")
        await self.share_keys()
        chunks = await self.masked_chunks()
        await gate("masked_input")
        for c in chunks:
            await self.send(c)
        assert self.machine is not None
        while True:
            msg = await self.recv()
            kind = msg.WhichOneof("body")
            if kind == "consistency_request":
                await gate("consistency_check")
                reply = self.machine.consistency_check(convert.consistency_request_from_pb(msg.consistency_request))
                await self.send(convert.consistency_signature_to_pb(reply))
            elif kind == "unmask_request":
                await gate("unmasking")
                reply = self.machine.unmask(convert.unmask_request_from_pb(msg.unmask_request))
                await self.send(convert.unmask_response_to_pb(reply))
            elif kind == "result":
                return msg.result
            else:
                raise AssertionError(f"unexpected {kind}")

    async def status(self, timeout: float = 15.0) -> tuple[grpc.StatusCode, str]:
        """Read until the stream ends; its final status code and details."""

        async def drain() -> None:
            while True:
                try:
                    msg = await self.call.read()
                except grpc.aio.AioRpcError:
                    return
                if msg is grpc.aio.EOF:
                    return

        await asyncio.wait_for(drain(), timeout)
        return await self.call.code(), (await self.call.details()) or ""

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.channel is not None:
            await self.channel.close()
            self.channel = None


# ---- oracles -------------------------------------------------------------------------------
def survivors_of(record: RoundRecord, phase: str = "masked_input") -> dict[int, list[str]]:
    return {int(g): ids for g, ids in record.survivors.get(phase, {}).items()}


def oracle_sums(record: RoundRecord, params: EncodingParams, dim: int, inputs: Mapping[str, tuple[np.ndarray, bytes]]) -> dict[int, np.ndarray]:
    """Plaintext sums of the masked-input survivors' encoded inputs, per completed group."""
    errors = record.timings.get("group_errors", {})
    sums = {}
    for g, members in enumerate(record.groups):
        if str(g) in errors:
            continue
        total = np.zeros(dim + 2, dtype=params.dtype(len(members)))
        for c in survivors_of(record).get(g, []):
            update, seed = inputs[c]
            total += encode(update, params, len(members), rounding_seed=seed)
        sums[g] = total
    return sums


def check_round(h: Harness, record: RoundRecord, inputs: Mapping[str, tuple[np.ndarray, bytes]], old_model: np.ndarray,
                new_model: np.ndarray) -> list[str]:
    """A completed round's aggregate is exactly the survivors' encoded sum (digest) and the model
    moved by the mean of the accepted groups' survivors' bounded updates (within quantisation).
    Returns those survivors."""
    assert record.outcome == "completed", (record.outcome, record.error)
    sums = oracle_sums(record, h.params, h.cfg.dim, inputs)
    assert record.aggregate_digest == sums_digest(sums)
    accepted = {c["group"] for c in record.checks if c["accepted"]}   # aborted groups have no check
    survivors = [c for g, ids in survivors_of(record).items() if g in accepted for c in ids]
    expected = np.mean([bound(inputs[c][0], h.params.clip_norm, h.params.clip_value) for c in survivors], axis=0)
    np.testing.assert_allclose(new_model - old_model, h.cfg.server_lr * expected, rtol=0, atol=1.01 / h.params.scale)
    return survivors
