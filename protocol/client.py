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

from . import aead, graph, prg, shamir, signatures
from .errors import AbortError, LocalProtocolError, RemoteProtocolError
from .keys import KeyPair, Purpose, generate_keypair, pair_keys, pair_secrets, pair_seed, pass_self_seed
from .policy import ClientPolicy
from .messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShare,
    GroupConfig,
    KeysBroadcast,
    MaskedInput,
    Mode,
    PassStart,
    ShareKeys,
    SharesDelivery,
    UnmaskRequest,
    UnmaskResponse,
)


class ClientState(enum.Enum):
    READY = "ready"
    ADVERTISED = "advertised"
    SHARED = "shared"
    DELIVERED = "delivered"   # multi-pass: shares held, waiting for a pass to open
    MASKED = "masked"
    SIGNED = "signed"
    BETWEEN_PASSES = "between-passes"   # multi-pass: a pass unmasked, the next not yet open
    DONE = "done"
    ABORTED = "aborted"


# method -> (states it is valid in, state it leads to).  The only table of transitions.
TRANSITIONS: dict[str, tuple[frozenset[ClientState], ClientState]] = {
    "advertise_keys": (frozenset({ClientState.READY}), ClientState.ADVERTISED),
    "share_keys": (frozenset({ClientState.ADVERTISED}), ClientState.SHARED),
    "masked_input": (frozenset({ClientState.SHARED}), ClientState.MASKED),
    "receive_shares": (frozenset({ClientState.SHARED}), ClientState.DELIVERED),
    "pass_input": (frozenset({ClientState.DELIVERED, ClientState.BETWEEN_PASSES}), ClientState.MASKED),
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
        contribution: bytes,
        identity_key: bytes | None = None,
        trusted_identities: Collection[bytes] | None = None,
        pinned_identities: Mapping[int, bytes] | None = None,
        policy: ClientPolicy | None = None,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """``contribution`` is the 32 random bytes whose commitment this client sent before the
        configuration existed; ``policy`` (ClientPolicy() by default) is checked first, before
        any key, graph or vector exists."""
        self.policy = ClientPolicy() if policy is None else policy
        pinned = bool(trusted_identities is not None or pinned_identities)
        self.policy.check(config, pinned=pinned)          # raises PolicyViolation (an AbortError)
        if not 1 <= index <= config.members:
            raise LocalProtocolError(f"index {index} outside 1..{config.members}")
        if len(contribution) != 32:
            raise LocalProtocolError(f"a contribution is 32 random bytes, got {len(contribution)}")
        if graph.commit_contribution(contribution) != config.commitments[index - 1]:
            raise AbortError(f"client {index}: the round configuration does not carry our commitment at our seat "
                             "(replayed or forged configuration)")
        if config.mode is Mode.ACTIVE and identity_key is None:
            raise LocalProtocolError("active mode needs the client's Ed25519 identity key")
        self.config = config
        self.index = index
        self.state = ClientState.READY
        self._contribution = contribution
        self._identity_key = identity_key
        self._trusted = None if trusted_identities is None else frozenset(trusted_identities)
        self._pinned = None if pinned_identities is None else dict(pinned_identities)  # index -> key, out of band
        self._randbytes = randbytes
        # SecAgg+: the ring depends on the contributions opened with the keys, so it is known
        # only at share_keys; the complete graph is known now.
        self.neighbors: frozenset[int] = frozenset() if config.sparse else frozenset(range(1, config.members + 1)) - {index}
        self._c: KeyPair | None = None
        self._s: KeyPair | None = None
        self._self_seed = b""
        self._peers: dict[int, AdvertiseKeys] = {}          # U1 ∩ neighbours (and self)
        self._u1: frozenset[int] = frozenset()              # every member whose keys the server says it forwarded
        self._u2: frozenset[int] = frozenset()              # neighbours that sent us shares (and self)
        self._held_b: dict[int, bytes] = {}                 # owner -> our share of b_owner
        self._held_s: dict[int, bytes] = {}                 # owner -> our share of s_owner
        self._share_keys: dict[int, bytes] = {}             # peer -> AEAD key for shares, both ways
        self._mask_seeds: dict[int, bytes] = {}             # peer -> pairwise mask seed s_uv
        self._survivors: frozenset[int] | None = None        # U3 as signed in active mode
        # multi-pass state: what was revealed about whom stays true for the rest of the round
        self._secrets: dict[int, bytes] = {}                # peer -> raw X25519 secret (every pass's seeds come from it)
        self.pass_index = 0                                 # the pass in progress (0: none yet)
        self._pass_peers: frozenset[int] = frozenset()      # whom we masked with this pass
        self._pass_binding = b""                            # public_digest of this pass
        self._ever_survived: set[int] = set()               # in some pass's U3: their self seeds are out, never their mask key
        self._revealed_root: set[int] = set()               # we sent shares of their self-mask root: never anything pairwise
        self._revealed_pairwise: set[int] = set()           # we revealed mask-key shares or pair seeds: never their root, out of later passes

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
            msg = signatures.keys_message(self.config.digest, self.index, self._c.public, self._s.public)
            sig, ident = signatures.sign(self._identity_key, msg), signatures.public_key(self._identity_key)
        return AdvertiseKeys(self.index, self._c.public, self._s.public, sig, ident, self._contribution)

    # -- round 1: share keys -----------------------------------------------------------
    def share_keys(self, broadcast: KeysBroadcast) -> ShareKeys:
        return self._checked("share_keys", lambda: self._share(broadcast))  # type: ignore[return-value]

    def _share(self, broadcast: KeysBroadcast) -> ShareKeys:
        assert self._c is not None and self._s is not None
        cfg = self.config
        if cfg.sparse:
            self._place_on_ring(broadcast.contributions)
        else:
            self._u1 = frozenset(k.index for k in broadcast.keys)
        peers: dict[int, AdvertiseKeys] = {}
        for k in broadcast.keys:
            if not 1 <= k.index <= cfg.members:
                raise self._abort(f"server sent keys for index {k.index}, outside 1..{cfg.members}")
            if k.index in peers:
                raise self._abort(f"server sent two key sets for client {k.index}")
            if k.index in self._holders:
                if k.index not in self._u1:
                    raise self._abort(f"server sent keys of client {k.index} but no opened contribution for it")
                peers[k.index] = k
        mine = peers.get(self.index)
        if mine is None or (mine.c_public, mine.s_public) != (self._c.public, self._s.public):
            raise self._abort("server did not echo our own keys unchanged")
        publics = [p.c_public for p in peers.values()] + [p.s_public for p in peers.values()]
        if len(set(publics)) != len(publics):
            raise self._abort("two advertised public keys are equal; refusing (possible key substitution)")
        if cfg.mode is Mode.ACTIVE:
            identities = [p.identity for p in peers.values()]
            if len(set(identities)) != len(identities):
                raise self._abort("one identity key signs for several members; refusing (a sybil fills the group)")
            for p in peers.values():
                if self._pinned is not None and self._pinned.get(p.index) != p.identity:
                    raise self._abort(f"client {p.index}'s identity key is not the one pinned for that member")
                if self._trusted is not None and p.identity not in self._trusted:
                    raise self._abort(f"client {p.index}'s identity key is not one we trust")
                signatures.verify(p.identity, p.signature, signatures.keys_message(cfg.digest, p.index, p.c_public, p.s_public), index=p.index)
        if len(peers) < self.config.threshold:
            raise self._abort(f"only {len(peers)} of our share holders advertised keys, threshold is {self.config.threshold}")
        self._peers = peers
        # Key agreement happens as soon as the keys arrive, so the masked-input phase, the one
        # that holds the user's data, does nothing but PRG expansions and additions.
        others = {v: p for v, p in peers.items() if v != self.index}
        session = self.config.digest
        try:
            self._share_keys = pair_keys(self._c.private, {v: p.c_public for v, p in others.items()}, session=session, purpose=Purpose.SHARE_ENCRYPTION, u=self.index)
            if cfg.multipass:
                self._secrets = pair_secrets(self._s.private, {v: p.s_public for v, p in others.items()})
            else:
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
            ct = aead.seal(self._share_keys[v], plaintext, session=session, sender=self.index, receiver=v, nonce=self._randbytes(aead.NONCE_BYTES))
            out.append(EncryptedShare(self.index, v, ct))
        pass_commitments = tuple(signatures.pass_seed_commitment(session, self.index, p, self._pass_seed(p))
                                 for p in range(1, cfg.passes + 1)) if cfg.multipass else ()
        return ShareKeys(self.index, tuple(out), signatures.self_mask_commitment(session, self.index, self._self_seed), pass_commitments)

    def _pass_seed(self, p: int) -> bytes:
        return pass_self_seed(self._self_seed, session=self.config.digest, index=self.index, pass_tag=self.config.pass_tag(p))

    def _place_on_ring(self, contributions: tuple[bytes, ...]) -> None:
        """SecAgg+: check every opened contribution against its commitment, then find our neighbours."""
        cfg = self.config
        if len(contributions) != cfg.members:
            raise self._abort(f"server sent {len(contributions)} contributions for {cfg.members} members")
        opened = {}
        for seat, value in enumerate(contributions, start=1):
            if not value:
                continue
            if len(value) != 32 or graph.commit_contribution(value) != cfg.commitments[seat - 1]:
                raise self._abort(f"member {seat}'s contribution does not open its commitment (forged ring)")
            opened[seat] = value
        if opened.get(self.index) != self._contribution:
            raise self._abort("server did not forward our own contribution")
        self._u1 = frozenset(opened)
        self.neighbors = graph.neighbourhood(graph.ring_order(cfg, opened), cfg.degree, self.index)

    # -- round 2: masked input ---------------------------------------------------------
    def masked_input(self, delivery: SharesDelivery, encoded: np.ndarray) -> MaskedInput:
        return self._checked("masked_input", lambda: self._mask(delivery, encoded))  # type: ignore[return-value]

    def _mask(self, delivery: SharesDelivery, encoded: np.ndarray) -> MaskedInput:
        self._check_encoded(encoded)
        senders = self._take_shares(delivery, multipass=False)
        y = encoded.copy()
        add_masks(y, self._self_seed, {v: self._mask_seeds[v] for v in senders}, self.index)
        return MaskedInput(self.index, y)

    def _check_encoded(self, encoded: np.ndarray) -> None:
        cfg = self.config
        if encoded.shape != (cfg.dim,) or encoded.dtype != cfg.dtype:
            raise LocalProtocolError(f"encoded input must be {cfg.dim} words of {cfg.dtype}, got {encoded.shape} {encoded.dtype}")

    def _take_shares(self, delivery: SharesDelivery, *, multipass: bool) -> set[int]:
        """Open and keep the shares our neighbours sent us (U2); returns who sent them."""
        assert self._c is not None and self._s is not None
        cfg = self.config
        if multipass != cfg.multipass:
            raise LocalProtocolError("a multi-pass round takes receive_shares, then pass_input for each pass" if cfg.multipass
                                     else "receive_shares is for multi-pass rounds; a single pass takes masked_input")
        if delivery.receiver != self.index:
            raise self._abort(f"share delivery addressed to client {delivery.receiver}")
        senders: set[int] = set()
        for es in delivery.shares:
            v = es.sender
            if es.receiver != self.index or v not in self._peers or v == self.index or v in senders:
                raise self._abort(f"unexpected share from client {v} to {es.receiver}")
            plain = aead.open_(self._share_keys[v], es.ciphertext, session=cfg.digest, sender=v, receiver=self.index)
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise RemoteProtocolError(f"share plaintext from client {v} has the wrong length", index=v)
            self._held_b[v], self._held_s[v] = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
            senders.add(v)
        self._u2 = frozenset(senders | {self.index})
        if len(self._u2) < cfg.threshold:
            raise self._abort(f"only {len(self._u2)} share holders remain, threshold is {cfg.threshold}")
        return senders

    # -- multi-pass: shares once, then one masked input per pass --------------------------
    def receive_shares(self, delivery: SharesDelivery) -> None:
        """Multi-pass: keep the shares; the first pass opens with a ``PassStart``."""
        self._checked("receive_shares", lambda: self._take_shares(delivery, multipass=True))

    def pass_input(self, start: PassStart, encoded: np.ndarray) -> MaskedInput:
        """Mask this pass's input (computed by the caller from its update and ``start.public``)
        with this pass's seeds: fresh masks each pass from the one key agreement."""
        return self._checked("pass_input", lambda: self._mask_pass(start, encoded))  # type: ignore[return-value]

    def _mask_pass(self, start: PassStart, encoded: np.ndarray) -> MaskedInput:
        cfg = self.config
        if not cfg.multipass:
            raise LocalProtocolError("pass_input is for multi-pass rounds")
        self._check_encoded(encoded)
        p = start.pass_index
        if p != self.pass_index + 1 or p > cfg.passes:
            raise self._abort(f"server opened pass {p}; the next pass is {self.pass_index + 1} of {cfg.passes}")
        if not np.all(np.isfinite(np.asarray(start.public, dtype=np.float64))):
            raise self._abort(f"pass {p}'s public value contains NaN or infinity")
        if self.index not in start.participants:
            raise self._abort(f"pass {p}'s participants do not include us")
        gone = sorted(start.participants & (self._revealed_root | self._revealed_pairwise))
        if gone:
            raise self._abort(f"pass {p} lists member(s) {gone[:5]} whose secrets we helped reveal in an earlier pass; refusing")
        peers = (start.participants & self._u2) - {self.index}
        if len(peers) + 1 < cfg.threshold:
            raise self._abort(f"pass {p} has {len(peers) + 1} of our share holders, threshold is {cfg.threshold}")
        self.pass_index, self._pass_peers, self._pass_binding = p, frozenset(peers), start.digest
        self._survivors = None
        tag = cfg.pass_tag(p)
        seeds = {v: pair_seed(self._secrets[v], session=cfg.digest, purpose=Purpose.MASK_SEED, u=self.index, v=v, pass_tag=tag) for v in peers}
        y = encoded.copy()
        add_masks(y, self._pass_seed(p), seeds, self.index)
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
        sig = signatures.sign(self._identity_key, self._consistency_message(self.index, request.survivors))
        return ConsistencySignature(self.index, sig)

    def _consistency_message(self, signer: int, survivors: frozenset[int]) -> bytes:
        keys = self._peers[signer]
        return signatures.consistency_message(self.config.digest, signer, keys.c_public, keys.s_public, survivors, self._u1, self._pass_binding)

    def _check_survivors(self, survivors: frozenset[int]) -> None:
        """Privacy floor: count only survivors that are members and hold our shares (U2)."""
        m = self.config.members
        strangers = sorted(i for i in survivors if not 1 <= i <= m)
        if strangers:
            raise self._abort(f"server's survivor set names indices {strangers[:5]} outside 1..{m}")
        if self.index not in survivors:
            raise self._abort("server's survivor set does not include us")
        local = survivors & self._u2
        if len(local) < self.policy.min_group_size:
            raise self._abort(f"only {len(local)} of the inputs summed are from members holding our shares, "
                              f"below our privacy floor of {self.policy.min_group_size}")
        if len(local) < self.config.threshold:
            raise self._abort(f"only {len(local)} of our share holders survived, threshold is {self.config.threshold}")

    # -- round 4: unmasking --------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        out = self._checked("unmask", lambda: self._reveal(request))
        if self.config.multipass and self.pass_index < self.config.passes:
            self.state = ClientState.BETWEEN_PASSES
        return out  # type: ignore[return-value]

    def _reveal(self, request: UnmaskRequest) -> UnmaskResponse:
        survivors, dropped = request.survivors, request.dropped
        both = survivors & (dropped | request.dropped_pairs)
        if both:
            raise self._abort(f"server asked for both shares of client(s) {sorted(both)}; refusing")
        if self.config.mode is Mode.ACTIVE:
            if self.state is not ClientState.SIGNED or survivors != self._survivors:
                raise self._abort("unmask request does not match the survivor set we signed")
            self._verify_consistency(request)
        self._check_survivors(survivors)
        if self.config.multipass:
            return self._reveal_pass(request)
        b = tuple((v, self._held_b[v]) for v in sorted(survivors & self._u2))
        s = tuple((v, self._held_s[v]) for v in sorted(dropped & self._u2 - {self.index}))
        return UnmaskResponse(self.index, b, s)

    def _verify_consistency(self, request: UnmaskRequest) -> None:
        valid = set()
        for cs in request.signatures:
            peer = self._peers.get(cs.index)
            if peer is None or cs.index not in request.survivors:
                continue  # not in our neighbourhood (we hold no keys for it), or not a survivor
            signatures.verify(peer.identity, cs.signature, self._consistency_message(cs.index, request.survivors), index=cs.index)
            valid.add(cs.index)
        if len(valid) < self.config.threshold:
            raise self._abort(f"only {len(valid)} valid consistency signatures from our neighbours, threshold is {self.config.threshold}")

    def _reveal_pass(self, request: UnmaskRequest) -> UnmaskResponse:
        """Multi-pass unmasking of pass p.  The rules that keep every pass's input hidden:
        our own pass-p seed only (never the root); a mask key only of a member never in any
        pass's survivors; pair seeds of this pass only; the self-mask root only of a survivor
        of this pass that did not sign, and then nothing pairwise about it ever after."""
        p, survivors = request.pass_index, request.survivors
        if p != self.pass_index:
            raise self._abort(f"unmask request for pass {p} during pass {self.pass_index}")
        if request.dropped & request.dropped_pairs:
            raise self._abort(f"server asked for two kinds of secret of client(s) {sorted(request.dropped & request.dropped_pairs)}")
        if not request.recover <= survivors:
            raise self._abort("server asked to recover the self-mask root of a member that sent no input this pass")
        if self.config.mode is Mode.ACTIVE and self.index in request.recover:
            raise self._abort("server asked to recover our own self-mask root although we signed")
        seen = sorted(request.dropped & (self._ever_survived | self._revealed_root))
        if seen:
            raise self._abort(f"server asked for the mask key of client(s) {seen[:5]}, whose self-mask seeds of an earlier pass "
                              "were revealed; refusing (it would unmask that input)")
        both = sorted((request.dropped | request.dropped_pairs) & self._revealed_root | request.recover & self._revealed_pairwise)
        if both:
            raise self._abort(f"server asked for a pairwise secret and the self-mask root of client(s) {both[:5]}; refusing")
        tag = self.config.pass_tag(p)
        s = tuple((v, self._held_s[v]) for v in sorted(request.dropped & self._u2 - {self.index}))
        pairs = tuple((v, pair_seed(self._secrets[v], session=self.config.digest, purpose=Purpose.MASK_SEED, u=self.index, v=v, pass_tag=tag))
                      for v in sorted(request.dropped_pairs & self._pass_peers))
        roots = tuple((v, self._held_b[v]) for v in sorted(request.recover & self._u2 - {self.index}))
        self._ever_survived |= survivors
        self._revealed_root |= request.recover
        self._revealed_pairwise |= request.dropped | request.dropped_pairs
        return UnmaskResponse(self.index, roots, s, self._pass_seed(p), pairs)
