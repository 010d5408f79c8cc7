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
from .keys import KeyPair, Purpose, agree, pair_keys, pass_self_seed
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
    PassStart,
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
        self._scratch: np.ndarray | None = None   # aligned copy of an unaligned part (add_masked_part)
        self._u1: dict[int, AdvertiseKeys] = {}
        self._u2: frozenset[int] = frozenset()
        self._u3: frozenset[int] = frozenset()
        self._commitments: dict[int, bytes] = {}
        self._advertised_keys: set[bytes] = set()
        self.inconsistent: dict[int, str] = {}   # owner -> how its secret was recovered despite bad shares
        self.result: AggregateResult | None = None
        self.unmask_expansions = 0   # PRG expansions the unmasking did (the bound of docs/performance.md counts them)
        self.abort_reason = ""
        # multi-pass: the coordinator opens each pass with start_pass(public) once every group's
        # previous sum is known; results[p - 1] is pass p's sum
        self.pass_index = 0
        self.awaiting_pass = False
        self.results: list[AggregateResult] = []
        self._participants: frozenset[int] = frozenset()
        self._pass_binding = b""
        self._ever_survived: set[int] = set()
        self._root_recovered: set[int] = set()
        self._pass_commitments: dict[int, tuple[bytes, ...]] = {}
        self._request: UnmaskRequest | None = None
        self._coeff_cache: dict[tuple[int, ...], dict[int, int]] = {}   # responder set -> Lagrange coefficients

    # -- bookkeeping ---------------------------------------------------------------------
    def waiting_for(self) -> frozenset[int]:
        """Clients still expected to send this phase's message."""
        if self.state is not ServerState.RUNNING or self.awaiting_pass:
            return frozenset()
        return frozenset(self.alive - set(self.received[self.phase]))

    def expects(self, index: int) -> bool:
        """``index`` still owes this phase's message (O(1): asked once per incoming message)."""
        return (self.state is ServerState.RUNNING and not self.awaiting_pass and index in self.alive
                and index not in self.received[self.phase])

    def _anyone_missing(self) -> bool:
        # stops at the first member still owed: checked after every message, so building the
        # whole waiting set each time (O(members)) made a phase O(members^2)
        if self.state is not ServerState.RUNNING:
            return False
        got = self.received[self.phase]
        return any(i not in got for i in self.alive)

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
        self._admit(index, phase)
        getattr(self, f"_on_{phase.label}")(msg)
        # A masked vector lives on only inside the running sum: keep a marker, not the vector.
        self.received[phase][index] = None if phase is Phase.MASKED_INPUT else msg  # type: ignore[assignment]

    def _admit(self, index: int, phase: Phase) -> None:
        """A message of ``phase`` from ``index`` may be taken now, or the reason it may not."""
        if not 1 <= index <= self.config.members:
            raise RemoteProtocolError(f"client index {index} is not a member of this group", index=None, reason=DropReason.NOT_A_MEMBER)
        if index not in self.alive:
            raise RemoteProtocolError(f"client {index} already left this round", index=index, reason=DropReason.NOT_A_MEMBER)
        if index in self.received[phase]:
            raise self._reject(index, DropReason.DUPLICATE, f"client {index} already sent its {phase.label} message")
        if phase is not self.phase or self.awaiting_pass:
            during = "the wait for the next pass" if self.awaiting_pass else self.phase.label
            raise self._reject(index, DropReason.OUT_OF_PHASE, f"{phase.label} message from client {index} during {during}")

    # -- masked input in parts, summed on arrival (the transport's streaming path) --------------
    def add_masked_part(self, index: int, offset: int, words: np.ndarray) -> None:
        """Add words ``offset..`` of ``index``'s masked input to the running sum as they arrive
        (while they are hot in cache).  The caller keeps each part until ``complete_masked_input``
        and hands it to ``retract_masked_part`` if the rest never comes: subtracting exactly what
        was added leaves the sum as it was, so a broken stream cannot poison it."""
        if self.state is not ServerState.RUNNING:
            raise LocalProtocolError(f"group is {self.state.value}; no more messages")
        self._admit(index, Phase.MASKED_INPUT)
        if words.dtype != self.config.dtype or not 0 <= offset <= offset + words.size <= self.config.dim:
            raise self._reject(index, DropReason.WRONG_LENGTH,
                               f"client {index}: masked input part of {words.size} {words.dtype} words at {offset} does not fit {self.config.dim} words of {self.config.dtype}")
        part = self._sum[offset : offset + words.size]
        part += self._aligned(words)

    def _aligned(self, words: np.ndarray) -> np.ndarray:
        """``words`` itself when aligned, else a copy in a reused aligned buffer.  Words read in
        place from a message start wherever the protobuf header ends; numpy adds unaligned words
        through a buffered path (up to 2x slower than a byte copy plus an aligned add, in a loop here)."""
        if words.flags.aligned:
            return words
        if self._scratch is None or self._scratch.size < words.size:
            self._scratch = np.empty(words.size, dtype=words.dtype)
        out = self._scratch[: words.size]
        out.view(np.uint8)[:] = words.view(np.uint8)
        return out

    def retract_masked_part(self, offset: int, words: np.ndarray) -> None:
        """Undo one ``add_masked_part`` of an input that will not be completed (any time before unmasking)."""
        if self.phase is not Phase.MASKED_INPUT or self.state is not ServerState.RUNNING or self.awaiting_pass:
            raise LocalProtocolError("masked input parts can only be retracted while the masked input phase is open")
        part = self._sum[offset : offset + words.size]
        part -= self._aligned(words)

    def complete_masked_input(self, index: int, words: int) -> None:
        """``index``'s parts cover all ``dim`` words, in order: it has sent its masked input."""
        self._admit(index, Phase.MASKED_INPUT)
        if words != self.config.dim:
            raise self._reject(index, DropReason.WRONG_LENGTH, f"client {index}: masked input has {words} words, the round needs {self.config.dim}")
        self.received[Phase.MASKED_INPUT][index] = None  # type: ignore[assignment]

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
        want = self.config.passes if self.config.multipass else 0
        if len(msg.pass_commitments) != want or any(len(c) != 32 for c in msg.pass_commitments):
            raise self._reject(msg.index, DropReason.MALFORMED, f"client {msg.index}: needs {want} 32-byte pass commitments")

    def _on_masked_input(self, msg: MaskedInput) -> None:
        v = msg.vector
        if not isinstance(v, np.ndarray) or v.shape != (self.config.dim,) or v.dtype != self.config.dtype:
            shape = getattr(v, "shape", None)
            raise self._reject(msg.index, DropReason.WRONG_LENGTH, f"client {msg.index}: masked input must be {self.config.dim} words of {self.config.dtype}, got {shape}")
        self._sum += v

    def _on_consistency_check(self, msg: ConsistencySignature) -> None:
        try:
            keys = self._u1[msg.index]
            body = signatures.consistency_message(self.config.digest, msg.index, keys.c_public, keys.s_public, self._u3, frozenset(self._u1),
                                                  self._pass_binding)
            signatures.verify(self._identities[msg.index], msg.signature, body, index=msg.index)
        except RemoteProtocolError as exc:
            raise self._reject(msg.index, DropReason.BAD_SIGNATURE, str(exc)) from None

    def _on_unmasking(self, msg: UnmaskResponse) -> None:
        if self.config.multipass:
            return self._on_pass_unmasking(msg)
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
        """Every expected message is in, or the phase deadline has passed (never while a
        multi-pass group waits for its next pass: that is ``start_pass``)."""
        if self.awaiting_pass:
            return False
        return not self._anyone_missing() or (self.deadline is not None and now >= self.deadline)

    def close_phase(self, now: float | None = None) -> dict[int, ServerMessage]:
        """End the current phase (stragglers are dropped) and return what to send to whom;
        with ``now`` the next phase's deadline starts then."""
        if self.state is not ServerState.RUNNING:
            raise LocalProtocolError(f"group is {self.state.value}")
        if self.awaiting_pass:
            raise LocalProtocolError(f"group waits for pass {self.pass_index + 1}: call start_pass")
        for late in self.waiting_for():
            self.drop(late, DropReason.TIMEOUT, f"no {self.phase.label} message before the deadline")
        got = self.received[self.phase]
        if len(got) < self.config.threshold:
            raise self._abort(f"only {len(got)} clients completed {self.phase.label}, threshold is {self.config.threshold}")
        out = getattr(self, f"_close_{self.phase.label}")()
        nxt = NEXT_PHASE[self.config.mode][self.phase]
        if self.config.multipass and (self.phase is Phase.SHARE_KEYS or (nxt is None and self.pass_index < self.config.passes)):
            self.phase, self.awaiting_pass, self.deadline = Phase.MASKED_INPUT, True, None
        elif nxt is None:
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
        self._pass_commitments = {u: sent[u].pass_commitments for u in self._u2}
        # forwarded: keep who sent, not the O(m^2) ciphertexts
        self.received[Phase.SHARE_KEYS] = dict.fromkeys(sent)  # type: ignore[assignment]
        return {v: SharesDelivery(v, tuple(inbox[v])) for v in sorted(self._u2)}

    def _close_masked_input(self) -> dict[int, ServerMessage]:
        self._u3 = frozenset(self.received[Phase.MASKED_INPUT])
        if self.config.mode is Mode.ACTIVE:
            return {u: ConsistencyRequest(self._u3) for u in sorted(self._u3 & self.alive)}
        req = self._unmask_request((), frozenset())
        return {u: req for u in sorted(self._u3 & self.alive)}

    def _close_consistency_check(self) -> dict[int, ServerMessage]:
        sigs: dict[int, ConsistencySignature] = self.received[Phase.CONSISTENCY_CHECK]  # type: ignore[assignment]
        signed = frozenset(sigs)
        if not self.config.sparse:
            req = self._unmask_request(tuple(sigs[i] for i in sorted(sigs)), signed)
            return {u: req for u in sorted(sigs)}
        # SecAgg+: a member checks the signatures of its own neighbourhood only, so it gets only
        # those (O(k) per member, not O(m): the broadcast of every signature was O(m^2) bytes)
        return {u: self._unmask_request(tuple(sigs[i] for i in sorted(self.holders(u) & signed)), signed) for u in sorted(sigs)}

    def _unmask_request(self, sigs: tuple[ConsistencySignature, ...], signed: frozenset[int]) -> UnmaskRequest:
        if not self.config.multipass:
            return UnmaskRequest(self._u3, self._u2 - self._u3, sigs)
        gone = self._participants - self._u3
        fresh = frozenset(w for w in gone if w not in self._ever_survived)   # no self seed of theirs ever revealed
        recover = self._u3 - signed if self.config.mode is Mode.ACTIVE else frozenset()
        self._request = UnmaskRequest(self._u3, fresh, sigs, self.pass_index, gone - fresh, recover)
        return self._request

    def _close_unmasking(self) -> dict[int, ServerMessage]:
        self.result = self._unmask_pass() if self.config.multipass else self._unmask()
        self.results.append(self.result)
        return {}

    # -- multi-pass ----------------------------------------------------------------------
    def start_pass(self, public: np.ndarray, now: float | None = None) -> dict[int, ServerMessage]:
        """Open the next pass for the survivors of the last one (every sender of shares for the
        first), all seeing the same ``public`` value; returns the PassStart for each."""
        if self.state is not ServerState.RUNNING or not self.awaiting_pass:
            raise LocalProtocolError("start_pass is only valid while a multi-pass group waits for its next pass")
        p = self.pass_index + 1
        eligible = self._u2 if p == 1 else self._u3 - self._root_recovered
        for u in sorted(self.alive - eligible):
            self.drop(u, DropReason.NOT_A_MEMBER, f"not a survivor of pass {p - 1}")
        participants = frozenset(self.alive & eligible)
        if len(participants) < self.config.threshold:
            raise self._abort(f"only {len(participants)} clients can take part in pass {p}, threshold is {self.config.threshold}")
        start = PassStart(p, participants, np.array(public, dtype=np.float64))
        self.pass_index, self.awaiting_pass, self._participants, self._pass_binding = p, False, participants, start.digest
        for ph in (Phase.MASKED_INPUT, Phase.CONSISTENCY_CHECK, Phase.UNMASKING):
            self.received[ph] = {}
        self._sum = np.zeros(self.config.dim, dtype=self.config.dtype)
        self._u3, self._request, self.result = frozenset(), None, None
        if self.budget is not None and now is not None:
            self.deadline = now + self.budget.for_group(Phase.MASKED_INPUT, self.config)
        return {u: start for u in sorted(participants)}

    def pass_peers(self, u: int) -> frozenset[int]:
        """Whom u masked with this pass: its neighbours among this pass's participants."""
        return self.neighbors[u] & self._participants

    def _on_pass_unmasking(self, msg: UnmaskResponse) -> None:
        u, req = msg.index, self._request
        assert req is not None
        want_root = req.recover & self.holders(u) - {u}
        want_s = req.dropped & self.neighbors[u]
        want_pairs = req.dropped_pairs & self.pass_peers(u)
        got_root = [o for o, _ in msg.self_mask_shares]
        got_s = [o for o, _ in msg.mask_key_shares]
        got_pairs = [o for o, _ in msg.pair_seeds]
        if sorted(got_root) != sorted(want_root) or sorted(got_s) != sorted(want_s) or sorted(got_pairs) != sorted(want_pairs):
            raise self._reject(u, DropReason.MALFORMED, f"client {u}: expected self-mask root shares of {sorted(want_root)}, mask-key "
                               f"shares of {sorted(want_s)} and pass-{self.pass_index} pair seeds with {sorted(want_pairs)}")
        for _, share in msg.self_mask_shares + msg.mask_key_shares:
            if len(share) != shamir.SHARE_BYTES or share[0] > 1:
                raise self._reject(u, DropReason.MALFORMED, f"client {u}: a share is not a field element")
        if any(len(seed) != prg.SEED_BYTES for _, seed in msg.pair_seeds):
            raise self._reject(u, DropReason.MALFORMED, f"client {u}: a pair seed is not {prg.SEED_BYTES} bytes")
        committed = self._pass_commitments[u][self.pass_index - 1]
        if signatures.pass_seed_commitment(self.config.digest, u, self.pass_index, msg.own_seed) != committed:
            raise self._reject(u, DropReason.MALFORMED, f"client {u}: its pass-{self.pass_index} self-mask seed does not match its commitment")

    def _unmask_pass(self) -> AggregateResult:
        """Pass p's sum: each survivor's pass-p self mask from its own seed (or, for one that sent
        its input and did not sign, from its reconstructed root); a member that dropped before its
        input has its pass-p pair masks removed, from its mask key if no pass of it was ever
        unmasked, else from the pair seeds its peers reveal."""
        cfg, p, req = self.config, self.pass_index, self._request
        assert req is not None
        responses: dict[int, UnmaskResponse] = self.received[Phase.UNMASKING]  # type: ignore[assignment]
        tag, session = cfg.pass_tag(p), cfg.digest
        total = self._sum.copy()
        roots, keys = _by_owner(responses, "self_mask_shares"), _by_owner(responses, "mask_key_shares")
        self.unmask_expansions = len(self._u3) + sum(len(self._u3 & self.neighbors[v]) for v in req.dropped | req.dropped_pairs)
        for u in sorted(self._u3):
            if u in responses:
                seed = responses[u].own_seed
            elif u in req.recover:
                root = self._recover_secret(u, roots.get(u, {}), "self-mask root",
                                            lambda b, u=u, c=self._commitments[u]: signatures.self_mask_commitment(session, u, b) == c)
                seed = pass_self_seed(root, session=session, index=u, pass_tag=tag)
                self._root_recovered.add(u)
            else:
                raise self._abort(f"client {u} sent pass {p}'s input but neither revealed its pass seed nor can it be recovered "
                                  "(it signed, then left); group aborted")
            prg.accumulate(total, seed, subtract=True)
        for v in sorted(req.dropped):
            public = self._u1[v].s_public
            s_private = self._recover_secret(v, keys.get(v, {}), "mask key", lambda k, pk=public: KeyPair.from_private(k).public == pk)
            peers = {w: self._u1[w].s_public for w in sorted(self._u3 & self.neighbors[v])}
            for w, seed in pair_keys(s_private, peers, session=session, purpose=Purpose.MASK_SEED, u=v, pass_tag=tag).items():
                prg.accumulate(total, seed, subtract=v > w)
        for v in sorted(req.dropped_pairs):
            for w in sorted(self._u3 & self.neighbors[v]):
                seed = dict(responses[w].pair_seeds).get(v) if w in responses else None
                if seed is None:
                    raise self._abort(f"pass {p}: client {v} left before its input and client {w} after its own; their pair mask "
                                      "cannot be removed without unmasking an earlier pass; group aborted")
                prg.accumulate(total, seed, subtract=v > w)
        self._ever_survived |= self._u3
        dropped = {i: (ph, r.value) for i, (ph, r, _) in self.dropouts.items()}
        return AggregateResult(total=total, survivors=self._u3, responders=frozenset(responses), dropped=dropped)

    def _recover_secret(self, owner: int, shares: dict[int, bytes], what: str, valid: Callable[[bytes], bool]) -> bytes:
        """The first t responders (one Lagrange set for most owners); if the result fails its
        check (commitment or public key), swap each of them for a spare responder.  The check is
        cryptographic, so a recovered secret is the right one; which responder lied is not
        always decidable (a shift can cancel in another subset), so none is blamed."""
        t = self.config.threshold
        cache = self._coeff_cache

        def combine(xs: tuple[int, ...]) -> bytes | None:
            if xs not in cache:
                cache[xs] = shamir.lagrange_at_zero(xs)
            try:
                return shamir.combine(cache[xs], {x: int.from_bytes(shares[x], "big") for x in xs})
            except ValueError:
                return None

        ordered = sorted(shares)
        if len(ordered) < t:
            raise self._abort(f"only {len(ordered)} shares of client {owner}'s {what}, threshold is {t}")
        first = tuple(ordered[:t])
        secret = combine(first)
        if secret is not None and valid(secret):
            return secret
        for spare in ordered[t:]:
            for liar in first:
                xs = tuple(sorted((set(first) - {liar}) | {spare}))
                secret = combine(xs)
                if secret is not None and valid(secret):
                    self.inconsistent[owner] = f"inconsistent shares of client {owner}'s {what}; recovered from responders {list(xs)}"
                    return secret
        raise self._abort(f"client {owner}'s {what} does not match its commitment from any set of responders "
                          "(bad shares, or the owner lied); group aborted rather than release a corrupt sum")

    # -- unmasking -----------------------------------------------------------------------
    def _unmask(self) -> AggregateResult:
        responses: dict[int, UnmaskResponse] = self.received[Phase.UNMASKING]  # type: ignore[assignment]
        b_shares, s_shares = _by_owner(responses, "self_mask_shares"), _by_owner(responses, "mask_key_shares")
        recover = self._recover_secret
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


def _by_owner(responses: Mapping[int, UnmaskResponse], kind: str) -> dict[int, dict[int, bytes]]:
    """owner -> {responder: its share of the owner's secret} for one kind of share."""
    out: dict[int, dict[int, bytes]] = {}
    for r in responses.values():
        for owner, share in getattr(r, kind):
            out.setdefault(owner, {})[r.index] = share
    return out
