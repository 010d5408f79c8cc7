"""The client side of one secure-aggregation instance, as a sans-I/O state machine.

Each method takes the server's message for a phase and returns the client's reply.  Any call
out of order raises LocalProtocolError; a request that would hurt the client's privacy raises
AbortError and leaves the machine in ABORTED.  Randomness (key pairs, seeds, share
polynomials, nonces) comes from the injected ``randbytes``, os.urandom by default.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Collection, Mapping

import numpy as np

from . import aead, graph, prg, shamir, signatures, thresholds
from .errors import AbortError, LocalProtocolError, RemoteProtocolError
from .keys import KeyPair, Purpose, generate_keypair, pair_keys
from .messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShare,
    GroupConfig,
    KeysBroadcast,
    MaskedInput,
    Mode,
    ShareKeys,
    SharesDelivery,
    UnmaskRequest,
    UnmaskResponse,
)


class ClientState(enum.Enum):
    READY = "ready"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    SIGNED = "signed"
    DONE = "done"
    ABORTED = "aborted"


# method -> (states it is valid in, state it leads to).  The only table of transitions.
TRANSITIONS: dict[str, tuple[frozenset[ClientState], ClientState]] = {
    "advertise_keys": (frozenset({ClientState.READY}), ClientState.ADVERTISED),
    "share_keys": (frozenset({ClientState.ADVERTISED}), ClientState.SHARED),
    "masked_input": (frozenset({ClientState.SHARED}), ClientState.MASKED),
    "consistency_check": (frozenset({ClientState.MASKED}), ClientState.SIGNED),
    "unmask": (frozenset({ClientState.MASKED, ClientState.SIGNED}), ClientState.DONE),
}


def add_masks(acc: np.ndarray, self_seed: bytes, pair_seeds: dict[int, bytes], index: int) -> None:
    """acc += PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv) mod 2^k, in place: one expansion per seed."""
    prg.accumulate(acc, self_seed)
    for v in sorted(pair_seeds):
        prg.accumulate(acc, pair_seeds[v], subtract=v < index)


def mask_vector(dim: int, dtype: np.dtype, self_seed: bytes, pair_seeds: dict[int, bytes], index: int) -> np.ndarray:
    """The mask alone (what ``masked_input`` adds to the encoded input)."""
    mask = np.zeros(dim, dtype=dtype)
    add_masks(mask, self_seed, pair_seeds, index)
    return mask


class ClientMachine:
    """One member (index 1..m) of one group's secure aggregation."""

    def __init__(
        self,
        config: GroupConfig,
        index: int,
        *,
        identity_key: bytes | None = None,
        trusted_identities: Collection[bytes] | None = None,
        pinned_identities: Mapping[int, bytes] | None = None,
        min_group_size: int = 2,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not 1 <= index <= config.members:
            raise LocalProtocolError(f"index {index} outside 1..{config.members}")
        if config.mode is Mode.ACTIVE and identity_key is None:
            raise LocalProtocolError("active mode needs the client's Ed25519 identity key")
        self.config = config
        self.index = index
        self.state = ClientState.READY
        self._identity_key = identity_key
        self._trusted = None if trusted_identities is None else frozenset(trusted_identities)
        self._pinned = None if pinned_identities is None else dict(pinned_identities)  # index -> key, out of band
        self._randbytes = randbytes
        self.neighbors = graph.build(config.members, config.neighbors, config.graph_seed)[index]
        holders = len(self.neighbors) + 1
        if config.members < min_group_size:
            raise AbortError(f"group of {config.members} is below this client's privacy floor of {min_group_size}")
        self._min_group = min_group_size
        t_min = thresholds.minimum(holders, config.mode)
        if not t_min <= config.threshold <= holders:
            raise AbortError(
                f"threshold {config.threshold} is unsafe for {holders} share holders in {config.mode.value} mode "
                f"(need {t_min}..{holders})"
            )
        self._c: KeyPair | None = None
        self._s: KeyPair | None = None
        self._self_seed = b""
        self._peers: dict[int, AdvertiseKeys] = {}          # U1 ∩ neighbours (and self)
        self._u2: frozenset[int] = frozenset()              # neighbours that sent us shares (and self)
        self._held_b: dict[int, bytes] = {}                 # owner -> our share of b_owner
        self._held_s: dict[int, bytes] = {}                 # owner -> our share of s_owner
        self._share_keys: dict[int, bytes] = {}             # peer -> AEAD key for shares, both ways
        self._mask_seeds: dict[int, bytes] = {}             # peer -> pairwise mask seed s_uv
        self._survivors: frozenset[int] | None = None        # U3 as signed in active mode

    # -- the state table ---------------------------------------------------------------
    def _enter(self, method: str) -> ClientState:
        valid, nxt = TRANSITIONS[method]
        if self.state not in valid:
            raise LocalProtocolError(f"client {self.index}: {method} is not allowed in state {self.state.value}")
        return nxt

    def _abort(self, message: str) -> AbortError:
        self.state = ClientState.ABORTED
        return AbortError(f"client {self.index}: {message}")

    def _checked(self, method: str, fn: Callable[[], object]) -> object:
        nxt = self._enter(method)
        try:
            out = fn()
        except (AbortError, RemoteProtocolError):
            self.state = ClientState.ABORTED
            raise
        self.state = nxt
        return out

    @property
    def _holders(self) -> frozenset[int]:
        return self.neighbors | {self.index}

    # -- round 0: advertise keys -------------------------------------------------------
    def advertise_keys(self) -> AdvertiseKeys:
        return self._checked("advertise_keys", self._advertise)  # type: ignore[return-value]

    def _advertise(self) -> AdvertiseKeys:
        self._c = generate_keypair(self._randbytes(32))
        self._s = generate_keypair(self._randbytes(32))
        sig, ident = b"", b""
        if self.config.mode is Mode.ACTIVE:
            assert self._identity_key is not None
            msg = signatures.keys_message(self.config.session, self.index, self._c.public, self._s.public)
            sig, ident = signatures.sign(self._identity_key, msg), signatures.public_key(self._identity_key)
        return AdvertiseKeys(self.index, self._c.public, self._s.public, sig, ident)

    # -- round 1: share keys -----------------------------------------------------------
    def share_keys(self, broadcast: KeysBroadcast) -> ShareKeys:
        return self._checked("share_keys", lambda: self._share(broadcast))  # type: ignore[return-value]

    def _share(self, broadcast: KeysBroadcast) -> ShareKeys:
        assert self._c is not None and self._s is not None
        peers: dict[int, AdvertiseKeys] = {}
        for k in broadcast.keys:
            if k.index in peers:
                raise self._abort(f"server sent two key sets for client {k.index}")
            if k.index in self._holders:
                peers[k.index] = k
        mine = peers.get(self.index)
        if mine is None or (mine.c_public, mine.s_public) != (self._c.public, self._s.public):
            raise self._abort("server did not echo our own keys unchanged")
        publics = [p.c_public for p in peers.values()] + [p.s_public for p in peers.values()]
        if len(set(publics)) != len(publics):
            raise self._abort("two advertised public keys are equal; refusing (possible key substitution)")
        if self.config.mode is Mode.ACTIVE:
            identities = [p.identity for p in peers.values()]
            if len(set(identities)) != len(identities):
                raise self._abort("one identity key signs for several members; refusing (a sybil fills the group)")
            for p in peers.values():
                if self._pinned is not None and self._pinned.get(p.index) != p.identity:
                    raise self._abort(f"client {p.index}'s identity key is not the one pinned for that member")
                if self._trusted is not None and p.identity not in self._trusted:
                    raise self._abort(f"client {p.index}'s identity key is not one we trust")
                signatures.verify(p.identity, p.signature, signatures.keys_message(self.config.session, p.index, p.c_public, p.s_public), index=p.index)
        if len(peers) < self.config.threshold:
            raise self._abort(f"only {len(peers)} of our share holders advertised keys, threshold is {self.config.threshold}")
        self._peers = peers
        # Key agreement happens as soon as the keys arrive, so the masked-input phase, the one
        # that holds the user's data, does nothing but PRG expansions and additions.
        others = {v: p for v, p in peers.items() if v != self.index}
        session = self.config.session
        try:
            self._share_keys = pair_keys(self._c.private, {v: p.c_public for v, p in others.items()}, session=session, purpose=Purpose.SHARE_ENCRYPTION, u=self.index)
            self._mask_seeds = pair_keys(self._s.private, {v: p.s_public for v, p in others.items()}, session=session, purpose=Purpose.MASK_SEED, u=self.index)
        except ValueError as exc:
            raise self._abort(str(exc)) from None
        self._self_seed = self._randbytes(prg.SEED_BYTES)
        holders = sorted(peers)
        table = shamir.split([self._self_seed, self._s.private], self.config.threshold, holders, self._randbytes)
        out = []
        for v in holders:
            b_share, s_share = table[v]
            plaintext = b_share.to_bytes() + s_share.to_bytes()
            if v == self.index:
                self._held_b[v], self._held_s[v] = b_share.to_bytes(), s_share.to_bytes()
                continue
            ct = aead.seal(self._share_keys[v], plaintext, session=self.config.session, sender=self.index, receiver=v, nonce=self._randbytes(aead.NONCE_BYTES))
            out.append(EncryptedShare(self.index, v, ct))
        return ShareKeys(self.index, tuple(out), signatures.self_mask_commitment(self.config.session, self.index, self._self_seed))

    # -- round 2: masked input ---------------------------------------------------------
    def masked_input(self, delivery: SharesDelivery, encoded: np.ndarray) -> MaskedInput:
        return self._checked("masked_input", lambda: self._mask(delivery, encoded))  # type: ignore[return-value]

    def _mask(self, delivery: SharesDelivery, encoded: np.ndarray) -> MaskedInput:
        assert self._c is not None and self._s is not None
        cfg = self.config
        if encoded.shape != (cfg.dim,) or encoded.dtype != cfg.dtype:
            raise LocalProtocolError(f"encoded input must be {cfg.dim} words of {cfg.dtype}, got {encoded.shape} {encoded.dtype}")
        if delivery.receiver != self.index:
            raise self._abort(f"share delivery addressed to client {delivery.receiver}")
        senders: set[int] = set()
        for es in delivery.shares:
            v = es.sender
            if es.receiver != self.index or v not in self._peers or v == self.index or v in senders:
                raise self._abort(f"unexpected share from client {v} to {es.receiver}")
            plain = aead.open_(self._share_keys[v], es.ciphertext, session=cfg.session, sender=v, receiver=self.index)
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise RemoteProtocolError(f"share plaintext from client {v} has the wrong length", index=v)
            self._held_b[v], self._held_s[v] = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
            senders.add(v)
        self._u2 = frozenset(senders | {self.index})
        if len(self._u2) < cfg.threshold:
            raise self._abort(f"only {len(self._u2)} share holders remain, threshold is {cfg.threshold}")
        y = encoded.copy()
        add_masks(y, self._self_seed, {v: self._mask_seeds[v] for v in senders}, self.index)
        return MaskedInput(self.index, y)

    # -- round 3 (active mode): consistency check ---------------------------------------
    def consistency_check(self, request: ConsistencyRequest) -> ConsistencySignature:
        return self._checked("consistency_check", lambda: self._sign_survivors(request))  # type: ignore[return-value]

    def _sign_survivors(self, request: ConsistencyRequest) -> ConsistencySignature:
        if self.config.mode is not Mode.ACTIVE:
            raise LocalProtocolError("the consistency check only runs in active mode")
        self._check_survivors(request.survivors)
        self._survivors = request.survivors
        assert self._identity_key is not None
        sig = signatures.sign(self._identity_key, signatures.consistency_message(self.config.session, request.survivors))
        return ConsistencySignature(self.index, sig)

    def _check_survivors(self, survivors: frozenset[int]) -> None:
        if self.index not in survivors:
            raise self._abort("server's survivor set does not include us")
        if len(survivors) < self._min_group:
            raise self._abort(f"only {len(survivors)} inputs would be summed, below our privacy floor of {self._min_group}")
        local = survivors & self._u2
        if len(local) < self.config.threshold:
            raise self._abort(f"only {len(local)} of our share holders survived, threshold is {self.config.threshold}")

    # -- round 4: unmasking --------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        return self._checked("unmask", lambda: self._reveal(request))  # type: ignore[return-value]

    def _reveal(self, request: UnmaskRequest) -> UnmaskResponse:
        survivors, dropped = request.survivors, request.dropped
        both = survivors & dropped
        if both:
            raise self._abort(f"server asked for both shares of client(s) {sorted(both)}; refusing")
        if self.config.mode is Mode.ACTIVE:
            if self.state is not ClientState.SIGNED or survivors != self._survivors:
                raise self._abort("unmask request does not match the survivor set we signed")
            self._verify_consistency(request)
        self._check_survivors(survivors)
        b = tuple((v, self._held_b[v]) for v in sorted(survivors & self._u2))
        s = tuple((v, self._held_s[v]) for v in sorted(dropped & self._u2))
        return UnmaskResponse(self.index, b, s)

    def _verify_consistency(self, request: UnmaskRequest) -> None:
        msg = signatures.consistency_message(self.config.session, request.survivors)
        valid = set()
        for cs in request.signatures:
            peer = self._peers.get(cs.index)
            if peer is None:
                continue  # not in our neighbourhood: we hold no identity for it
            signatures.verify(peer.identity, cs.signature, msg, index=cs.index)
            valid.add(cs.index)
        if len(valid & request.survivors) < self.config.threshold:
            raise self._abort(f"only {len(valid)} valid consistency signatures, threshold is {self.config.threshold}")
