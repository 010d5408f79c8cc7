"""Attacks by a hostile server on the client's policy and bindings, at the machine level.

Each test performs the attack against the real ``ClientMachine`` (and the real ``ServerMachine``
where it helps) and asserts the precise refusal: mode downgrades, thresholds and degrees below
the floors, oversized groups, replayed signatures and configurations, padded survivor sets,
and a steered or forged SecAgg+ ring.  The honest rounds at the end check that the default
policy still lets correct configurations through, exactly, with dropouts at every phase.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping

import numpy as np
import pytest
from secagg.protocol import graph, signatures, thresholds
from secagg.protocol.client import ClientMachine, ClientState
from secagg.protocol.driver import deterministic_randbytes, run_group
from secagg.protocol.errors import AbortError, DropReason, RemoteProtocolError
from secagg.protocol.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    GroupConfig,
    KeysBroadcast,
    MaskedInput,
    Mode,
    Phase,
    ShareKeys,
    SharesDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from secagg.protocol.policy import ClientPolicy, PolicyViolation
from secagg.protocol.server import ServerMachine, ServerState

SEMI, ACTIVE = Mode.SEMI_HONEST, Mode.ACTIVE
SESSION = b"round-0001-group-01-session-bytes"
DIM = 6


# ============================================================================ helpers


def h(*parts: bytes) -> bytes:
    return hashlib.sha256(b"|".join(parts)).digest()


def seat(i: int) -> bytes:
    return i.to_bytes(4, "big")


class Counting:
    """A randbytes that counts its calls (deterministic, so runs are reproducible)."""

    def __init__(self, seed: bytes = b"counting") -> None:
        self.calls = 0
        self._rb = deterministic_randbytes(h(seed))

    def __call__(self, n: int) -> bytes:
        self.calls += 1
        return self._rb(n)


def contributions_for(m: int, tag: bytes) -> dict[int, bytes]:
    return {i: h(b"contribution", tag, seat(i)) for i in range(1, m + 1)}


def make_config(m: int, mode: Mode = ACTIVE, *, k: int | None = None, t: int | None = None, dim: int = DIM,
                session: bytes = SESSION, tag: bytes = b"A") -> tuple[GroupConfig, dict[int, bytes]]:
    """A config carrying every member's commitment, and the contributions that open them."""
    contributions = contributions_for(m, tag)
    holders = m if k is None or k >= m - 1 else k + 1
    threshold = thresholds.minimum(holders, mode) if t is None else t
    commitments = tuple(graph.commit_contribution(contributions[i]) for i in range(1, m + 1))
    cfg = GroupConfig(session=session, members=m, threshold=threshold, dim=dim, mode=mode, neighbors=k, commitments=commitments)
    return cfg, contributions


def identity(i: int, tag: bytes = b"id") -> bytes:
    return h(b"identity", tag, seat(i))


def assert_violation(exc: PolicyViolation, setting: str, offered: object, required: str) -> None:
    """The refusal names the setting and both values (what was offered, what the policy requires)."""
    assert isinstance(exc, AbortError)
    assert (exc.setting, exc.offered, exc.required) == (setting, offered, required)
    assert f"{setting} is {offered}, policy requires {required}" in str(exc)


def refuse(cfg: GroupConfig, contribution: bytes | None = None, **kw: object) -> PolicyViolation:
    """Construct seat 1's machine, expecting a policy refusal before any randomness is drawn."""
    rb = Counting()
    with pytest.raises(PolicyViolation) as info:
        ClientMachine(cfg, 1, contribution=contribution if contribution is not None else bytes(32),
                      identity_key=identity(1), randbytes=rb, **kw)  # type: ignore[arg-type]
    assert rb.calls == 0, "randomness was drawn before the policy check"
    return info.value


def accept(cfg: GroupConfig, contributions: Mapping[int, bytes], **kw: object) -> ClientMachine:
    rb = Counting()
    c = ClientMachine(cfg, 1, contribution=contributions[1], identity_key=identity(1), randbytes=rb, **kw)  # type: ignore[arg-type]
    assert rb.calls == 0 and c.state is ClientState.READY   # keys are drawn at advertise_keys, not before
    return c


def wrapped_sum(inputs: Mapping[int, np.ndarray], who: frozenset[int] | set[int], cfg: GroupConfig) -> np.ndarray:
    total = np.zeros(cfg.dim, dtype=cfg.dtype)
    for i in who:
        total += inputs[i]
    return total


class Group:
    """A hand-driven group: real client machines, the real (honest) server, tamper hooks.

    ``down(i, msg)`` may replace what the server sends client i, ``up(i, msg)`` what client i
    sends the server.  Client refusals land in ``errors`` (and the client is dropped, as the
    transport would); server rejections in ``rejections``.
    """

    def __init__(self, m: int, mode: Mode = ACTIVE, *, k: int | None = None, t: int | None = None,
                 policy: ClientPolicy | None = None, tag: bytes = b"A", ids: bytes = b"id", seeds: bytes = b"rb",
                 session: bytes = SESSION) -> None:
        self.cfg, self.contributions = make_config(m, mode, k=k, t=t, session=session, tag=tag)
        self.keys = {i: identity(i, ids) for i in range(1, m + 1)}
        self.public = {i: signatures.public_key(key) for i, key in self.keys.items()}
        self.clients = {
            i: ClientMachine(self.cfg, i, contribution=self.contributions[i],
                             identity_key=self.keys[i] if mode is ACTIVE else None, policy=policy,
                             randbytes=deterministic_randbytes(h(seeds, seat(i))))
            for i in range(1, m + 1)
        }
        self.server = ServerMachine(self.cfg, identities=self.public if mode is ACTIVE else None)
        rng = np.random.default_rng(m)
        self.inputs = {i: rng.integers(0, 2**32, size=self.cfg.dim, dtype=np.uint32) for i in range(1, m + 1)}
        self.inbox: dict[int, object] = {i: None for i in self.clients}
        self.sent: dict[Phase, dict[int, object]] = {p: {} for p in Phase}
        self.errors: dict[int, Exception] = {}
        self.rejections: dict[int, RemoteProtocolError] = {}

    def act(self, i: int, msg: object) -> object:
        c, phase = self.clients[i], self.server.phase
        if phase is Phase.ADVERTISE_KEYS:
            return c.advertise_keys()
        if phase is Phase.SHARE_KEYS:
            return c.share_keys(msg)  # type: ignore[arg-type]
        if phase is Phase.MASKED_INPUT:
            return c.masked_input(msg, self.inputs[i])  # type: ignore[arg-type]
        if phase is Phase.CONSISTENCY_CHECK:
            return c.consistency_check(msg)  # type: ignore[arg-type]
        return c.unmask(msg)  # type: ignore[arg-type]

    def step(self, *, drop: frozenset[int] | set[int] = frozenset(), up: Callable | None = None,
             down: Callable | None = None) -> Phase:
        phase = self.server.phase
        for i in sorted(self.inbox):
            if i in drop:
                self.server.drop(i, DropReason.DISCONNECTED, f"vanished before {phase.label}")
                continue
            msg = self.inbox[i] if down is None else down(i, self.inbox[i])
            try:
                reply = self.act(i, msg)
            except (AbortError, RemoteProtocolError) as exc:
                self.errors[i] = exc
                self.server.drop(i, DropReason.ABORTED, str(exc))
                continue
            if up is not None:
                reply = up(i, reply)
            self.sent[phase][i] = reply
            try:
                self.server.receive(reply)  # type: ignore[arg-type]
            except RemoteProtocolError as exc:
                self.rejections[i] = exc
        self.inbox = dict(self.server.close_phase())
        return phase

    def through(self, last: Phase, **kw: object) -> None:
        """Run phases until ``last`` has closed (its replies are in ``inbox``)."""
        while self.step(**kw) is not last:  # type: ignore[arg-type]
            pass

    def resume(self) -> None:
        while self.server.state is ServerState.RUNNING:
            self.step()

    def advertised(self, i: int) -> AdvertiseKeys:
        msg = self.sent[Phase.ADVERTISE_KEYS][i]
        assert isinstance(msg, AdvertiseKeys)
        return msg


# ============================================================================ 1. mode downgrade


def test_semi_honest_round_is_refused_by_default_before_any_key_exists() -> None:
    cfg, contributions = make_config(6, SEMI)
    exc = refuse(cfg, contributions[1])
    assert_violation(exc, "mode", "semi-honest", "active (opt in with ClientPolicy.semi_honest())")
    # the same config in active mode is fine: the mode alone was the downgrade
    accept(dataclasses.replace(cfg, mode=ACTIVE, threshold=thresholds.minimum(6, ACTIVE)), contributions)


@pytest.mark.parametrize("pins", [
    {"trusted_identities": {signatures.public_key(identity(2))}},
    {"trusted_identities": frozenset()},
    {"pinned_identities": {2: signatures.public_key(identity(2))}},
], ids=["trusted", "trusted-empty", "pinned"])
def test_semi_honest_round_is_refused_even_with_the_opt_in_when_identities_are_pinned(pins: dict) -> None:
    """Semi-honest rounds carry no signatures: pinned or trusted identities would be silently unchecked."""
    cfg, contributions = make_config(6, SEMI)
    exc = refuse(cfg, contributions[1], policy=ClientPolicy.semi_honest(), **pins)
    assert_violation(exc, "mode", "semi-honest", "active: pinned identities are only checked in active mode")
    # the same pins in an active round are accepted
    active = dataclasses.replace(cfg, mode=ACTIVE, threshold=thresholds.minimum(6, ACTIVE))
    accept(active, contributions, policy=ClientPolicy.semi_honest(), **pins)


def test_semi_honest_opt_in_is_accepted_and_a_full_round_is_exact() -> None:
    cfg, contributions = make_config(6, SEMI)       # t = 4
    c = accept(cfg, contributions, policy=ClientPolicy.semi_honest())
    assert isinstance(c.advertise_keys(), AdvertiseKeys)
    rng = np.random.default_rng(5)
    inputs = {i: rng.integers(0, 2**32, size=DIM, dtype=np.uint32) for i in range(1, 7)}
    run = run_group(cfg, inputs, policy=ClientPolicy.semi_honest(), contributions=contributions,
                    drops={Phase.MASKED_INPUT: {2}})
    assert not run.aborted and not run.client_aborts and not run.rejections
    assert run.config == cfg and run.result is not None
    assert run.result.survivors == frozenset({1, 3, 4, 5, 6})
    assert np.array_equal(run.result.total, wrapped_sum(inputs, run.result.survivors, cfg))


# ============================================================================ 2. floors and bounds


@pytest.mark.parametrize("mode", list(Mode))
def test_threshold_below_the_active_floor_is_refused(mode: Mode) -> None:
    """t = n/2 + 1 is only a semi-honest threshold: refused by the default policy in both modes,
    even when semi-honest rounds are allowed but the threshold floor was left at its default."""
    m, t = 10, 10 // 2 + 1
    cfg, contributions = make_config(m, mode, t=t)
    active_floor = "7..10 for 10 share holders (active floor)"
    exc = refuse(cfg, contributions[1])
    if mode is ACTIVE:
        assert_violation(exc, "threshold", t, active_floor)
    else:
        assert_violation(exc, "mode", "semi-honest", "active (opt in with ClientPolicy.semi_honest())")
    assert_violation(refuse(cfg, contributions[1], policy=ClientPolicy(allow_semi_honest=True)), "threshold", t, active_floor)
    # ClientPolicy.semi_honest() lowers the floor for semi-honest rounds only: an active round
    # always needs the active floor
    if mode is SEMI:
        accept(cfg, contributions, policy=ClientPolicy.semi_honest())
    else:
        assert_violation(refuse(cfg, contributions[1], policy=ClientPolicy.semi_honest()), "threshold", t, active_floor)
    for bad in (1, 5 if mode is SEMI else 6, 11):
        low = dataclasses.replace(cfg, threshold=bad)
        floor = "6..10 for 10 share holders (semi-honest floor)" if mode is SEMI else active_floor
        assert_violation(refuse(low, contributions[1], policy=ClientPolicy.semi_honest()), "threshold", bad, floor)
    accept(dataclasses.replace(cfg, threshold=7), contributions, policy=ClientPolicy(allow_semi_honest=True))


def test_sybil_ring_with_a_degree_below_the_recommended_one_is_refused() -> None:
    """m = 30, k = 2: each client masks with two neighbours, so two sybils next to it reveal its
    input.  The default policy requires recommended_degree(30) = 16, or the complete graph."""
    m = 30
    rec = graph.recommended_degree(m)
    assert rec == 16
    for k in (2, 4, rec - 2):
        cfg, contributions = make_config(m, k=k)
        assert cfg.sparse and cfg.threshold == thresholds.minimum(k + 1, ACTIVE)
        exc = refuse(cfg, contributions[1])
        assert_violation(exc, "neighbors", k, f"at least {rec} for {m} members, or the complete graph (min_neighbors)")
    for k in (rec, rec + 2, m - 2, None, m, m + 10):   # None and k >= m - 1: the complete graph
        cfg, contributions = make_config(m, k=k)
        assert cfg.sparse is (k is not None and k < m - 1)
        accept(cfg, contributions)
    # an explicit relaxation lets the sparse ring through
    cfg, contributions = make_config(m, k=2)
    accept(cfg, contributions, policy=ClientPolicy(min_neighbors=2, min_group_size=3))
    # ...but not below the privacy floor: 3 share holders can never reach a floor of 5
    assert_violation(refuse(cfg, contributions[1], policy=ClientPolicy(min_neighbors=2)), "neighbors", 2,
                     "at least 4, so that 5 members hold our shares (min_group_size)")
    assert_violation(refuse(cfg, contributions[1], policy=ClientPolicy(min_neighbors=4)), "neighbors", 2,
                     f"at least 4 for {m} members, or the complete graph (min_neighbors)")


def test_group_below_min_group_size_is_refused() -> None:
    cfg, contributions = make_config(4)
    assert_violation(refuse(cfg, contributions[1]), "members", 4, "at least 5 (min_group_size)")
    accept(cfg, contributions, policy=ClientPolicy(min_group_size=4))
    cfg5, contributions5 = make_config(5)
    accept(cfg5, contributions5)
    assert_violation(refuse(cfg5, contributions5[1], policy=ClientPolicy(min_group_size=6)), "members", 5,
                     "at least 6 (min_group_size)")


def test_oversized_groups_and_vectors_are_refused_before_anything_is_allocated() -> None:
    """A billion members or 2^40 words: refused from the config's fields alone (no commitments
    are even looked at, no key drawn, nothing allocated)."""
    huge = GroupConfig(session=SESSION, members=10**9, threshold=10**9, dim=DIM)
    assert_violation(refuse(huge), "members", 10**9, "at most 10000 (max_members)")
    wide = GroupConfig(session=SESSION, members=6, threshold=5, dim=1 << 40)
    assert_violation(refuse(wide), "dim", 1 << 40, f"at most {1 << 25} words (max_dim)")
    # the bounds are the policy's
    cfg, contributions = make_config(51)
    assert_violation(refuse(cfg, contributions[1], policy=ClientPolicy(max_members=50)), "members", 51,
                     "at most 50 (max_members)")
    accept(cfg, contributions, policy=ClientPolicy(max_members=51))
    cfg, contributions = make_config(6, dim=101)
    assert_violation(refuse(cfg, contributions[1], policy=ClientPolicy(max_dim=100)), "dim", 101, "at most 100 words (max_dim)")
    accept(cfg, contributions, policy=ClientPolicy(max_dim=101))


def test_config_without_fresh_commitments_is_refused() -> None:
    cfg, contributions = make_config(6)
    bare = dataclasses.replace(cfg, commitments=())
    assert_violation(refuse(bare, contributions[1]), "commitments", 0, "one per member (6): no fresh contributions, no round")


def test_policy_settings_are_validated() -> None:
    for bad in ({"min_group_size": 1}, {"min_neighbors": 1}, {"max_members": 4}, {"max_dim": 0}):
        with pytest.raises(ValueError):
            ClientPolicy(**bad)  # type: ignore[arg-type]
    assert ClientPolicy().replace(min_group_size=7).min_group_size == 7
    assert ClientPolicy.semi_honest(min_group_size=3) == ClientPolicy(allow_semi_honest=True, threshold_floor=SEMI, min_group_size=3)


# ============================================================================ 3. replays


def test_consistency_signatures_harvested_in_round_a_are_refused_in_round_b() -> None:
    """Same members, same seats, same session bytes, even the same round keys (the clients'
    randomness is replayed too): only the fresh commitments differ, and they are in the digest."""
    a = Group(6, tag=b"round-A")
    a.through(Phase.CONSISTENCY_CHECK)
    harvested = a.inbox[1]
    assert isinstance(harvested, UnmaskRequest) and len(harvested.signatures) == 6
    b = Group(6, tag=b"round-B")
    assert b.cfg.session == a.cfg.session and b.cfg.digest != a.cfg.digest
    assert dataclasses.replace(b.cfg, commitments=a.cfg.commitments) == a.cfg
    # the server replays client 2's round-A signature to round B's server: rejected and dropped
    replay_2 = next(s for s in harvested.signatures if s.index == 2)
    b.through(Phase.CONSISTENCY_CHECK, up=lambda i, m: replay_2 if i == 2 and isinstance(m, ConsistencySignature) else m)
    assert b.rejections[2].reason is DropReason.BAD_SIGNATURE
    assert b.server.dropouts[2][:2] == (Phase.CONSISTENCY_CHECK, DropReason.BAD_SIGNATURE)
    for i in range(1, 7):   # identical round keys in both rounds: the digest is the only difference
        assert (a.advertised(i).c_public, a.advertised(i).s_public) == (b.advertised(i).c_public, b.advertised(i).s_public)
    genuine = b.inbox[3]
    assert isinstance(genuine, UnmaskRequest) and genuine.survivors == harvested.survivors == frozenset(range(1, 7))
    # the victim is shown round A's signatures instead of round B's
    victim = b.clients[3]
    with pytest.raises(RemoteProtocolError, match="signature of client 1 does not verify") as info:
        victim.unmask(UnmaskRequest(genuine.survivors, genuine.dropped, harvested.signatures))
    assert info.value.reason is DropReason.BAD_SIGNATURE and info.value.index == 1
    assert victim.state is ClientState.ABORTED
    # they are genuine signatures, just of round A
    k1 = a.advertised(1)
    assert harvested.signatures[0].index == 1
    signatures.verify(a.public[1], harvested.signatures[0].signature,
                      signatures.consistency_message(a.cfg.digest, 1, k1.c_public, k1.s_public, harvested.survivors,
                                                     frozenset(range(1, 7))), index=1)
    # round B's own signatures still unmask for the others
    assert isinstance(b.clients[4].unmask(genuine), UnmaskResponse)


def test_keys_signature_from_another_group_of_the_same_round_is_refused() -> None:
    """Two groups of one round with the same session bytes and seats: the server shows group 1's
    victim the (validly signed) keys of group 2's seat 4 as seat 4's."""
    g1 = Group(6, tag=b"group-1", ids=b"ids-1", seeds=b"rb-1")
    g2 = Group(6, tag=b"group-2", ids=b"ids-2", seeds=b"rb-2")
    assert g1.cfg.session == g2.cfg.session and g1.cfg.digest != g2.cfg.digest
    g1.step()
    g2.step()
    foreign = g2.advertised(4)
    signatures.verify(foreign.identity, foreign.signature,
                      signatures.keys_message(g2.cfg.digest, 4, foreign.c_public, foreign.s_public), index=4)
    b = g1.inbox[1]
    assert isinstance(b, KeysBroadcast)
    swapped = dataclasses.replace(b, keys=tuple(foreign if k.index == 4 else k for k in b.keys))
    with pytest.raises(RemoteProtocolError, match="signature of client 4 does not verify") as info:
        g1.clients[1].share_keys(swapped)
    assert info.value.reason is DropReason.BAD_SIGNATURE and info.value.index == 4
    assert g1.clients[1].state is ClientState.ABORTED
    # even pinned to the foreign identity (the server registered it for seat 4), the binding holds
    pinned = {i: g1.public[i] for i in range(1, 7)} | {4: foreign.identity}
    c2 = ClientMachine(g1.cfg, 2, contribution=g1.contributions[2], identity_key=g1.keys[2], pinned_identities=pinned,
                       randbytes=deterministic_randbytes(h(b"rb-1", seat(2))))
    c2.advertise_keys()
    b2 = g1.inbox[2]
    assert isinstance(b2, KeysBroadcast)
    with pytest.raises(RemoteProtocolError) as info:
        c2.share_keys(dataclasses.replace(b2, keys=tuple(foreign if k.index == 4 else k for k in b2.keys)))
    assert info.value.reason is DropReason.BAD_SIGNATURE and info.value.index == 4
    # group 1's server refuses it too: its contribution opens nothing here, and with group 1's
    # opening swapped in the signature does not verify
    s1 = ServerMachine(g1.cfg, identities=g1.public | {4: foreign.identity})
    with pytest.raises(RemoteProtocolError, match="contribution does not open its commitment") as info:
        s1.receive(foreign)
    assert info.value.reason is DropReason.MALFORMED
    s1 = ServerMachine(g1.cfg, identities=g1.public | {4: foreign.identity})
    with pytest.raises(RemoteProtocolError) as info:
        s1.receive(dataclasses.replace(foreign, contribution=g1.contributions[4]))
    assert info.value.reason is DropReason.BAD_SIGNATURE and 4 not in s1.alive


def _equivocation_setup() -> tuple[GroupConfig, dict[int, bytes], int, int]:
    """A SecAgg+ group (m = 8, k = 6 = recommended_degree(8)) and a member x such that the ring
    drawn without x's opening gives the victim (seat 1) the same neighbours as the true one:
    so the equivocation survives until the consistency check, which must catch it."""
    m, k, victim = 8, 6, 1
    for n in range(64):
        cfg, contributions = make_config(m, k=k, tag=b"equivocate-%d" % n)
        truth = graph.neighbourhood(graph.ring_order(cfg, contributions), k, victim)
        for x in range(2, m + 1):
            view = {i: c for i, c in contributions.items() if i != x}
            if graph.neighbourhood(graph.ring_order(cfg, view), k, victim) == truth:
                return cfg, contributions, victim, x
    raise AssertionError("no suitable ring found")


def test_consistency_signature_over_another_view_of_u1_is_refused() -> None:
    """SecAgg+: the server tells everyone but the victim that x sent no keys (its opening is
    withheld, so their ring is re-drawn), while the victim is shown x's keys.  The neighbours'
    consistency signatures bind the U1 they were shown, so the victim refuses them."""
    cfg, contributions, v, x = _equivocation_setup()
    m = cfg.members
    assert ClientPolicy().check(cfg) is None                  # the default policy accepts this group
    keys = {i: identity(i) for i in range(1, m + 1)}
    clients = {i: ClientMachine(cfg, i, contribution=contributions[i], identity_key=keys[i],
                                randbytes=deterministic_randbytes(h(b"eq", seat(i)))) for i in range(1, m + 1)}
    adv = {i: c.advertise_keys() for i, c in clients.items()}
    real = KeysBroadcast(tuple(adv[i] for i in sorted(adv)), tuple(contributions[i] for i in range(1, m + 1)))
    lie = KeysBroadcast(tuple(adv[i] for i in sorted(adv) if i != x),
                        tuple(b"" if i == x else contributions[i] for i in range(1, m + 1)))
    everyone = [i for i in range(1, m + 1) if i != x]         # x is told nothing more: it counts as gone
    shared = {i: clients[i].share_keys(real if i == v else lie) for i in everyone}
    u1_real, u1_lie = frozenset(range(1, m + 1)), frozenset(everyone)
    assert clients[v]._u1 == u1_real and all(clients[i]._u1 == u1_lie for i in everyone if i != v)
    for r in everyone:
        delivery = SharesDelivery(r, tuple(s for i in everyone for s in shared[i].shares if s.receiver == r))
        assert isinstance(clients[r].masked_input(delivery, np.zeros(DIM, dtype=np.uint32)), MaskedInput)
    u3 = frozenset(everyone)
    sigs = {i: clients[i].consistency_check(ConsistencyRequest(u3)) for i in everyone}
    first = min(n for n in clients[v].neighbors if n != x)
    with pytest.raises(RemoteProtocolError, match=f"signature of client {first} does not verify") as info:
        clients[v].unmask(UnmaskRequest(u3, frozenset(), tuple(sigs[i] for i in sorted(sigs))))
    assert info.value.reason is DropReason.BAD_SIGNATURE and info.value.index == first
    assert clients[v].state is ClientState.ABORTED
    # the refused signature is genuine, over the other view
    k_first = adv[first]
    signatures.verify(signatures.public_key(keys[first]), sigs[first].signature,
                      signatures.consistency_message(cfg.digest, first, k_first.c_public, k_first.s_public, u3, u1_lie),
                      index=first)
    # and the other side refuses the victim's signature (over the true U1)
    w = next(i for i in everyone if i != v and v in clients[i].neighbors)
    with pytest.raises(RemoteProtocolError, match=f"signature of client {v} does not verify") as info:
        clients[w].unmask(UnmaskRequest(u3, frozenset(), tuple(sigs[i] for i in sorted(sigs))))
    assert info.value.index == v


def test_config_replayed_from_an_earlier_round_is_refused_at_construction() -> None:
    old, old_contributions = make_config(6, tag=b"round-A")
    _, fresh = make_config(6, tag=b"round-B")
    rb = Counting()
    with pytest.raises(AbortError, match="does not carry our commitment at our seat") as info:
        ClientMachine(old, 1, contribution=fresh[1], identity_key=identity(1), randbytes=rb)
    assert not isinstance(info.value, PolicyViolation) and rb.calls == 0
    # our commitment, but at another seat
    moved = dataclasses.replace(old, commitments=(old.commitments[1], old.commitments[0], *old.commitments[2:]))
    with pytest.raises(AbortError, match="does not carry our commitment at our seat"):
        ClientMachine(moved, 1, contribution=old_contributions[1], identity_key=identity(1), randbytes=rb)
    assert rb.calls == 0
    ClientMachine(old, 1, contribution=old_contributions[1], identity_key=identity(1), randbytes=rb)


# ============================================================================ 4. privacy floor


def _masked(m: int, mode: Mode, policy: ClientPolicy, **kw: object) -> Group:
    g = Group(m, mode, policy=policy)
    g.through(Phase.MASKED_INPUT, **kw)  # type: ignore[arg-type]
    assert not g.errors and not g.rejections
    return g


@pytest.mark.parametrize("mode", list(Mode))
def test_survivor_set_padded_with_non_members_is_refused(mode: Mode) -> None:
    """Nine 'survivors' for a floor of 9, two of them indices that are not members at all."""
    policy = ClientPolicy(min_group_size=9) if mode is ACTIVE else ClientPolicy.semi_honest(min_group_size=9)
    g = _masked(9, mode, policy)
    padded = frozenset(range(1, 8)) | {500, 501}
    assert len(padded) == 9
    victim = g.clients[1]
    with pytest.raises(AbortError, match=r"names indices \[500, 501\] outside 1\.\.9"):
        if mode is ACTIVE:
            victim.consistency_check(ConsistencyRequest(padded))       # refused before signing
        else:
            victim.unmask(UnmaskRequest(padded, frozenset({8, 9})))    # refused before revealing
    assert victim.state is ClientState.ABORTED
    with pytest.raises(AbortError, match=r"names indices \[0\] outside 1\.\.9"):
        if mode is ACTIVE:
            g.clients[2].consistency_check(ConsistencyRequest(frozenset(range(0, 9))))
        else:
            g.clients[2].unmask(UnmaskRequest(frozenset(range(0, 9)), frozenset({9})))
    # the genuine survivor set is accepted by the others
    if mode is ACTIVE:
        assert isinstance(g.clients[3].consistency_check(ConsistencyRequest(frozenset(range(1, 10)))), ConsistencySignature)
    else:
        assert isinstance(g.clients[3].unmask(UnmaskRequest(frozenset(range(1, 10)), frozenset())), UnmaskResponse)


@pytest.mark.parametrize("mode", list(Mode))
def test_survivors_that_hold_none_of_our_shares_do_not_count_toward_the_floor(mode: Mode) -> None:
    """The server delivers the victim shares from only six others (t = 7 in active mode, so it
    still masks), then names all nine members as survivors: only seven hold its shares."""
    policy = ClientPolicy(min_group_size=9) if mode is ACTIVE else ClientPolicy.semi_honest(min_group_size=9)

    def starve(i: int, msg: object) -> object:
        if i == 1 and isinstance(msg, SharesDelivery):
            return SharesDelivery(1, tuple(s for s in msg.shares if s.sender not in (8, 9)))
        return msg

    g = _masked(9, mode, policy, down=starve)
    victim = g.clients[1]
    assert victim._u2 == frozenset(range(1, 8)) and len(victim._u2) >= g.cfg.threshold
    everyone = frozenset(range(1, 10))
    with pytest.raises(AbortError, match="only 7 of the inputs summed are from members holding our shares, "
                                         "below our privacy floor of 9"):
        if mode is ACTIVE:
            victim.consistency_check(ConsistencyRequest(everyone))
        else:
            victim.unmask(UnmaskRequest(everyone, frozenset()))
    assert victim.state is ClientState.ABORTED
    # a client that got every share accepts the same survivor set
    if mode is ACTIVE:
        assert isinstance(g.clients[2].consistency_check(ConsistencyRequest(everyone)), ConsistencySignature)
    else:
        assert isinstance(g.clients[2].unmask(UnmaskRequest(everyone, frozenset())), UnmaskResponse)


# ============================================================================ 5. ring steering


def _advertised_sparse(m: int = 8, k: int = 6, tag: bytes = b"ring") -> Group:
    g = Group(m, k=k, tag=tag)
    g.step()
    assert not g.errors and not g.rejections
    return g


def test_forged_or_misplaced_contribution_in_the_broadcast_is_refused() -> None:
    cases = [
        ("member 5's contribution does not open its commitment (forged ring)", lambda c: c[:4] + (os.urandom(32),) + c[5:]),
        ("member 5's contribution does not open its commitment (forged ring)", lambda c: c[:4] + (c[4][:31],) + c[5:]),
        # two genuine openings at each other's seats
        ("member 2's contribution does not open its commitment (forged ring)", lambda c: (c[0], c[2], c[1]) + c[3:]),
        ("server did not forward our own contribution", lambda c: (b"",) + c[1:]),
        ("server sent 7 contributions for 8 members", lambda c: c[:7]),
        ("server sent 0 contributions for 8 members", lambda c: ()),
    ]
    for what, forge in cases:
        g = _advertised_sparse()
        b = g.inbox[1]
        assert isinstance(b, KeysBroadcast) and len(b.contributions) == 8
        with pytest.raises(AbortError, match=what.replace("(", r"\(").replace(")", r"\)")):
            g.clients[1].share_keys(dataclasses.replace(b, contributions=forge(b.contributions)))
        assert g.clients[1].state is ClientState.ABORTED


def test_keys_of_a_neighbour_without_its_opening_are_refused() -> None:
    """Withholding x's opening but forwarding its keys would let the server seat x where it
    likes; the client only takes keys for seats whose opening it checked."""
    g = _advertised_sparse()
    b = g.inbox[1]
    assert isinstance(b, KeysBroadcast)
    everyone = tuple(g.advertised(i) for i in range(1, 9))
    for x in range(2, 9):
        view = {i: c for i, c in g.contributions.items() if i != x}
        if x in graph.neighbourhood(graph.ring_order(g.cfg, view), 6, 1):
            break
    else:
        raise AssertionError("no seat stays a neighbour without its opening")
    forged = KeysBroadcast(everyone, tuple(b"" if i == x else g.contributions[i] for i in range(1, 9)))
    with pytest.raises(AbortError, match=f"server sent keys of client {x} but no opened contribution for it"):
        g.clients[1].share_keys(forged)


def test_a_sybil_whose_contribution_does_not_open_its_commitment_is_dropped_by_the_server() -> None:
    g = Group(8, k=6, tag=b"sybil")
    bad = {3: os.urandom(32), 5: b"", 7: g.contributions[6]}
    g.step(up=lambda i, m: dataclasses.replace(m, contribution=bad[i]) if i in bad else m)
    for i in bad:
        assert g.rejections[i].reason is DropReason.MALFORMED and "does not open its commitment" in str(g.rejections[i])
        assert g.server.dropouts[i][:2] == (Phase.ADVERTISE_KEYS, DropReason.MALFORMED)
    opened = {i: c for i, c in g.contributions.items() if i not in bad}
    assert g.server.neighbors == graph.for_group(g.cfg, opened)
    for i, msg in g.inbox.items():
        assert isinstance(msg, KeysBroadcast)
        assert msg.contributions == tuple(opened.get(s, b"") for s in range(1, 9))


@pytest.mark.parametrize("seed", range(6))
def test_the_client_computes_the_ring_the_server_computed(seed: int) -> None:
    m, k = 12, 6      # below recommended_degree(12) = 10, so the ring is genuinely sparse
    g = Group(m, k=k, tag=b"agree-%d" % seed, policy=ClientPolicy(min_neighbors=k))
    gone = frozenset({(5 * seed) % m + 1}) if seed % 2 else frozenset()   # no keys, no opening: placed anyway
    assert g.server.neighbors == {} and all(c.neighbors == frozenset() for c in g.clients.values())
    g.step(drop=gone)
    opened = {i: c for i, c in g.contributions.items() if i not in gone}
    ring = graph.for_group(g.cfg, opened)
    assert g.server.neighbors == ring and all(len(nb) == k for nb in ring.values())
    for i, msg in g.inbox.items():
        assert isinstance(msg, KeysBroadcast)
        assert {a.index for a in msg.keys} == (ring[i] | {i}) - gone
    g.step()
    assert not g.errors and not g.rejections
    for i in g.inbox:
        assert g.clients[i].neighbors == ring[i] == g.server.neighbors[i]
        sk = g.sent[Phase.SHARE_KEYS][i]
        assert isinstance(sk, ShareKeys) and {s.receiver for s in sk.shares} == ring[i] - gone
    g.resume()
    assert g.server.result is not None and not g.errors
    assert np.array_equal(g.server.result.total, wrapped_sum(g.inputs, g.server.result.survivors, g.cfg))


def test_ring_positions_are_a_deterministic_function_of_the_digest_and_every_opening() -> None:
    cfg, contributions = make_config(12, k=4, tag=b"beacon")
    order = graph.ring_order(cfg, contributions)
    # the documented construction: a beacon over the digest and all openings, then H(beacon | seat)
    beacon = hashlib.sha256(b"secagg/v1|ring-beacon|" + cfg.digest + b"".join(contributions[i] for i in range(1, 13))).digest()
    assert order == sorted(range(1, 13), key=lambda s: hashlib.sha256(b"secagg/v1|ring|" + beacon + seat(s)).digest())
    # deterministic: an equal config built separately, the openings in another dict order
    twin = GroupConfig(session=cfg.session, members=12, threshold=cfg.threshold, dim=cfg.dim, neighbors=4,
                       commitments=tuple(cfg.commitments))
    assert twin.digest == cfg.digest
    assert graph.ring_order(twin, dict(reversed(list(contributions.items())))) == order
    # an unopened seat enters the beacon as 32 zero bytes
    view = {i: c for i, c in contributions.items() if i != 7}
    assert graph.ring_order(cfg, view) == graph.ring_order(cfg, view | {7: b""})
    # the server's one lever, withholding a member, re-draws everyone's position, not just that member's
    for x in range(1, 13):
        redrawn = graph.ring_order(cfg, {i: c for i, c in contributions.items() if i != x})
        assert [u for u in redrawn if u != x] != [u for u in order if u != x]


def _ring_by_contribution(cfg: GroupConfig, contributions: Mapping[int, bytes]) -> frozenset[frozenset[bytes]]:
    """The ring's edges, named by the members' contributions instead of their seats."""
    order = graph.ring_order(cfg, contributions)
    return frozenset(frozenset({contributions[order[p]], contributions[order[(p + 1) % len(order)]]}) for p in range(len(order)))


def test_the_server_cannot_choose_where_a_sybil_sits() -> None:
    """Moving a sybil's commitment to another seat changes the digest and so re-draws the whole
    ring; and before the honest members open their contributions, a server that knows every
    commitment and its sybils' contributions cannot compute the ring it will get."""
    m = 12
    cfg, contributions = make_config(m, k=4, tag=b"seats")
    sybils = {2, 3}
    base = _ring_by_contribution(cfg, contributions)
    for a, b in ((2, 9), (3, 12), (2, 3)):          # the server swaps a sybil's seat with another
        perm = {i: i for i in range(1, m + 1)} | {a: b, b: a}
        moved = {perm[i]: contributions[i] for i in contributions}
        cfg2 = dataclasses.replace(cfg, commitments=tuple(graph.commit_contribution(moved[i]) for i in range(1, m + 1)))
        assert cfg2.digest != cfg.digest
        assert _ring_by_contribution(cfg2, moved) != base       # not a relabelling of the same ring
    # offline prediction, same config (so same digest and commitments), the sybils' contributions
    # known and the honest ones guessed: every guess predicts another ring, and where the
    # sybils land relative to the victim (seat 1) changes with the guess
    actual = graph.ring_order(cfg, contributions)
    predictions = []
    for n in range(5):
        guess = {i: (c if i in sybils else h(b"guess", bytes([n]), seat(i))) for i, c in contributions.items()}
        predictions.append(graph.ring_order(cfg, guess))
    assert all(p != actual for p in predictions) and len({tuple(p) for p in predictions}) == 5

    def offsets(order: list[int]) -> tuple[int, ...]:
        return tuple(sorted((order.index(s) - order.index(1)) % m for s in sybils))

    assert len({offsets(p) for p in predictions} | {offsets(actual)}) > 1


# ============================================================================ 6. honest rounds under the default policy


def _spread_drops(cfg: GroupConfig, contributions: Mapping[int, bytes], phases: list[Phase]) -> dict[Phase, set[int]]:
    """One dropout per phase, spread around the ring that actually runs (the advertise-keys
    dropout is withheld from it), so every secret keeps at least t live holders."""
    first = 5
    opened = {i: c for i, c in contributions.items() if i != first}
    order = graph.ring_order(cfg, opened) if cfg.sparse else list(range(1, cfg.members + 1))
    p0, step = order.index(first), cfg.members // len(phases)
    chosen = [order[(p0 + j * step) % cfg.members] for j in range(len(phases))]
    g = graph.for_group(cfg, opened)
    slack = cfg.degree + 1 - cfg.threshold
    assert all(len((g[u] | {u}) & set(chosen)) <= slack for u in g), "drops would sink a secret"
    return {p: {v} for p, v in zip(phases, chosen, strict=True)}


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("sparse", [True, False], ids=["secagg+", "complete"])
def test_honest_rounds_pass_the_default_policy_and_stay_exact_with_dropouts_at_every_phase(mode: Mode, sparse: bool) -> None:
    """m = 20, k = recommended_degree(20) = 14 or the complete graph, the mode's minimum threshold.
    The default policy accepts the active rounds as they are; semi-honest needs only the opt-in."""
    m = 20
    k = graph.recommended_degree(m) if sparse else None
    cfg, contributions = make_config(m, mode, k=k, dim=16, tag=b"honest-%s" % mode.value.encode())
    assert cfg.sparse is sparse and (not sparse or cfg.degree == 14)
    policy = ClientPolicy() if mode is ACTIVE else ClientPolicy.semi_honest()
    assert policy.replace(allow_semi_honest=False, threshold_floor=ACTIVE) == ClientPolicy()   # nothing else relaxed
    policy.check(cfg)
    phases = [Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.CONSISTENCY_CHECK, Phase.UNMASKING]
    if mode is SEMI:
        phases.remove(Phase.CONSISTENCY_CHECK)
    drops = _spread_drops(cfg, contributions, phases)
    rng = np.random.default_rng(20)
    inputs = {i: rng.integers(0, 2**32, size=cfg.dim, dtype=np.uint32) for i in range(1, m + 1)}
    keys = {i: identity(i) for i in range(1, m + 1)} if mode is ACTIVE else None
    run = run_group(cfg, inputs, drops=drops, identity_keys=keys, policy=policy, contributions=contributions)
    assert not run.aborted, run.aborted
    assert not run.client_aborts and not run.rejections
    assert run.config == cfg and run.result is not None
    gone_before_input = set().union(*(drops[p] for p in phases if p <= Phase.MASKED_INPUT))
    expected = frozenset(range(1, m + 1)) - gone_before_input
    assert run.result.survivors == expected
    assert run.result.responders == expected - set().union(*drops.values())
    assert set(run.result.dropped) == set().union(*drops.values())
    assert np.array_equal(run.result.total, wrapped_sum(inputs, expected, cfg))
