"""Rounds over live sessions: lobby, cohort, groups, phase deadlines, aggregation, records.

Each group is one ``ServerMachine``; this module only moves messages between sessions and the
machines, enforces deadlines, and writes what happened to the store.  Masked vectors arrive in
chunks, at most ``max_inflight`` clients' at once per group (memory O(max_inflight * D) whatever
the group size).  Each chunk is added to the group's running sum on arrival, while it is hot in
cache, and kept until its vector is complete: a stream that breaks halfway has its chunks
subtracted again, so it cannot poison the sum (the sum is only read after the phase closes,
and closing discards every partial vector first).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from collections.abc import Collection
from typing import Any

import grpc
import numpy as np

from secagg.protocol import graph, thresholds
from secagg.protocol.aggregation import combine_groups, sums_digest
from secagg.protocol.errors import AbortError, DropReason, LocalProtocolError, RemoteProtocolError
from secagg.protocol.messages import GroupConfig, Mode, Phase
from secagg.protocol.plan import RoundPlan, make_plan
from secagg.protocol.server import ServerMachine, ServerState
from secagg.v1 import secagg_pb2 as pb
from secagg.wire import convert
from secagg.wire.status import STATUS_OF

from .config import ServerConfig
from .session import Session
from .store import Store

log = logging.getLogger("secagg.server")

# Above this a message is refused with RESOURCE_EXHAUSTED and recorded; gRPC's own limit is set
# higher (service.py) so such a message reaches us instead of silently ending the stream.
MAX_CLIENT_MESSAGE_BYTES = 8 << 20
# Before the hello nobody is authenticated and a hello is a few hundred bytes: anything larger is
# refused unparsed (gRPC has already buffered it, up to its own 12 MiB limit; see service.py).
MAX_PREAUTH_MESSAGE_BYTES = 64 << 10


class RejectionLimiter:
    """Rejections before authentication come from anyone, as fast as they can open streams: the first
    ``burst`` in each ``window`` seconds are recorded (an event row each) and logged at INFO; the rest
    are counted and recorded as one summary row per status (kind ``suppressed``) when the window ends."""

    def __init__(self, record: Any, *, burst: int = 20, window: float = 10.0) -> None:
        self.record, self.burst, self.window = record, burst, window
        self._end = 0.0
        self._count = 0
        self._suppressed: dict[str, list[Any]] = {}   # status -> [count, last reason]
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, client_id: str | None, status: str, reason: str) -> None:
        now = time.monotonic()
        if now >= self._end:
            self.flush()
            self._end, self._count = now + self.window, 0
        self._count += 1
        if self._count <= self.burst:
            log.info("refused %s before authentication: %s %s", client_id or "a peer", status, reason)
            self.record(None, client_id, "rejected", status, reason)
            return
        entry = self._suppressed.setdefault(status, [0, ""])
        entry[0] += 1
        entry[1] = reason
        if self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(max(self._end - now, 0.0), self.flush)
            except RuntimeError:   # no loop (tests calling it directly): flushed by the next call
                pass

    def flush(self) -> None:
        """Record what was suppressed so far (one row per status)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._suppressed = self._suppressed, {}
        for status, (n, last) in sorted(pending.items()):
            summary = (f"{n} more {status} rejection(s) before authentication within {self.window:g} s, "
                       f"beyond {self.burst} recorded one by one; the last: {last}")
            log.info("%s", summary)
            self.record(None, None, "suppressed", status, summary, count=n)


_PHASE_OF_KIND = {"advertise_keys": Phase.ADVERTISE_KEYS, "share_keys": Phase.SHARE_KEYS, "masked_input": Phase.MASKED_INPUT,
                  "consistency_signature": Phase.CONSISTENCY_CHECK, "unmask_response": Phase.UNMASKING}


def _timed(group: GroupRun, phase: Phase, fn: Any, **kwargs: Any) -> Any:
    """``fn(**kwargs)``, its CPU time in this thread counted as ``phase``'s work."""
    t0 = time.thread_time()
    try:
        return fn(**kwargs)
    finally:
        group.account(phase, time.thread_time() - t0)


class AlreadyConnected(Exception):
    pass


class BudgetExhausted(Exception):
    """The next round would take the cumulative epsilon above the configured budget."""


@dataclass
class EpochState:
    number: int
    seed: bytes
    population: tuple[str, ...] | None   # fixed at the epoch's first round (stable grouping)
    settings: dict[str, Any] | None = None   # the plan settings it was drawn under (a restart with others starts a new epoch)


def _resume(store: Store) -> tuple[int, EpochState | None]:
    """The next round number and the current epoch, from the newest round record that has a plan:
    a restart continues the epoch with the same groups instead of drawing new ones."""
    for rec in store.rounds(limit=50):
        plan = rec.settings.get("plan")
        if isinstance(plan, dict) and "round_number" in plan:
            started = plan.get("started", True)   # a round refused by the budget did not use its number
            population = tuple(plan["population"]) if plan.get("grouping") == "stable" else None
            keys = ("groups", "grouping", "epoch_rounds", "sampling", "sample_rate", "sample_size", "min_group")
            epoch = EpochState(int(plan["epoch"]), bytes.fromhex(plan["epoch_seed"]), population, {k: plan.get(k) for k in keys})
            return int(plan["round_number"]) + bool(started), epoch
    return 0, None


def _for_member(announced: pb.RoundConfig, index: int) -> pb.RoundConfig:
    rc = pb.RoundConfig()
    rc.CopyFrom(announced)
    rc.index = index
    return rc


@dataclass
class Assembly:
    """One client's masked input while it streams in: its parts are already in the group's sum
    (added on arrival) and are kept so they can be subtracted again if the stream breaks."""

    size: int                                    # words the whole vector has
    parts: list[tuple[int, np.ndarray]] = field(default_factory=list)   # (offset, words): views of the received bytes
    filled: int = 0
    stall_timer: asyncio.TimerHandle | None = None
    rate_timer: asyncio.TimerHandle | None = None   # the whole-vector deadline (minimum upload rate)


@dataclass(eq=False)
class GroupRun:
    round_id: str
    number: int
    config: GroupConfig
    members: dict[int, Session]
    machine: ServerMachine
    chunk_words: int
    inflight: asyncio.Semaphore
    announced: pb.RoundConfig               # what every member is told (its index aside)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    assembly: dict[int, Assembly] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # seconds of the server's own work per phase: handling the phase's messages (parsing, checks,
    # assembling and summing masked inputs) and closing it (unmasking); beside it the process's
    # CPU seconds (all threads: TLS, HTTP/2, protobuf) while the phase was open
    work: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    bytes_in: dict[str, int] = field(default_factory=dict)   # message bytes received per phase
    survivors: dict[str, list[str]] = field(default_factory=dict)
    error: str = ""
    closing: bool = False        # the final phase is being closed in a worker thread

    def client(self, index: int) -> str:
        return self.members[index].client_id

    def account(self, phase: Phase, seconds: float) -> None:
        self.work[phase.label] = self.work.get(phase.label, 0.0) + seconds

    def discard_assembly(self, index: int, *, completed: bool = False) -> None:
        """End ``index``'s assembly; unless its vector was completed, its parts leave the sum again."""
        a = self.assembly.pop(index, None)
        if a is not None:
            for timer in (a.stall_timer, a.rate_timer):
                if timer is not None:
                    timer.cancel()
            m = self.machine
            if not completed and m.state is ServerState.RUNNING and m.phase is Phase.MASKED_INPUT and not m.awaiting_pass:
                for offset, words in reversed(a.parts):
                    m.retract_masked_part(offset, words)
            a.parts.clear()
            self.inflight.release()


class Coordinator:
    """Runs rounds for the sessions the servicer hands it."""

    def __init__(self, config: ServerConfig, store: Store) -> None:
        self.cfg = config
        self.store = store
        self.sessions: dict[str, Session] = {}
        self.lobby: dict[str, Session] = {}
        self._joined = asyncio.Event()
        self.round_id = ""
        self.rounds_done = 0
        self.last_outcome = ""
        self._groups: list[GroupRun] = []
        self.metrics: Any = None   # ops.Metrics when the server serves metrics: counts every event recorded below
        self.preauth = RejectionLimiter(self._event)   # rejections before the hello is verified
        self.exhausted = ""        # why no round will start again (the privacy budget), once that is so
        self.privacy: Any = None   # the privacy accountant over the recorded rounds (budget.Privacy), when DP is on
        self.round_number, self._epoch = _resume(store)

    # -- the plan -------------------------------------------------------------------------------
    def _epoch_for(self, round_number: int) -> EpochState:
        """This round's epoch: the current one, or a new one with a fresh seed from ``secrets``
        (its population is fixed by the epoch's first plan)."""
        settings = self.cfg.plan_settings
        number = settings.epoch_of(round_number)
        if self._epoch is None or self._epoch.number != number or self._epoch.settings not in (None, settings.as_dict()):
            self._epoch = EpochState(number, secrets.token_bytes(32), None, settings.as_dict())
        return self._epoch

    def _needed(self) -> set[str] | None:
        """Mid-epoch: the members of the groups the next round samples (wait for them, not for max_clients)."""
        ep = self._epoch_for(self.round_number)
        if ep.population is None:
            return None
        plan = make_plan(self.cfg.plan_settings, self.round_number, ep.seed, present=ep.population, population=ep.population)
        return set(plan.cohort)

    def _plan(self, lobby: list[Session]) -> RoundPlan:
        ep = self._epoch_for(self.round_number)
        present = [s.client_id for s in lobby]
        if ep.population is None:   # the epoch's first round: its population is who is here (at most max_clients)
            present = present[: self.cfg.max_clients]
        plan = make_plan(self.cfg.plan_settings, self.round_number, ep.seed, present=present, population=ep.population)
        if ep.population is None and self.cfg.grouping == "stable":
            ep.population = plan.population
        return plan

    async def _record_empty_round(self, round_id: str, plan: RoundPlan) -> str:
        """A round whose plan runs no group (sampling drew too few, or every sampled group missed a
        member): recorded, so the draw is on the ledger, and nothing is released."""
        settings = self.cfg.settings() | {"plan": plan.record()}
        self.store.begin_round(round_id, settings, [], [])
        reason = f"no group runs this round: {plan.note or 'nothing sampled'}"
        self.store.finish_round(round_id, "aborted", error=reason)
        log.info("%s (round %d, epoch %d): %s", round_id, plan.round_number, plan.epoch, reason)
        self.last_outcome = "aborted"
        self.rounds_done += 1
        await asyncio.sleep(self.cfg.lobby_seconds)   # paced: an empty draw must not spin the event loop
        return round_id

    def _refuse_round(self, round_id: str, plan: RoundPlan, reason: str) -> str:
        """The round would exceed the privacy budget: not started.  Recorded as an event and a
        failed round record (nothing released), logged, and everyone waiting is told why."""
        settings = self.cfg.settings() | {"plan": plan.record() | {"started": False}, "privacy": self.privacy.summary()}
        self.store.begin_round(round_id, settings, [], [])
        self.store.finish_round(round_id, "failed", error=reason)
        log.warning("%s not started: %s", round_id, reason)
        self._event(round_id, None, "budget_refused", grpc.StatusCode.RESOURCE_EXHAUSTED.name, reason)
        self.exhausted = reason
        for sess in list(self.lobby.values()):
            sess.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
        self.last_outcome = "failed"
        raise BudgetExhausted(reason)

    # -- sessions -----------------------------------------------------------------------------
    def connect(self, session: Session) -> None:
        if session.client_id in self.sessions:
            raise AlreadyConnected(session.client_id)
        self.sessions[session.client_id] = session
        self.lobby[session.client_id] = session
        if self.exhausted:   # no round will start again: say why at once instead of a long lobby wait
            session.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.exhausted)
            return
        self._joined.set()
        log.info("%s joined the lobby: %s", session.client_id, self.lobby_summary())

    def lobby_summary(self) -> str:
        """'3 of 30 clients waiting' (30: what a round needs to start)."""
        return f"{len(self._live())} of {self.cfg.min_clients} clients waiting"

    def disconnect(self, session: Session, detail: str = "stream closed") -> None:
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        if self.lobby.pop(session.client_id, None) is not None:
            log.info("%s left the lobby (%s): %s", session.client_id, detail, self.lobby_summary())
        group = session.group
        if session.closed:   # the server ended this stream itself (rejected, finished, shutdown): already recorded
            return
        session.closed = True
        if isinstance(group, GroupRun) and group.machine.state is ServerState.RUNNING and session.index in group.machine.alive:
            group.machine.drop(session.index, DropReason.DISCONNECTED, detail)
            group.discard_assembly(session.index)
            self._event(group.round_id, session.client_id, "dropped", "CANCELLED", f"{detail} during {group.machine.phase.label}")
            group.changed.set()

    def _event(self, round_id: str | None, client_id: str | None, kind: str, status: str, reason: str, *, count: int = 1) -> None:
        """Record one event row; ``count``: how many events it stands for (a summary of suppressed ones)."""
        if self.metrics is not None:
            self.metrics.observe_event(kind, status, count)
        try:
            self.store.record_event(round_id, client_id, kind, status, reason)
        except Exception:  # the record of a rejection must never take the server down
            log.exception("could not record event")

    def reject(self, session: Session, reason: DropReason, message: str) -> None:
        """Drop ``session`` from its group, record why, and end its stream with the mapped status."""
        if session.closed:   # already ended (a second fault on a dying stream is no news)
            return
        code = STATUS_OF[reason]
        group = session.group
        round_id = None
        if isinstance(group, GroupRun):
            round_id = group.round_id
            if group.machine.state is ServerState.RUNNING:
                group.machine.drop(session.index, reason, message)
            group.discard_assembly(session.index)
            group.changed.set()
        log.info("rejected %s%s: %s %s", session.client_id, f" ({round_id})" if round_id else "", code.name, message)
        self._event(round_id, session.client_id, "rejected", code.name, message)
        session.abort(code, message)

    # -- incoming messages --------------------------------------------------------------------
    async def handle(self, session: Session, msg: pb.ClientMessage | convert.ChunkView, size: int | None = None,
                     parse_seconds: float = 0.0) -> None:
        """``msg``: a parsed message, or a masked-input chunk read in place (``convert.masked_chunk_view``);
        ``size``: its length on the wire when the caller knows it (ByteSize serialises);
        ``parse_seconds``: what reading it took, counted as the phase's work."""
        view = msg if isinstance(msg, convert.ChunkView) else None
        kind = "masked_input" if view is not None else msg.WhichOneof("body")  # type: ignore[union-attr]
        group = session.group
        if kind is None:
            return self.reject(session, DropReason.MALFORMED, "empty message: set one field of ClientMessage.body")
        if kind == "hello":
            return self.reject(session, DropReason.DUPLICATE, "hello already received on this stream")
        if kind == "abort":
            return self.reject(session, DropReason.ABORTED, f"client aborted: {msg.abort.reason[:200]}")
        if not isinstance(group, GroupRun):
            return self.reject(session, DropReason.OUT_OF_PHASE, f"{kind} before any round configuration; wait for RoundConfig")
        if group.closing:
            return self.reject(session, DropReason.OUT_OF_PHASE, f"{kind} after the group's last phase closed")
        if size is None:
            size = msg.ByteSize()  # type: ignore[union-attr]   (a view always comes with its size)
        if size > MAX_CLIENT_MESSAGE_BYTES:
            return self.reject(session, DropReason.OVERSIZED,
                               f"{kind} of {size} bytes exceeds the {MAX_CLIENT_MESSAGE_BYTES} byte limit; send smaller chunks")
        i = session.index
        phase = _PHASE_OF_KIND.get(kind)
        if phase is not None:
            group.bytes_in[phase.label] = group.bytes_in.get(phase.label, 0) + size
        t0 = time.thread_time()   # CPU time of this thread: immune to other processes taking the core
        try:
            if kind == "masked_input":
                chunk = view if view is not None else msg.masked_input  # type: ignore[union-attr]
                t0 = await self._chunk(group, i, chunk)   # from when it holds a slot: waiting is not work
            elif kind == "advertise_keys":
                group.machine.receive(convert.advertise_from_pb(i, msg.advertise_keys, session.identity))
            elif kind == "share_keys":
                group.machine.receive(convert.share_keys_from_pb(i, msg.share_keys))
            elif kind == "consistency_signature":
                group.machine.receive(convert.consistency_signature_from_pb(i, msg.consistency_signature))
            elif kind == "unmask_response":
                group.machine.receive(convert.unmask_response_from_pb(i, msg.unmask_response))
        except convert.WireError as exc:
            self.reject(session, DropReason.MALFORMED, str(exc))
        except RemoteProtocolError as exc:
            self.reject(session, exc.reason, str(exc))
        except LocalProtocolError as exc:
            self.reject(session, DropReason.OUT_OF_PHASE, str(exc))
        finally:
            if phase is not None:
                group.account(phase, parse_seconds + time.thread_time() - t0)
            group.changed.set()

    async def _chunk(self, group: GroupRun, i: int, chunk: pb.MaskedInputChunk | convert.ChunkView) -> float:
        """Assemble one chunk (and add a completed vector to the sum); returns when its work began."""
        m = group.machine
        if i in m.received[Phase.MASKED_INPUT]:
            raise RemoteProtocolError(f"client {i} already sent its whole masked input", index=i, reason=DropReason.DUPLICATE)
        if m.state is not ServerState.RUNNING or m.phase is not Phase.MASKED_INPUT:
            raise RemoteProtocolError(f"masked input chunk during {m.phase.label}", index=i, reason=DropReason.OUT_OF_PHASE)
        a = group.assembly.get(i)
        if a is None:
            if chunk.offset != 0:
                raise RemoteProtocolError(f"first masked-input chunk must start at offset 0, got {chunk.offset}", index=i)
            await group.inflight.acquire()   # backpressure: the client waits in gRPC flow control
            if not m.expects(i) or m.phase is not Phase.MASKED_INPUT:
                group.inflight.release()
                return time.thread_time()
            a = group.assembly[i] = Assembly(group.config.dim)
            self._arm_rate_timer(group, i, a)
        started = time.thread_time()
        words = convert.words_from_bytes(chunk.words, group.config.dtype)
        if chunk.offset != a.filled:
            why = DropReason.DUPLICATE if chunk.offset < a.filled else DropReason.MALFORMED
            raise RemoteProtocolError(f"masked-input chunk at offset {chunk.offset}, expected {a.filled} (replayed or out of order)", index=i, reason=why)
        if not 0 < words.size <= group.chunk_words:
            raise RemoteProtocolError(f"masked-input chunk of {words.size} words; chunks carry 1..{group.chunk_words}", index=i)
        if a.filled + words.size > group.config.dim:
            raise RemoteProtocolError(f"masked input longer than {group.config.dim} words", index=i, reason=DropReason.WRONG_LENGTH)
        m.add_masked_part(i, a.filled, words)   # summed while hot; kept until the vector is whole
        a.parts.append((a.filled, words))
        a.filled += words.size
        self._arm_stall_timer(group, i, a)
        if chunk.last:
            if a.filled != group.config.dim:
                raise RemoteProtocolError(f"masked input has {a.filled} words, the round needs {group.config.dim}", index=i, reason=DropReason.WRONG_LENGTH)
            m.complete_masked_input(i, a.filled)
            group.discard_assembly(i, completed=True)
        return started

    def _arm_rate_timer(self, group: GroupRun, i: int, a: Assembly) -> None:
        """A trickler that sends a word just often enough to dodge the stall timer still holds its slot:
        the whole vector must arrive within stall_limit + its size / min_upload_rate of taking one."""
        rate = self.cfg.min_upload_rate
        if rate <= 0:
            return
        size = a.size * group.config.dtype.itemsize
        budget = self.cfg.stall_limit + size / rate

        def too_slow() -> None:
            if group.assembly.get(i) is a:
                self.reject(group.members[i], DropReason.TIMEOUT,
                            f"masked input too slow: {a.filled} of {a.size} words ({size} bytes) after {budget:.3g} s "
                            f"holding an assembly slot; the minimum upload rate is {rate:g} bytes/s")

        a.rate_timer = asyncio.get_running_loop().call_later(budget, too_slow)

    def _arm_stall_timer(self, group: GroupRun, i: int, a: Assembly) -> None:
        """A client that goes quiet mid-vector holds an assembly slot others wait for: drop it early."""
        if a.stall_timer is not None:
            a.stall_timer.cancel()
        limit = self.cfg.stall_limit

        def stalled() -> None:
            if group.assembly.get(i) is a:
                self.reject(group.members[i], DropReason.TIMEOUT,
                            f"masked input stalled at word {a.filled} of {a.size}: no chunk for {limit:g} s")

        a.stall_timer = asyncio.get_running_loop().call_later(limit, stalled)

    @property
    def phase(self) -> str:
        """For GetStatus: 'idle', 'lobby', or the phase of the slowest running group."""
        running = [g.machine.phase for g in self._groups if g.machine.state is ServerState.RUNNING]
        if running:
            return min(running).label
        return "lobby" if self.lobby else "idle"

    # -- rounds -------------------------------------------------------------------------------
    def _live(self) -> list[Session]:
        return [s for s in self.lobby.values() if not s.closed]

    async def wait_for_lobby(self, needed: Collection[str] | None = None) -> list[Session]:
        """At least min_clients live sessions, then up to lobby_seconds more for max_clients of them
        (or, mid-epoch, until every member of the sampled groups, ``needed``, is here)."""
        cfg = self.cfg
        while True:
            while len(self._live()) < cfg.min_clients:
                self._joined.clear()
                await self._joined.wait()
            deadline = time.monotonic() + cfg.lobby_seconds

            def enough() -> bool:
                live = self._live()
                if needed is not None:
                    return set(needed) <= {s.client_id for s in live}
                return len(live) >= cfg.max_clients

            while not enough() and (left := deadline - time.monotonic()) > 0:
                self._joined.clear()
                try:
                    await asyncio.wait_for(self._joined.wait(), left)
                except TimeoutError:
                    break
            live = self._live()
            if len(live) >= cfg.min_clients:   # someone may have left while we waited
                return live

    def _threshold(self, holders: int, mode: Mode) -> int:
        t = self.cfg.threshold
        if t <= 0:
            return thresholds.default(holders, mode)
        if t < 1:
            return min(holders, max(1, math.ceil(t * holders)))
        return min(holders, int(t))

    def _group_threshold(self, size: int) -> int:
        k = self._neighbors(size)
        return self._threshold(size if k is None else k + 1, self.cfg.mode_enum)

    def _neighbors(self, size: int) -> int | None:
        """SecAgg+ degree: the configured k, raised to the recommended degree for the group size
        (the floor default clients enforce); None when that is the complete graph."""
        if not self.cfg.neighbors:
            return None
        k = max(self.cfg.neighbors, graph.recommended_degree(size))
        return k if k < size - 1 else None

    def _round_config_pb(self, round_id: str, number: int, members: list[Session], model_version: int, plan: RoundPlan) -> pb.RoundConfig:
        """Everything a member is told, index aside; the GroupConfig is derived from it as a client derives it."""
        cfg = self.cfg
        size = len(members)
        mode = cfg.mode_enum
        k = self._neighbors(size)
        session = hashlib.sha256(b"secagg/v1 session|" + round_id.encode() + b"|" + number.to_bytes(4, "big") + b"|" + secrets.token_bytes(32)).digest()
        return pb.RoundConfig(
            round_id=round_id, group=number, session=session, members=size,
            threshold=self._group_threshold(size), dim=cfg.dim + 2,
            modulus_bits=cfg.encoding.modulus_bits(size), mode=convert.MODE_TO_PB[mode], neighbors=k or 0,
            encoding=convert.encoding_to_pb(cfg.encoding), model_version=model_version,
            phase_timeout_seconds=cfg.phase_seconds, chunk_words=cfg.chunk_words,
            member_ids=[s.client_id for s in members], commitments=[s.commitment for s in members],
            round_number=plan.round_number, epoch=plan.epoch, epoch_rounds=plan.settings.rounds_per_epoch,
            grouping=plan.settings.grouping,
        )

    async def run_round(self) -> str:
        """Wait for a cohort, run one round for all its groups, record it; returns the round id."""
        cfg = self.cfg
        try:
            lobby = await self.wait_for_lobby(self._needed())
        except asyncio.CancelledError:   # shutdown: the lobby hears why, not a broken stream
            for sess in list(self.lobby.values()):
                sess.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; try again once it is back")
            raise
        plan = self._plan(lobby)
        round_id = f"round-{int(time.time())}-{secrets.token_hex(3)}"
        honest = min((self._group_threshold(len(g)) for g in plan.groups), default=1)
        refusal = self.privacy.refusal(plan, honest) if self.privacy is not None else None
        if refusal is not None:
            return self._refuse_round(round_id, plan, refusal)
        self.round_number = plan.round_number + 1
        if not plan.groups:   # nothing runs: recorded (the seeds were drawn), then the next round
            return await self._record_empty_round(round_id, plan)
        by_id = {s.client_id: s for s in lobby}
        parts = [[by_id[c] for c in g] for g in plan.groups]
        cohort = [s for g in parts for s in g]
        for s in cohort:
            del self.lobby[s.client_id]
        self.round_id = round_id
        model = await asyncio.to_thread(self.store.model)
        groups: list[GroupRun] = []
        for number, members in enumerate(parts):
            rc = self._round_config_pb(round_id, number, members, model.version, plan)
            gc = convert.group_config_from_pb(_for_member(rc, 1))   # derived exactly as the members derive it
            rc.phase_timeout_seconds = cfg.phase_budget.longest(gc)   # deadlines grow with the group's work: clients wait as long
            sessions = {i + 1: s for i, s in enumerate(members)}
            identities = {i: s.identity for i, s in sessions.items()}
            machine = ServerMachine(gc, identities=identities if gc.mode is Mode.ACTIVE else None,
                                    phase_seconds=cfg.phase_budget, now=time.monotonic())
            g = GroupRun(round_id, number, gc, sessions, machine, cfg.chunk_words, asyncio.Semaphore(cfg.max_inflight), rc)
            for i, s in sessions.items():
                s.group, s.index = g, i
            groups.append(g)
        self._groups = groups
        settings = cfg.settings() | {"plan": plan.record(), "model_version": model.version, "group_configs": [
            {"group": g.number, "members": g.config.members, "threshold": g.config.threshold, "neighbors": g.config.neighbors,
             "modulus_bits": g.config.modulus_bits, "session": g.config.session.hex(), "config_digest": g.config.digest.hex(),
             "commitments": [c.hex() for c in g.config.commitments]} for g in groups]}
        if self.privacy is not None:
            settings["privacy"] = self.privacy.charge(plan, [g.config for g in groups])
        self.store.begin_round(round_id, settings, [s.client_id for s in cohort], [[s.client_id for s in g.members.values()] for g in groups])
        log.info("%s: %d clients in %d groups (round %d, epoch %d, %s grouping, %s sampling)%s", round_id, len(cohort), len(groups),
                 plan.round_number, plan.epoch, plan.settings.grouping, plan.settings.sampling, f"; {plan.note}" if plan.note else "")
        t0 = time.monotonic()
        for g in groups:
            for i, s in g.members.items():
                s.send(pb.ServerMessage(round_config=_for_member(g.announced, i)))
        try:
            await asyncio.gather(*(self._drive(g) for g in groups))
            await self._finish(round_id, groups, model, time.monotonic() - t0)
        except (Exception, asyncio.CancelledError) as exc:  # a bug or a shutdown must not leave a record "running"
            stopping = isinstance(exc, asyncio.CancelledError)
            if not stopping:
                log.exception("%s failed", round_id)
            reason = "the server stopped during the round" if stopping else f"internal error: {type(exc).__name__}: {exc}"
            try:
                self.store.finish_round(round_id, "failed", error=reason)
            except Exception:
                log.exception("could not record the failure of %s", round_id)
            code = grpc.StatusCode.UNAVAILABLE if stopping else grpc.StatusCode.INTERNAL
            self._event(round_id, None, "round_failed", code.name, reason)   # the server's side of what happened
            for g in groups:
                for sess in g.members.values():
                    sess.abort(code, f"round {round_id} failed: {reason}; try the next round")
            self.last_outcome = "failed"
            if stopping:
                raise
        self.rounds_done += 1
        self.round_id, self._groups = "", []
        return round_id

    async def _drive(self, g: GroupRun) -> None:
        m = g.machine
        while m.state is ServerState.RUNNING:
            phase = m.phase
            t0, cpu0 = time.monotonic(), time.process_time()
            while not m.ready_to_close(now := time.monotonic()):
                g.changed.clear()
                try:
                    await asyncio.wait_for(g.changed.wait(), m.deadline - now)  # type: ignore[operator]
                except TimeoutError:
                    pass
            for late in sorted(m.waiting_for()):
                self.reject(g.members[late], DropReason.TIMEOUT, f"no {phase.label} message within the {m.budget.for_group(phase, g.config):.3g} s deadline")  # type: ignore[union-attr]
            for i in list(g.assembly):   # a partial vector never stays in the sum (its stream ended some other way)
                g.discard_assembly(i)
            try:
                if phase is Phase.UNMASKING:   # O(survivors x D) of PRG work: keep the event loop free
                    g.closing = True
                    out = await asyncio.to_thread(_timed, g, phase, m.close_phase)
                else:
                    out = _timed(g, phase, m.close_phase, now=time.monotonic())
            except AbortError as exc:
                g.error = str(exc)
                log.warning("%s group %d aborted: %s", g.round_id, g.number, exc)
            finally:
                g.timings[phase.label] = time.monotonic() - t0
                g.cpu[phase.label] = time.process_time() - cpu0
                g.survivors[phase.label] = [g.client(i) for i in sorted(m.received[phase])]
                log.info("%s group %d: %s closed after %.2f s with %d of %d members%s", g.round_id, g.number, phase.label,
                         g.timings[phase.label], len(m.received[phase]), g.config.members, f"; aborted: {g.error}" if g.error else "")
            if g.error:
                return
            for i, msg in out.items():
                g.members[i].send(convert.server_message_to_pb(msg))

    async def _finish(self, round_id: str, groups: list[GroupRun], model: Any, seconds: float) -> None:
        cfg = self.cfg
        done = {g.number: g for g in groups if g.machine.result is not None}
        sums = {n: (g.machine.result.total, len(g.machine.result.survivors)) for n, g in done.items()}  # type: ignore[union-attr]
        decision = await asyncio.to_thread(combine_groups, sums, cfg.encoding, rule=cfg.rule, f=cfg.byzantine_groups,
                                           rule_params=cfg.rule_params) if sums else None
        version, outcome, error = model.version, "aborted", "every group aborted: " + "; ".join(g.error for g in groups)
        if decision is not None:
            if decision.update is not None:
                new = decision.update   # the rule's output is ours: scaled in place, not copied
                new *= cfg.server_lr
                new += model.params
                reason = f"round {round_id}: {cfg.rule} over groups {list(decision.selected_groups)}"
                version = await asyncio.to_thread(self.store.append_model, new, round_id=round_id, reason=reason)
                outcome, error = "completed", ""
            else:
                outcome, error = "failed", decision.failure
        dropouts = [
            {"client": g.client(i), "group": g.number, "phase": p.label, "reason": r.value, "detail": d}
            for g in groups for i, (p, r, d) in sorted(g.machine.dropouts.items())
        ]
        survivors: dict[str, dict[str, list[str]]] = {}
        ring: dict[str, list[str]] = {}
        for g in groups:
            for phase, ids in g.survivors.items():
                survivors.setdefault(phase, {})[str(g.number)] = ids
            # with the commitments in the settings, the opened contributions let anyone recompute the ring
            opened = g.machine.received[Phase.ADVERTISE_KEYS]
            ring[str(g.number)] = [opened[i].contribution.hex() if i in opened else ""  # type: ignore[union-attr]
                                   for i in range(1, g.config.members + 1)]

        accepted = {v.group for v in decision.verdicts if v.accepted} if decision else set()
        fields = {
            "survivors": survivors,
            "ring": ring,
            "dropouts": dropouts,
            "checks": [v.as_record() | {"inconsistent_shares": done[v.group].machine.inconsistent} for v in decision.verdicts]
            if decision else [],
            "rule": decision.as_record() if decision else {},
            "aggregate_digest": sums_digest({n: s for n, (s, _) in sums.items()}) if sums else None,
            "timings": {"total": seconds, "groups": {str(g.number): g.timings for g in groups},
                        "work": {str(g.number): g.work for g in groups}, "cpu": {str(g.number): g.cpu for g in groups},
                        "bytes_in": {str(g.number): g.bytes_in for g in groups},
                        "unmask_expansions": {str(g.number): g.machine.unmask_expansions for g in groups},
                        "group_errors": {str(g.number): g.error for g in groups if g.error}},
            "model_version": version,
        }
        self.store.finish_round(round_id, outcome, error=error or None, **fields)
        self.last_outcome = outcome
        log.info("%s %s (model v%d)%s", round_id, outcome, version, f": {error}" if error else "")
        digest = fields["aggregate_digest"] or ""
        for g in groups:
            # members of an aborted group learn that, and why, whatever the round's outcome
            g_outcome, g_reason = ("aborted", g.error) if g.error else (outcome, error)
            for s in g.members.values():
                s.send(pb.ServerMessage(result=pb.RoundResult(round_id=round_id, outcome=g_outcome, reason=g_reason, model_version=version,
                                                              group_accepted=g.number in accepted, aggregate_digest=digest)))
                s.finish()

    async def run(self, rounds: int = 0) -> None:
        """Run rounds until ``rounds`` have finished (0: forever)."""
        while not rounds or self.rounds_done < rounds:
            try:
                await self.run_round()
            except Exception:
                log.exception("round failed")
                raise
