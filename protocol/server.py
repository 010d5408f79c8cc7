"""The server side of one secure-aggregation instance, as a sans-I/O state machine.

The transport feeds client messages to ``receive`` and calls ``close_phase`` when everyone
expected has answered or the phase deadline has passed; ``close_phase`` returns the message
for each remaining client.  A bad message raises RemoteProtocolError naming the client; a
client that sent a malformed, badly signed or wrong-length message is dropped and the round
goes on.  Only too few survivors (fewer than t) abort the group.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping

import numpy as np

from . import graph, prg, shamir, signatures
from .aead import NONCE_BYTES
from .deadlines import PhaseBudget
from .errors import AbortError, DropReason, LocalProtocolError, RemoteProtocolError
from .keys import KeyPair, Purpose, agree, pair_keys
from .messages import (
    PHASE_OF,
    AdvertiseKeys,
    AggregateResult,
    ClientMessage,
    ConsistencyRequest,
    ConsistencySignature,
    GroupConfig,
    KeysBroadcast,
    MaskedInput,
    Mode,
    Phase,
    ServerMessage,
    ShareKeys,
    SharesDelivery,
    UnmaskRequest,
    UnmaskResponse,
)

SHARE_CIPHERTEXT_BYTES = NONCE_BYTES + 2 * shamir.SHARE_BYTES + 16
_PROBE_KEY = bytes([0x40] * 32)  # a fixed scalar: agreement with a small-order point gives zero


class ServerState(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    ABORTED = "aborted"


# phase -> phase after it closes, per mode.  The only table of transitions.
NEXT_PHASE: dict[Mode, dict[Phase, Phase | None]] = {
    Mode.SEMI_HONEST: {
        Phase.ADVERTISE_KEYS: Phase.SHARE_KEYS,
        Phase.SHARE_KEYS: Phase.MASKED_INPUT,
        Phase.MASKED_INPUT: Phase.UNMASKING,
        Phase.UNMASKING: None,
    },
    Mode.ACTIVE: {
        Phase.ADVERTISE_KEYS: Phase.SHARE_KEYS,
        Phase.SHARE_KEYS: Phase.MASKED_INPUT,
        Phase.MASKED_INPUT: Phase.CONSISTENCY_CHECK,
        Phase.CONSISTENCY_CHECK: Phase.UNMASKING,
        Phase.UNMASKING: None,
    },
}

# Rejections that leave the client in the round (its earlier, valid message stands).
_REJECT_ONLY = frozenset({DropReason.DUPLICATE, DropReason.OUT_OF_PHASE})


class ServerMachine:
    """Collects one group's messages phase by phase and unmasks the exact sum."""

    def __init__(self, config: GroupConfig, *, identities: Mapping[int, bytes] | None = None,
                 phase_seconds: float | PhaseBudget | None = None, now: float = 0.0) -> None:
        """``phase_seconds`` and ``now`` inject time (aioquic's way): the machine says when its
        phase is due (``deadline``, ``ready_to_close(now)``); the caller owns the clock.  A number
        is the same deadline for every phase; a ``PhaseBudget`` scales each with this group's work."""
        if config.mode is Mode.ACTIVE and identities is None:
            raise LocalProtocolError("active mode needs the members' registered identity keys")
        self.config = config
        self.budget = PhaseBudget.fixed(phase_seconds) if isinstance(phase_seconds, (int, float)) else phase_seconds
        self.phase: Phase = Phase.ADVERTISE_KEYS
        self.deadline: float | None = None if self.budget is None else now + self.budget.for_group(self.phase, config)
        self.state = ServerState.RUNNING
        # SecAgg+: the ring is fixed by the contributions opened with the keys (close of advertise).
        self.neighbors: dict[int, frozenset[int]] = {} if config.sparse else graph.complete(config.members)
        self._identities = dict(identities or {})
        self.alive: set[int] = set(range(1, config.members + 1))
        self.received: dict[Phase, dict[int, ClientMessage]] = {p: {} for p in Phase}
        self.dropouts: dict[int, tuple[Phase, DropReason, str]] = {}
        self._sum = np.zeros(config.dim, dtype=config.dtype)
        self._u1: dict[int, AdvertiseKeys] = {}
        self._u2: frozenset[int] = frozenset()
        self._u3: frozenset[int] = frozenset()
        self._commitments: dict[int, bytes] = {}
        self._advertised_keys: set[bytes] = set()
        self.inconsistent: dict[int, str] = {}   # owner -> how its secret was recovered despite bad shares
        self.result: AggregateResult | None = None
        self.unmask_expansions = 0   # PRG expansions the unmasking did (the bound of docs/performance.md counts them)
        self.abort_reason = ""

    # -- bookkeeping ---------------------------------------------------------------------
    def waiting_for(self) -> frozenset[int]:
        """Clients still expected to send this phase's message."""
        if self.state is not ServerState.RUNNING:
            return frozenset()
        return frozenset(self.alive - set(self.received[self.phase]))

    def drop(self, index: int, reason: DropReason, detail: str = "") -> None:
        """The transport saw ``index`` go (stream closed, deadline) or the core rejected it."""
        if index in self.alive:
            self.alive.discard(index)
            self.dropouts[index] = (self.phase, reason, detail or reason.value)

    def _reject(self, index: int | None, reason: DropReason, message: str) -> RemoteProtocolError:
        if index is not None and reason not in _REJECT_ONLY:
            self.drop(index, reason, message)
        return RemoteProtocolError(message, index=index, reason=reason)

    def _abort(self, message: str) -> AbortError:
        self.state = ServerState.ABORTED
        self.abort_reason = message
        return AbortError(message)

    def holders(self, u: int) -> frozenset[int]:
        return self.neighbors[u] | {u}

    # -- input ---------------------------------------------------------------------------
    def receive(self, msg: ClientMessage) -> None:
        """Validate and record one client message; raises RemoteProtocolError if rejected."""
        if self.state is not ServerState.RUNNING:
            raise LocalProtocolError(f"group is {self.state.value}; no more messages")
        phase = PHASE_OF.get(type(msg))
        if phase is None:
            raise LocalProtocolError(f"not a client message: {type(msg).__name__}")
        index = msg.index
        if not 1 <= index <= self.config.members:
            raise RemoteProtocolError(f"client index {index} is not a member of this group", index=None, reason=DropReason.NOT_A_MEMBER)
        if index not in self.alive:
            raise RemoteProtocolError(f"client {index} already left this round", index=index, reason=DropReason.NOT_A_MEMBER)
        if index in self.received[phase]:
            raise self._reject(index, DropReason.DUPLICATE, f"client {index} already sent its {phase.label} message")
        if phase is not self.phase:
            raise self._reject(index, DropReason.OUT_OF_PHASE, f"{phase.label} message from client {index} during {self.phase.label}")
        getattr(self, f"_on_{phase.label}")(msg)
        # A masked vector lives on only inside the running sum: keep a marker, not the vector.
        self.received[phase][index] = None if phase is Phase.MASKED_INPUT else msg  # type: ignore[assignment]

    def _on_advertise_keys(self, msg: AdvertiseKeys) -> None:
        if len(msg.c_public) != 32 or len(msg.s_public) != 32:
            raise self._reject(msg.index, DropReason.MALFORMED, f"client {msg.index}: public keys must be 32 bytes")
        # A copied or small-order key would make every honest neighbour abort: one client must
        # not be able to sink the group, so the server refuses it here and the round goes on.
        seen = self._advertised_keys
        if msg.c_public == msg.s_public or msg.c_public in seen or msg.s_public in seen:
            raise self._reject(msg.index, DropReason.MALFORMED, f"client {msg.index}: public keys must be fresh and distinct")
        for pk in (msg.c_public, msg.s_public):
            try:
                agree(_PROBE_KEY, pk)
            except ValueError:
                raise self._reject(msg.index, DropReason.MALFORMED, f"client {msg.index}: invalid (small-order) X25519 public key") from None
        if self.config.commitments and graph.commit_contribution_or_none(msg.contribution) != self.config.commitments[msg.index - 1]:
            raise self._reject(msg.index, DropReason.MALFORMED, f"client {msg.index}: contribution does not open its commitment")
        if self.config.mode is Mode.ACTIVE:
            if msg.identity != self._identities.get(msg.index):
                raise self._reject(msg.index, DropReason.BAD_SIGNATURE, f"client {msg.index}: identity key is not the registered one")
            try:
                signatures.verify(msg.identity, msg.signature, signatures.keys_message(self.config.digest, msg.index, msg.c_public, msg.s_public), index=msg.index)
            except RemoteProtocolError as exc:
                raise self._reject(msg.index, DropReason.BAD_SIGNATURE, str(exc)) from None
        seen.update((msg.c_public, msg.s_public))

    def _on_share_keys(self, msg: ShareKeys) -> None:
        expected = self.neighbors[msg.index] & set(self._u1)
        receivers = [s.receiver for s in msg.shares]
        if any(s.sender != msg.index for s in msg.shares) or len(set(receivers)) != len(receivers) or set(receivers) != expected:
            raise self._reject(msg.index, DropReason.MALFORMED, f"client {msg.index}: needs exactly one share for each of its {len(expected)} neighbours")
        if any(len(s.ciphertext) != SHARE_CIPHERTEXT_BYTES for s in msg.shares):
            raise self._reject(msg.index, DropReason.MALFORMED, f"client {msg.index}: share ciphertexts must be {SHARE_CIPHERTEXT_BYTES} bytes")
        if len(msg.self_mask_commitment) != 32:
            raise self._reject(msg.index, DropReason.MALFORMED, f"client {msg.index}: self-mask commitment must be 32 bytes")

    def _on_masked_input(self, msg: MaskedInput) -> None:
        v = msg.vector
        if not isinstance(v, np.ndarray) or v.shape != (self.config.dim,) or v.dtype != self.config.dtype:
            shape = getattr(v, "shape", None)
            raise self._reject(msg.index, DropReason.WRONG_LENGTH, f"client {msg.index}: masked input must be {self.config.dim} words of {self.config.dtype}, got {shape}")
        self._sum += v

    def _on_consistency_check(self, msg: ConsistencySignature) -> None:
        try:
            keys = self._u1[msg.index]
            body = signatures.consistency_message(self.config.digest, msg.index, keys.c_public, keys.s_public, self._u3, frozenset(self._u1))
            signatures.verify(self._identities[msg.index], msg.signature, body, index=msg.index)
        except RemoteProtocolError as exc:
            raise self._reject(msg.index, DropReason.BAD_SIGNATURE, str(exc)) from None

    def _on_unmasking(self, msg: UnmaskResponse) -> None:
        u = msg.index
        want_b = self._u3 & self.holders(u)
        want_s = (self._u2 - self._u3) & self.neighbors[u]
        got_b = [o for o, _ in msg.self_mask_shares]
        got_s = [o for o, _ in msg.mask_key_shares]
        if sorted(got_b) != sorted(want_b) or sorted(got_s) != sorted(want_s):
            raise self._reject(u, DropReason.MALFORMED, f"client {u}: expected self-mask shares of {sorted(want_b)} and mask-key shares of {sorted(want_s)}")
        for _, share in msg.self_mask_shares + msg.mask_key_shares:
            if len(share) != shamir.SHARE_BYTES or share[0] > 1:  # 66 bytes, value < 2^521
                raise self._reject(u, DropReason.MALFORMED, f"client {u}: a share is not a field element")

    # -- phase transitions ---------------------------------------------------------------
    def ready_to_close(self, now: float) -> bool:
        """Every expected message is in, or the phase deadline has passed."""
        return not self.waiting_for() or (self.deadline is not None and now >= self.deadline)

    def close_phase(self, now: float | None = None) -> dict[int, ServerMessage]:
        """End the current phase (stragglers are dropped) and return what to send to whom;
        with ``now`` the next phase's deadline starts then."""
        if self.state is not ServerState.RUNNING:
            raise LocalProtocolError(f"group is {self.state.value}")
        for late in self.waiting_for():
            self.drop(late, DropReason.TIMEOUT, f"no {self.phase.label} message before the deadline")
        got = self.received[self.phase]
        if len(got) < self.config.threshold:
            raise self._abort(f"only {len(got)} clients completed {self.phase.label}, threshold is {self.config.threshold}")
        out = getattr(self, f"_close_{self.phase.label}")()
        nxt = NEXT_PHASE[self.config.mode][self.phase]
        if nxt is None:
            self.state = ServerState.DONE
            self.deadline = None
        else:
            self.phase = nxt
            if self.budget is not None and now is not None:
                self.deadline = now + self.budget.for_group(self.phase, self.config)
        return out

    def _close_advertise_keys(self) -> dict[int, ServerMessage]:
        self._u1 = dict(self.received[Phase.ADVERTISE_KEYS])  # type: ignore[arg-type]
        opened: tuple[bytes, ...] = ()
        if self.config.sparse:
            reveals = {u: k.contribution for u, k in self._u1.items()}
            self.neighbors = graph.harary(graph.ring_order(self.config, reveals), self.config.degree)
            opened = tuple(reveals.get(u, b"") for u in range(1, self.config.members + 1))
        u1 = set(self._u1)
        return {u: KeysBroadcast(tuple(self._u1[v] for v in sorted(self.holders(u) & u1)), opened) for u in self._u1}

    def _close_share_keys(self) -> dict[int, ServerMessage]:
        sent: dict[int, ShareKeys] = self.received[Phase.SHARE_KEYS]  # type: ignore[assignment]
        self._u2 = frozenset(sent)
        inbox: dict[int, list] = {v: [] for v in self._u2}
        for u in sorted(self._u2):
            for s in sent[u].shares:
                if s.receiver in inbox:
                    inbox[s.receiver].append(s)
        self._commitments = {u: sent[u].self_mask_commitment for u in self._u2}
        # forwarded: keep who sent, not the O(m^2) ciphertexts
        self.received[Phase.SHARE_KEYS] = dict.fromkeys(sent)  # type: ignore[assignment]
        return {v: SharesDelivery(v, tuple(inbox[v])) for v in sorted(self._u2)}

    def _close_masked_input(self) -> dict[int, ServerMessage]:
        self._u3 = frozenset(self.received[Phase.MASKED_INPUT])
        if self.config.mode is Mode.ACTIVE:
            return {u: ConsistencyRequest(self._u3) for u in sorted(self._u3 & self.alive)}
        req = UnmaskRequest(self._u3, self._u2 - self._u3)
        return {u: req for u in sorted(self._u3 & self.alive)}

    def _close_consistency_check(self) -> dict[int, ServerMessage]:
        sigs: dict[int, ConsistencySignature] = self.received[Phase.CONSISTENCY_CHECK]  # type: ignore[assignment]
        dropped = self._u2 - self._u3
        if not self.config.sparse:
            req = UnmaskRequest(self._u3, dropped, tuple(sigs[i] for i in sorted(sigs)))
            return {u: req for u in sorted(sigs)}
        # SecAgg+: a member checks the signatures of its own neighbourhood only, so it gets only
        # those (O(k) per member, not O(m): the broadcast of every signature was O(m^2) bytes)
        signed = frozenset(sigs)
        return {u: UnmaskRequest(self._u3, dropped, tuple(sigs[i] for i in sorted(self.holders(u) & signed))) for u in sorted(sigs)}

    def _close_unmasking(self) -> dict[int, ServerMessage]:
        self.result = self._unmask()
        return {}

    # -- unmasking -----------------------------------------------------------------------
    def _unmask(self) -> AggregateResult:
        responses: dict[int, UnmaskResponse] = self.received[Phase.UNMASKING]  # type: ignore[assignment]
        b_shares: dict[int, dict[int, bytes]] = {}
        s_shares: dict[int, dict[int, bytes]] = {}
        for r in responses.values():
            for owner, share in r.self_mask_shares:
                b_shares.setdefault(owner, {})[r.index] = share
            for owner, share in r.mask_key_shares:
                s_shares.setdefault(owner, {})[r.index] = share
        coeff_cache: dict[tuple[int, ...], dict[int, int]] = {}
        t = self.config.threshold

        def combine(xs: tuple[int, ...], shares: dict[int, bytes]) -> bytes | None:
            if xs not in coeff_cache:
                coeff_cache[xs] = shamir.lagrange_at_zero(xs)
            try:
                return shamir.combine(coeff_cache[xs], {x: int.from_bytes(shares[x], "big") for x in xs})
            except ValueError:
                return None

        def recover(owner: int, shares: dict[int, bytes], what: str, valid: Callable[[bytes], bool]) -> bytes:
            """The first t responders (one Lagrange set for most owners); if the result fails its
            check (commitment or public key), swap each of them for a spare responder.  The check is
            cryptographic, so a recovered secret is the right one; which responder lied is not
            always decidable (a shift can cancel in another subset), so none is blamed."""
            ordered = sorted(shares)
            if len(ordered) < t:
                raise self._abort(f"only {len(ordered)} shares of client {owner}'s {what}, threshold is {t}")
            first = tuple(ordered[:t])
            secret = combine(first, shares)
            if secret is not None and valid(secret):
                return secret
            for spare in ordered[t:]:
                for liar in first:
                    xs = tuple(sorted((set(first) - {liar}) | {spare}))
                    secret = combine(xs, shares)
                    if secret is not None and valid(secret):
                        self.inconsistent[owner] = f"inconsistent shares of client {owner}'s {what}; recovered from responders {list(xs)}"
                        return secret
            raise self._abort(f"client {owner}'s {what} does not match its commitment from any set of responders "
                              "(bad shares, or the owner lied); group aborted rather than release a corrupt sum")

        cfg = self.config
        total = self._sum.copy()
        session = cfg.digest
        self.unmask_expansions = len(self._u3) + sum(len(self._u3 & self.neighbors[v]) for v in self._u2 - self._u3)
        for u in sorted(self._u3):
            commitment = self._commitments[u]
            seed = recover(u, b_shares.get(u, {}), "self-mask seed",
                           lambda b, u=u, c=commitment: signatures.self_mask_commitment(session, u, b) == c)
            prg.accumulate(total, seed, subtract=True)
        for v in sorted(self._u2 - self._u3):
            public = self._u1[v].s_public
            s_private = recover(v, s_shares.get(v, {}), "mask key", lambda k, p=public: KeyPair.from_private(k).public == p)
            peers = {w: self._u1[w].s_public for w in sorted(self._u3 & self.neighbors[v])}
            for w, seed in pair_keys(s_private, peers, session=session, purpose=Purpose.MASK_SEED, u=v).items():
                prg.accumulate(total, seed, subtract=v > w)  # w added PRG(s_wv) iff v > w
        dropped = {i: (p, r.value) for i, (p, r, _) in self.dropouts.items()}
        return AggregateResult(total=total, survivors=self._u3, responders=frozenset(responses), dropped=dropped)
