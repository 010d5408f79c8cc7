"""Protocol tests: the client and server state machines, driven by ``run_group`` and by hand.

Exact sums under dropouts at every phase (complete graph and SecAgg+), aborts below the
threshold, the honest client's refusals (both shares of a peer, tampered or re-routed shares,
bad signatures, untrusted identities, a survivor set it did not sign, unsafe thresholds), the
server's handling of bad input, the exhaustive state table, determinism, and the benchmark.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import itertools
import json
import weakref
from collections.abc import Callable, Mapping

import numpy as np
import pytest
from secagg.protocol import bench, driver, graph, shamir, signatures, thresholds
from secagg.protocol.client import TRANSITIONS, ClientMachine, ClientState, mask_vector
from secagg.protocol.driver import deterministic_randbytes, run_group
from secagg.protocol.errors import (
    AbortError,
    DropReason,
    LocalProtocolError,
    RemoteProtocolError,
)
from secagg.protocol.policy import ClientPolicy, PolicyViolation
from secagg.protocol.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShare,
    GroupConfig,
    KeysBroadcast,
    MaskedInput,
    PassStart,
    Mode,
    Phase,
    ShareKeys,
    SharesDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from secagg.protocol.server import ServerMachine, ServerState

DIM = 12
SEMI, ACTIVE = Mode.SEMI_HONEST, Mode.ACTIVE
PHASES = {
    SEMI: [Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.UNMASKING],
    ACTIVE: [Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.CONSISTENCY_CHECK, Phase.UNMASKING],
}
MODE_PHASES = [(mode, p) for mode in Mode for p in PHASES[mode]]
# The in-memory server here is honest: the tests of the client's refusals pass stricter policies.
LENIENT = ClientPolicy.lenient()


# ============================================================================ helpers


def holders_of(m: int, neighbors: int | None) -> int:
    return m if neighbors is None or neighbors >= m - 1 else neighbors + 1


def contribution_for(session: bytes, i: int) -> bytes:
    """Seat i's fresh contribution in a config made by ``make_config`` (a function of its session)."""
    return hashlib.sha256(b"test-contribution|" + session + i.to_bytes(4, "big")).digest()


def contributions_of(cfg: GroupConfig) -> dict[int, bytes]:
    """Every seat's contribution of a ``make_config`` config (checked against its commitments)."""
    out = {i: contribution_for(cfg.session, i) for i in range(1, cfg.members + 1)}
    assert tuple(graph.commit_contribution(out[i]) for i in range(1, cfg.members + 1)) == cfg.commitments
    return out


def make_config(m: int, mode: Mode = SEMI, *, neighbors: int | None = None, dim: int = DIM, bits: int = 32,
                threshold: int | None = None, seed: int = 0) -> GroupConfig:
    """A config with every member's commitment; ``contributions_of(cfg)`` opens them."""
    rng = np.random.default_rng(seed)
    t = thresholds.default(holders_of(m, neighbors), mode) if threshold is None else threshold
    session = rng.bytes(32)
    commitments = tuple(graph.commit_contribution(contribution_for(session, i)) for i in range(1, m + 1))
    return GroupConfig(session=session, members=m, threshold=t, dim=dim, modulus_bits=bits, mode=mode,
                       neighbors=neighbors, commitments=commitments)


def machine(cfg: GroupConfig, i: int, **kw: object) -> ClientMachine:
    """Seat i's client machine: its own contribution and the lenient policy unless given."""
    if "contribution" not in kw:
        kw["contribution"] = contribution_for(cfg.session, i)
    kw.setdefault("policy", LENIENT)
    return ClientMachine(cfg, i, **kw)  # type: ignore[arg-type]


def run_cfg(cfg: GroupConfig, inputs: Mapping[int, np.ndarray], **kw: object) -> driver.GroupRun:
    """``run_group`` with the config's own contributions, so the graph that ran is ``cfg``'s."""
    kw.setdefault("contributions", contributions_of(cfg))
    out = run_group(cfg, inputs, **kw)  # type: ignore[arg-type]
    assert out.config == cfg
    return out


def make_inputs(cfg: GroupConfig, seed: int = 1) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    hi = np.iinfo(cfg.dtype).max
    return {i: rng.integers(0, hi, size=cfg.dim, dtype=cfg.dtype, endpoint=True) for i in range(1, cfg.members + 1)}


def make_identities(cfg: GroupConfig) -> dict[int, bytes] | None:
    if cfg.mode is not ACTIVE:
        return None
    return {i: bytes([i]) * 32 for i in range(1, cfg.members + 1)}


def wrapped_sum(inputs: Mapping[int, np.ndarray], who: frozenset[int] | set[int], cfg: GroupConfig) -> np.ndarray:
    total = np.zeros(cfg.dim, dtype=cfg.dtype)
    for i in who:
        total += inputs[i]
    return total


def safe_drops(cfg: GroupConfig, count: int, opened: Mapping[int, bytes] | None = None) -> list[int]:
    """``count`` clients whose loss leaves every secret with >= t live holders (for SecAgg+ graphs).

    The graph is the one drawn from the contributions opened at advertise-keys (all by default).
    """
    g = graph.for_group(cfg, contributions_of(cfg) if opened is None else opened)
    slack = len(next(iter(g.values()))) + 1 - cfg.threshold
    chosen: list[int] = []
    for v in range(cfg.members, 0, -1):
        trial = set(chosen) | {v}
        if all(len((g[u] | {u}) & trial) <= slack for u in g):
            chosen.append(v)
        if len(chosen) == count:
            return chosen
    raise AssertionError(f"cannot drop {count} clients safely")


class Round:
    """A hand-driven group: every message passes through optional tamper hooks.

    ``up(phase, i, msg)`` may replace what client i sends the server; ``down(phase, i, msg)``
    what the server sends client i.  Client refusals are recorded in ``client_errors`` and the
    client is dropped (as the transport would); server rejections in ``rejections``.
    """

    def __init__(self, cfg: GroupConfig, inputs: Mapping[int, np.ndarray] | None = None, *,
                 trusted: Mapping[int, set[bytes]] | None = None, policy: ClientPolicy = LENIENT,
                 randbytes: Mapping[int, Callable[[int], bytes]] | None = None) -> None:
        self.cfg = cfg
        self.inputs = dict(inputs) if inputs is not None else make_inputs(cfg)
        self.ids = make_identities(cfg)
        self.public_ids = None if self.ids is None else {i: signatures.public_key(k) for i, k in self.ids.items()}
        self.contributions = contributions_of(cfg)
        self.clients = {
            i: machine(cfg, i, identity_key=None if self.ids is None else self.ids[i],
                       trusted_identities=(trusted or {}).get(i), policy=policy,
                       **({"randbytes": randbytes[i]} if randbytes else {}))
            for i in range(1, cfg.members + 1)
        }
        self.server = ServerMachine(cfg, identities=self.public_ids)
        self.inbox: dict[int, object] = {i: None for i in self.clients}
        self.client_errors: dict[int, Exception] = {}
        self.rejections: dict[int, RemoteProtocolError] = {}
        self.sent: dict[Phase, dict[int, object]] = {p: {} for p in Phase}

    def act(self, phase: Phase, i: int, msg: object) -> object:
        c = self.clients[i]
        if phase is Phase.ADVERTISE_KEYS:
            return c.advertise_keys()
        if phase is Phase.SHARE_KEYS:
            return c.share_keys(msg)  # type: ignore[arg-type]
        if phase is Phase.MASKED_INPUT:
            return c.masked_input(msg, self.inputs[i])  # type: ignore[arg-type]
        if phase is Phase.CONSISTENCY_CHECK:
            return c.consistency_check(msg)  # type: ignore[arg-type]
        return c.unmask(msg)  # type: ignore[arg-type]

    def step(self, phase: Phase, *, drop: set[int] | frozenset[int] = frozenset(),
             up: Callable | None = None, down: Callable | None = None) -> dict[int, object]:
        assert self.server.phase is phase
        for i in sorted(self.inbox):
            if i in drop:
                self.server.drop(i, DropReason.DISCONNECTED, f"vanished before {phase.label}")
                continue
            msg = self.inbox[i] if down is None else down(phase, i, self.inbox[i])
            try:
                reply = self.act(phase, i, msg)
            except (AbortError, RemoteProtocolError) as exc:
                self.client_errors[i] = exc
                self.server.drop(i, DropReason.ABORTED, str(exc))
                continue
            if up is not None:
                reply = up(phase, i, reply)
            self.sent[phase][i] = reply
            try:
                self.server.receive(reply)  # type: ignore[arg-type]
            except RemoteProtocolError as exc:
                self.rejections[i] = exc
        self.inbox = dict(self.server.close_phase())
        return self.inbox

    def run_until(self, last: Phase, **kw: object) -> None:
        for phase in PHASES[self.cfg.mode]:
            self.step(phase, **self._kw(phase, kw))
            if phase is last:
                return

    def run(self, drops: Mapping[Phase, set[int]] | None = None, **kw: object) -> None:
        for phase in PHASES[self.cfg.mode]:
            if self.server.state is not ServerState.RUNNING:
                return
            self.step(phase, drop=(drops or {}).get(phase, frozenset()), **self._kw(phase, kw))

    def resume(self, **kw: object) -> None:
        """Finish the remaining phases."""
        while self.server.state is ServerState.RUNNING:
            phase = self.server.phase
            self.step(phase, **self._kw(phase, kw))

    @staticmethod
    def _kw(phase: Phase, kw: Mapping[str, object]) -> dict:
        return {k: v for k, v in kw.items() if k in ("up", "down")}

    def assert_exact(self, survivors: set[int] | frozenset[int]) -> None:
        res = self.server.result
        assert self.server.state is ServerState.DONE and res is not None
        assert res.survivors == frozenset(survivors)
        assert np.array_equal(res.total, wrapped_sum(self.inputs, res.survivors, self.cfg))


def flip(data: bytes, pos: int = 0) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x01
    return bytes(b)


# ============================================================================ exact sums (driver)


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("bits", [32, 64])
def test_exact_sum_without_dropouts(mode: Mode, bits: int) -> None:
    cfg = make_config(6, mode, bits=bits, seed=3)
    inputs = make_inputs(cfg)
    run = run_cfg(cfg, inputs, identity_keys=make_identities(cfg))
    assert not run.aborted and not run.client_aborts
    assert run.result is not None
    assert run.result.survivors == run.result.responders == frozenset(range(1, 7))
    assert run.result.dropped == {}
    assert run.result.total.dtype == cfg.dtype
    assert np.array_equal(run.result.total, wrapped_sum(inputs, run.result.survivors, cfg))
    for phase in PHASES[mode]:
        assert run.survivors[phase] == frozenset(range(1, 7))
        assert run.stats[phase].bytes_up > 0


@pytest.mark.parametrize("mode, phase", MODE_PHASES, ids=[f"{m.name}-{p.label}" for m, p in MODE_PHASES])
def test_exact_sum_with_dropout_before_each_phase(mode: Mode, phase: Phase) -> None:
    cfg = make_config(7, mode, seed=11)
    inputs = make_inputs(cfg)
    run = run_cfg(cfg, inputs, drops={phase: {3}}, identity_keys=make_identities(cfg))
    assert not run.aborted, run.aborted
    assert run.result is not None
    # a client that vanished after sending its masked input is still in the sum
    in_sum = phase in (Phase.CONSISTENCY_CHECK, Phase.UNMASKING)
    expected = frozenset(range(1, 8)) - (set() if in_sum else {3})
    assert run.result.survivors == expected
    assert 3 not in run.result.responders
    assert run.result.dropped[3] == (phase, DropReason.DISCONNECTED.value)
    assert np.array_equal(run.result.total, wrapped_sum(inputs, expected, cfg))


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("bits", [32, 64])
def test_exact_sum_with_several_dropouts_at_several_phases(mode: Mode, bits: int) -> None:
    m = 12
    cfg = make_config(m, mode, bits=bits, seed=5)   # t = 7 (semi) / 9 (active)
    inputs = make_inputs(cfg)
    if mode is SEMI:
        drops = {Phase.ADVERTISE_KEYS: {1}, Phase.SHARE_KEYS: {2, 12}, Phase.MASKED_INPUT: {5}, Phase.UNMASKING: {8}}
    else:
        drops = {Phase.SHARE_KEYS: {2}, Phase.MASKED_INPUT: {5}, Phase.CONSISTENCY_CHECK: {8}}
    run = run_cfg(cfg, inputs, drops=drops, identity_keys=make_identities(cfg))
    assert not run.aborted, run.aborted
    assert run.result is not None
    gone_before_input = set().union(*(v for p, v in drops.items() if p <= Phase.MASKED_INPUT))
    expected = frozenset(range(1, m + 1)) - gone_before_input
    assert run.result.survivors == expected
    assert run.result.responders == expected - set().union(*drops.values())
    assert np.array_equal(run.result.total, wrapped_sum(inputs, expected, cfg))
    assert {i for i in run.result.dropped} == set().union(*drops.values())


@pytest.mark.parametrize("mode", list(Mode))
def test_exact_sum_secagg_plus_graph(mode: Mode) -> None:
    m, k = 20, 6
    cfg = make_config(m, mode, neighbors=k, seed=21)
    assert cfg.threshold == thresholds.minimum(k + 1, mode)
    inputs = make_inputs(cfg)
    ids = make_identities(cfg)
    run = run_cfg(cfg, inputs, identity_keys=ids)
    assert not run.aborted and run.result is not None
    assert np.array_equal(run.result.total, wrapped_sum(inputs, frozenset(range(1, m + 1)), cfg))
    # now with dropouts spread over the phases, chosen so every secret keeps t live holders
    gone = safe_drops(cfg, 3)
    last = Phase.CONSISTENCY_CHECK if mode is ACTIVE else Phase.UNMASKING
    phases = [Phase.SHARE_KEYS, Phase.MASKED_INPUT, last]
    drops = {p: {v} for p, v in zip(phases, gone, strict=True)}
    run = run_cfg(cfg, inputs, drops=drops, identity_keys=ids)
    assert not run.aborted, run.aborted
    assert run.result is not None
    expected = frozenset(range(1, m + 1)) - {gone[0], gone[1]}
    assert run.result.survivors == expected
    assert np.array_equal(run.result.total, wrapped_sum(inputs, expected, cfg))


def test_secagg_plus_client_ignores_keys_of_non_neighbours() -> None:
    cfg = make_config(12, SEMI, neighbors=4, seed=6)
    r = Round(cfg)
    r.step(Phase.ADVERTISE_KEYS)
    everyone = tuple(r.sent[Phase.ADVERTISE_KEYS][i] for i in range(1, 13))  # type: ignore[misc]
    b = r.inbox[1]
    assert isinstance(b, KeysBroadcast) and len(b.keys) == 5
    out = r.clients[1].share_keys(KeysBroadcast(everyone, b.contributions))
    assert r.clients[1].neighbors == graph.for_group(cfg, r.contributions)[1] == r.server.neighbors[1]
    assert len(r.clients[1].neighbors) == 4
    assert {s.receiver for s in out.shares} == r.clients[1].neighbors


def _shift_share(msg: UnmaskResponse, kind: str, delta: int) -> UnmaskResponse:
    shares = getattr(msg, kind)
    owner, share = shares[0]
    bad = ((owner, ((int.from_bytes(share, "big") + delta) % shamir.PRIME).to_bytes(66, "big")),) + shares[1:]
    return dataclasses.replace(msg, **{kind: bad})


def test_server_sets_aside_one_wrong_mask_key_share_and_sums_exactly() -> None:
    cfg = make_config(6, seed=14)   # t = 4; 5 responders leave one spare
    r = Round(cfg)
    up = lambda p, i, m: _shift_share(m, "mask_key_shares", 12345) if i == 1 and isinstance(m, UnmaskResponse) else m  # noqa: E731
    r.run(drops={Phase.MASKED_INPUT: {6}}, up=up)
    r.assert_exact({1, 2, 3, 4, 5})
    assert r.server.inconsistent[6].startswith("inconsistent shares of client 6's mask key; recovered from responders")


def test_server_sets_aside_one_wrong_self_mask_share_and_sums_exactly() -> None:
    """A share shifted so the reconstructed seed is still a 32-byte value (it would pass any
    range check): only the commitment in ShareKeys exposes it."""
    cfg = make_config(6, seed=15)   # t = 4; 6 responders leave two spares
    r = Round(cfg)
    coeffs = shamir.lagrange_at_zero((1, 2, 3, 4))
    delta = pow(coeffs[1], -1, shamir.PRIME)   # moves the reconstructed b by exactly +1
    up = lambda p, i, m: _shift_share(m, "self_mask_shares", delta) if i == 1 and isinstance(m, UnmaskResponse) else m  # noqa: E731
    r.run(up=up)
    r.assert_exact({1, 2, 3, 4, 5, 6})
    assert len(r.server.inconsistent) == 1 and "self-mask seed" in next(iter(r.server.inconsistent.values()))


def test_server_aborts_rather_than_release_a_corrupt_sum() -> None:
    cfg = make_config(6, seed=16)   # t = 4; 5 responders, two of them lie: no consistent subset
    r = Round(cfg)
    # different shifts: equal shifts on two shares can cancel in another subset (and then recover fine)
    up = lambda p, i, m: _shift_share(m, "mask_key_shares", 777 * i) if i in (1, 2) and isinstance(m, UnmaskResponse) else m  # noqa: E731
    with pytest.raises(AbortError, match="client 6's mask key does not match its commitment from any set of responders"):
        r.run(drops={Phase.MASKED_INPUT: {6}}, up=up)
    assert r.server.state is ServerState.ABORTED and r.server.result is None


def test_secagg_plus_each_client_talks_only_to_its_neighbours() -> None:
    cfg = make_config(20, SEMI, neighbors=4, seed=2)
    r = Round(cfg)
    assert r.server.neighbors == {}          # the SecAgg+ ring exists only once the contributions open
    r.step(Phase.ADVERTISE_KEYS)
    g = graph.for_group(cfg, r.contributions)
    assert r.server.neighbors == g and all(len(nb) == 4 for nb in g.values())
    for i, msg in r.inbox.items():
        assert isinstance(msg, KeysBroadcast)
        assert {k.index for k in msg.keys} == g[i] | {i}
    r.step(Phase.SHARE_KEYS)
    for i, share_keys in r.sent[Phase.SHARE_KEYS].items():
        assert {s.receiver for s in share_keys.shares} == g[i]  # type: ignore[attr-defined]
    r.resume()
    r.assert_exact(set(range(1, 21)))


# ============================================================================ aborts below t


@pytest.mark.parametrize("mode, phase", MODE_PHASES, ids=[f"{m.name}-{p.label}" for m, p in MODE_PHASES])
def test_round_aborts_when_fewer_than_t_remain(mode: Mode, phase: Phase) -> None:
    cfg = make_config(6, mode, seed=4)               # t = 4 (semi) / 5 (active)
    gone = set(range(1, 6 - cfg.threshold + 2))      # leaves t - 1
    run = run_cfg(cfg, make_inputs(cfg), drops={phase: gone}, identity_keys=make_identities(cfg))
    assert run.aborted
    assert "threshold" in run.aborted
    assert run.result is None


def test_client_that_sees_fewer_than_t_peers_aborts() -> None:
    cfg = make_config(6, seed=1)                   # t = 4
    r = Round(cfg)
    r.step(Phase.ADVERTISE_KEYS)
    b = r.inbox[1]
    assert isinstance(b, KeysBroadcast)
    short = KeysBroadcast(tuple(k for k in b.keys if k.index <= cfg.threshold - 1))
    with pytest.raises(AbortError, match="threshold"):
        r.clients[1].share_keys(short)
    assert r.clients[1].state is ClientState.ABORTED


def test_client_aborts_when_fewer_than_t_shares_arrive() -> None:
    cfg = make_config(6, seed=1)
    r = Round(cfg)
    r.run_until(Phase.SHARE_KEYS)
    d = r.inbox[2]
    assert isinstance(d, SharesDelivery) and len(d.shares) == 5
    with pytest.raises(AbortError, match="threshold"):
        r.clients[2].masked_input(SharesDelivery(2, d.shares[: cfg.threshold - 2]), r.inputs[2])
    assert r.clients[2].state is ClientState.ABORTED


def test_client_aborts_on_survivor_set_below_t_or_without_itself() -> None:
    cfg = make_config(6, seed=1)
    r = Round(cfg)
    r.run_until(Phase.MASKED_INPUT)
    everyone = frozenset(range(1, 7))
    with pytest.raises(AbortError, match="threshold"):
        r.clients[1].unmask(UnmaskRequest(frozenset({1, 2, 3}), everyone - {1, 2, 3}))
    assert r.clients[1].state is ClientState.ABORTED
    with pytest.raises(AbortError, match="does not include us"):
        r.clients[2].unmask(UnmaskRequest(everyone - {2}, frozenset()))
    assert r.clients[2].state is ClientState.ABORTED


def test_client_refuses_a_group_smaller_than_its_privacy_floor_of_survivors() -> None:
    cfg = make_config(4, threshold=3, seed=1)
    r = Round(cfg, policy=LENIENT.replace(min_group_size=4))
    r.run_until(Phase.MASKED_INPUT)
    with pytest.raises(AbortError, match="only 3 of the inputs summed .* below our privacy floor of 4"):
        r.clients[1].unmask(UnmaskRequest(frozenset({1, 2, 3}), frozenset({4})))
    assert r.clients[1].state is ClientState.ABORTED
    assert isinstance(r.clients[2].unmask(UnmaskRequest(frozenset({1, 2, 3, 4}), frozenset())), UnmaskResponse)


# ============================================================================ the honest client's refusals


def test_client_refuses_to_reveal_both_shares_of_one_peer() -> None:
    cfg = make_config(6, seed=8)
    r = Round(cfg)
    r.run_until(Phase.MASKED_INPUT)
    req = r.inbox[1]
    assert isinstance(req, UnmaskRequest) and req.dropped == frozenset()
    evil = UnmaskRequest(req.survivors, frozenset({4}))     # 4 is a survivor: its b AND s
    with pytest.raises(AbortError, match=r"both shares of client\(s\) \[4\]"):
        r.clients[1].unmask(evil)
    assert r.clients[1].state is ClientState.ABORTED
    with pytest.raises(LocalProtocolError):                  # and it stays refused
        r.clients[1].unmask(req)


def test_masked_input_is_input_plus_mask_vector() -> None:
    cfg = make_config(6, seed=13)
    r = Round(cfg)
    r.run(drops={Phase.SHARE_KEYS: {5}})
    c = r.clients[2]
    y = r.sent[Phase.MASKED_INPUT][2]
    assert isinstance(y, MaskedInput)
    senders = {v: s for v, s in c._mask_seeds.items() if v in c._u2}
    assert set(senders) == {1, 3, 4, 6}           # 5 never shared keys: no mask with it
    assert np.array_equal(y.vector - r.inputs[2], mask_vector(cfg.dim, cfg.dtype, c._self_seed, senders, 2))
    r.assert_exact({1, 2, 3, 4, 6})


def test_client_reveals_exactly_the_requested_kinds_of_share() -> None:
    cfg = make_config(6, seed=8)
    r = Round(cfg)
    r.run(drops={Phase.MASKED_INPUT: {6}})
    resp = r.sent[Phase.UNMASKING][1]
    assert isinstance(resp, UnmaskResponse)
    assert [o for o, _ in resp.self_mask_shares] == [1, 2, 3, 4, 5]
    assert [o for o, _ in resp.mask_key_shares] == [6]
    r.assert_exact({1, 2, 3, 4, 5})


def _replace_share(d: SharesDelivery, sender: int, new: EncryptedShare) -> SharesDelivery:
    return SharesDelivery(d.receiver, tuple(new if s.sender == sender else s for s in d.shares))


def test_tampered_share_ciphertext_is_rejected_by_its_receiver() -> None:
    cfg = make_config(6, seed=9)
    for pos in (0, 20, 12 + 2 * 66 + 15):               # nonce, body, tag
        r = Round(cfg)
        r.run_until(Phase.SHARE_KEYS)
        d = r.inbox[4]
        assert isinstance(d, SharesDelivery)
        orig = next(s for s in d.shares if s.sender == 2)
        bad = _replace_share(d, 2, EncryptedShare(2, 4, flip(orig.ciphertext, pos)))
        with pytest.raises(RemoteProtocolError, match="client 2") as info:
            r.clients[4].masked_input(bad, r.inputs[4])
        assert info.value.index == 2
        assert r.clients[4].state is ClientState.ABORTED


def test_rerouted_share_ciphertext_is_rejected() -> None:
    cfg = make_config(6, seed=9)
    r = Round(cfg)
    r.run_until(Phase.SHARE_KEYS)
    sent2 = r.sent[Phase.SHARE_KEYS][2]
    assert isinstance(sent2, ShareKeys)
    for_3 = next(s for s in sent2.shares if s.receiver == 3)
    d4 = r.inbox[4]
    assert isinstance(d4, SharesDelivery)
    # relabelled as if it were 2's share for 4: the AEAD (key and associated data) refuses it
    c4 = r.clients[4]
    with pytest.raises(RemoteProtocolError, match="client 2") as info:
        c4.masked_input(_replace_share(d4, 2, EncryptedShare(2, 4, for_3.ciphertext)), r.inputs[4])
    assert info.value.index == 2
    assert c4.state is ClientState.ABORTED
    # delivered as is (addressed to 3) to client 5: refused before decryption
    d5 = r.inbox[5]
    assert isinstance(d5, SharesDelivery)
    with pytest.raises(AbortError, match="unexpected share from client 2 to 3"):
        r.clients[5].masked_input(_replace_share(d5, 2, for_3), r.inputs[5])
    assert r.clients[5].state is ClientState.ABORTED
    # a whole delivery addressed to someone else
    with pytest.raises(AbortError, match="addressed to client 3"):
        r.clients[6].masked_input(r.inbox[3], r.inputs[6])  # type: ignore[arg-type]


def test_client_refuses_share_from_non_peer_duplicate_or_itself() -> None:
    cfg = make_config(6, seed=9)
    makers: list[Callable[[SharesDelivery], SharesDelivery]] = [
        lambda d: SharesDelivery(1, d.shares + d.shares[:1]),                                      # duplicate sender
        lambda d: SharesDelivery(1, d.shares + (EncryptedShare(1, 1, d.shares[0].ciphertext),)),   # from itself
        lambda d: SharesDelivery(1, d.shares + (EncryptedShare(9, 1, d.shares[0].ciphertext),)),   # not a peer
    ]
    for make_bad in makers:
        r = Round(cfg)
        r.run_until(Phase.SHARE_KEYS)
        d = r.inbox[1]
        assert isinstance(d, SharesDelivery)
        with pytest.raises(AbortError, match="unexpected share"):
            r.clients[1].masked_input(make_bad(d), r.inputs[1])
        assert r.clients[1].state is ClientState.ABORTED


def test_client_refuses_bad_key_broadcasts() -> None:
    cfg = make_config(6, seed=12)
    other = machine(cfg, 1).advertise_keys()
    cases: list[tuple[str, Callable[[list[AdvertiseKeys]], tuple[AdvertiseKeys, ...]]]] = [
        ("two key sets", lambda ks: tuple(ks) + (ks[2],)),
        ("echo our own keys", lambda ks: tuple(k for k in ks if k.index != 1)),
        ("echo our own keys", lambda ks: tuple(other if k.index == 1 else k for k in ks)),
        ("are equal", lambda ks: tuple(dataclasses.replace(k, c_public=ks[1].c_public) if k.index == 3 else k for k in ks)),
        ("are equal", lambda ks: tuple(dataclasses.replace(k, s_public=k.c_public) if k.index == 3 else k for k in ks)),
        ("invalid X25519", lambda ks: tuple(dataclasses.replace(k, s_public=bytes(32)) if k.index == 3 else k for k in ks)),
        ("invalid X25519", lambda ks: tuple(dataclasses.replace(k, c_public=b"short") if k.index == 3 else k for k in ks)),
    ]
    for what, make_bad in cases:
        r = Round(cfg)
        r.step(Phase.ADVERTISE_KEYS)
        b = r.inbox[1]
        assert isinstance(b, KeysBroadcast)
        with pytest.raises(AbortError, match=what):
            r.clients[1].share_keys(KeysBroadcast(make_bad(list(b.keys))))
        assert r.clients[1].state is ClientState.ABORTED


# ============================================================================ active mode


def _sig_tamper(index: int) -> Callable:
    def up(phase: Phase, i: int, msg: object) -> object:
        if i == index and isinstance(msg, AdvertiseKeys):
            return dataclasses.replace(msg, signature=flip(msg.signature, 5))
        return msg
    return up


def test_active_server_rejects_bad_key_signature_and_round_completes() -> None:
    cfg = make_config(7, ACTIVE, seed=31)           # t = 5
    r = Round(cfg)
    r.run(up=_sig_tamper(2))
    exc = r.rejections[2]
    assert exc.reason is DropReason.BAD_SIGNATURE and exc.index == 2
    assert r.server.dropouts[2][:2] == (Phase.ADVERTISE_KEYS, DropReason.BAD_SIGNATURE)
    assert 2 not in r.server.alive
    assert r.client_errors == {}
    r.assert_exact(set(range(1, 8)) - {2})


def test_active_server_rejects_unregistered_identity() -> None:
    cfg = make_config(7, ACTIVE, seed=31)
    r = Round(cfg)
    rogue = bytes([99]) * 32

    def up(phase: Phase, i: int, msg: object) -> object:
        if i == 3 and isinstance(msg, AdvertiseKeys):   # validly signed, by a key nobody registered
            body = signatures.keys_message(cfg.digest, 3, msg.c_public, msg.s_public)
            return dataclasses.replace(msg, signature=signatures.sign(rogue, body), identity=signatures.public_key(rogue))
        return msg

    r.run(up=up)
    assert r.rejections[3].reason is DropReason.BAD_SIGNATURE
    r.assert_exact(set(range(1, 8)) - {3})


def test_active_client_rejects_forwarded_bad_signature() -> None:
    cfg = make_config(7, ACTIVE, seed=32)
    r = Round(cfg)

    def down(phase: Phase, i: int, msg: object) -> object:
        if i == 1 and isinstance(msg, KeysBroadcast):
            return dataclasses.replace(msg, keys=tuple(dataclasses.replace(k, signature=flip(k.signature)) if k.index == 4 else k
                                                       for k in msg.keys))
        return msg

    r.run(down=down)
    exc = r.client_errors[1]
    assert isinstance(exc, RemoteProtocolError)
    assert exc.reason is DropReason.BAD_SIGNATURE and exc.index == 4
    assert r.clients[1].state is ClientState.ABORTED
    r.assert_exact(set(range(2, 8)))  # the others carry on


def test_active_client_rejects_substituted_keys_under_a_valid_identity() -> None:
    """The server swaps client 4's round keys: the signature no longer covers them."""
    cfg = make_config(7, ACTIVE, seed=33)
    r = Round(cfg)
    r.step(Phase.ADVERTISE_KEYS)
    b = r.inbox[1]
    assert isinstance(b, KeysBroadcast)
    fake = machine(cfg, 4, identity_key=bytes([77]) * 32).advertise_keys()
    swapped = KeysBroadcast(tuple(dataclasses.replace(k, c_public=fake.c_public) if k.index == 4 else k for k in b.keys))
    with pytest.raises(RemoteProtocolError) as info:
        r.clients[1].share_keys(swapped)
    assert info.value.reason is DropReason.BAD_SIGNATURE and info.value.index == 4


def test_active_client_refuses_untrusted_identity() -> None:
    cfg = make_config(7, ACTIVE, seed=34)
    ids = make_identities(cfg)
    assert ids is not None
    trusted_all = {signatures.public_key(k) for k in ids.values()}
    trusted = {i: set(trusted_all) for i in ids}
    trusted[1] = trusted_all - {signatures.public_key(ids[5])}
    r = Round(cfg, trusted=trusted)
    r.run()
    assert isinstance(r.client_errors[1], AbortError)
    assert "client 5's identity key is not one we trust" in str(r.client_errors[1])
    assert set(r.client_errors) == {1}
    r.assert_exact(set(range(2, 8)))


def test_active_client_refuses_one_identity_signing_for_several_members() -> None:
    """A server (or sybil) whose one trusted key signs seats 2..5 would otherwise isolate client 1."""
    cfg = make_config(5, ACTIVE, seed=36)
    mallory = bytes([99]) * 32
    victim = machine(cfg, 1, identity_key=bytes([1]) * 32, policy=ClientPolicy(),   # the default policy accepts the round
                     trusted_identities={signatures.public_key(bytes([1]) * 32), signatures.public_key(mallory)})
    mine = victim.advertise_keys()
    others = [machine(cfg, i, identity_key=mallory).advertise_keys() for i in range(2, 6)]
    with pytest.raises(AbortError, match="one identity key signs for several members"):
        victim.share_keys(KeysBroadcast((mine, *others)))
    assert victim.state is ClientState.ABORTED


def test_active_client_checks_identities_pinned_per_member() -> None:
    cfg = make_config(5, ACTIVE, seed=37)
    keys = {i: bytes([i]) * 32 for i in range(1, 6)}
    pinned = {i: signatures.public_key(k) for i, k in keys.items()}
    pinned[4] = signatures.public_key(bytes([44]) * 32)   # out of band we expect another key for seat 4
    machines = {i: machine(cfg, i, identity_key=k, pinned_identities=pinned if i == 1 else None) for i, k in keys.items()}
    broadcast = KeysBroadcast(tuple(m.advertise_keys() for m in machines.values()))
    with pytest.raises(AbortError, match="client 4's identity key is not the one pinned"):
        machines[1].share_keys(broadcast)
    assert machines[2].share_keys(broadcast).index == 2   # no pins: accepted


def test_active_client_refuses_unmask_request_with_other_survivor_set() -> None:
    cfg = make_config(7, ACTIVE, seed=35)
    r = Round(cfg)
    r.run_until(Phase.CONSISTENCY_CHECK)
    req = r.inbox[1]
    assert isinstance(req, UnmaskRequest) and req.survivors == frozenset(range(1, 8))
    other = UnmaskRequest(req.survivors - {7}, req.dropped | {7}, req.signatures)
    with pytest.raises(AbortError, match="survivor set we signed"):
        r.clients[1].unmask(other)
    assert r.clients[1].state is ClientState.ABORTED
    # the genuine request still works for the others
    assert isinstance(r.clients[2].unmask(req), UnmaskResponse)


def test_active_client_refuses_unmask_without_consistency_check() -> None:
    cfg = make_config(7, ACTIVE, seed=36)
    r = Round(cfg)
    r.run_until(Phase.MASKED_INPUT)
    assert r.clients[1].state is ClientState.MASKED
    survivors = frozenset(range(1, 8))
    with pytest.raises(AbortError, match="survivor set we signed"):
        r.clients[1].unmask(UnmaskRequest(survivors, frozenset()))


def test_active_client_refuses_bad_or_too_few_consistency_signatures() -> None:
    cfg = make_config(7, ACTIVE, seed=37)
    r = Round(cfg)
    r.run_until(Phase.CONSISTENCY_CHECK)
    req = r.inbox[1]
    assert isinstance(req, UnmaskRequest) and len(req.signatures) == 7
    bad = tuple(ConsistencySignature(s.index, flip(s.signature)) if s.index == 3 else s for s in req.signatures)
    with pytest.raises(RemoteProtocolError) as info:
        r.clients[1].unmask(UnmaskRequest(req.survivors, req.dropped, bad))
    assert info.value.reason is DropReason.BAD_SIGNATURE and info.value.index == 3
    assert r.clients[1].state is ClientState.ABORTED
    # a signature over another survivor set does not verify either
    k4 = r.sent[Phase.ADVERTISE_KEYS][4]
    assert isinstance(k4, AdvertiseKeys)
    other_set = signatures.consistency_message(cfg.digest, 4, k4.c_public, k4.s_public, req.survivors - {7}, frozenset(range(1, 8)))
    forged = tuple(ConsistencySignature(s.index, signatures.sign(bytes([s.index]) * 32, other_set)) if s.index == 4 else s
                   for s in req.signatures)
    with pytest.raises(RemoteProtocolError) as info:
        r.clients[2].unmask(UnmaskRequest(req.survivors, req.dropped, forged))
    assert info.value.reason is DropReason.BAD_SIGNATURE and info.value.index == 4
    # too few (t - 1) valid signatures
    few = req.signatures[: cfg.threshold - 1]
    with pytest.raises(AbortError, match="valid consistency signatures"):
        r.clients[3].unmask(UnmaskRequest(req.survivors, req.dropped, few))
    # the same signature repeated does not count twice
    repeated = req.signatures[:1] * 7
    with pytest.raises(AbortError, match="valid consistency signatures"):
        r.clients[4].unmask(UnmaskRequest(req.survivors, req.dropped, repeated))


def test_active_consistency_check_defeats_survivor_set_equivocation() -> None:
    """The server tells clients 5 and 6 that client 4 dropped and everyone else that it survived,
    hoping to collect both b_4 shares and s_4 shares.  Clients 5 and 6 cannot gather t signatures
    over their view, so they reveal nothing."""
    cfg = make_config(7, ACTIVE, seed=39)           # t = 5
    r = Round(cfg)
    r.run_until(Phase.MASKED_INPUT)
    u3 = frozenset(range(1, 8))
    lie = u3 - {4}
    sigs = {i: r.clients[i].consistency_check(ConsistencyRequest(lie if i in (5, 6) else u3)) for i in range(1, 8)}
    lie_sigs = (sigs[5], sigs[6])
    with pytest.raises(AbortError, match="valid consistency signatures"):
        r.clients[5].unmask(UnmaskRequest(lie, frozenset({4}), lie_sigs))
    with pytest.raises(RemoteProtocolError) as info:                  # signatures over the true set do not fit the lie
        r.clients[6].unmask(UnmaskRequest(lie, frozenset({4}), tuple(sigs.values())))
    assert info.value.reason is DropReason.BAD_SIGNATURE
    assert r.clients[5].state is r.clients[6].state is ClientState.ABORTED
    # the honest view still unmasks with the other five
    truth = UnmaskRequest(u3, frozenset(), tuple(sigs[i] for i in (1, 2, 3, 4, 7)))
    for i in (1, 2, 3, 4, 7):
        resp = r.clients[i].unmask(truth)
        assert [o for o, _ in resp.self_mask_shares] == sorted(u3) and resp.mask_key_shares == ()


def test_active_server_rejects_bad_consistency_signature() -> None:
    cfg = make_config(7, ACTIVE, seed=38)
    r = Round(cfg)

    def up(phase: Phase, i: int, msg: object) -> object:
        if i == 2 and isinstance(msg, ConsistencySignature):
            return ConsistencySignature(2, flip(msg.signature))
        return msg

    r.run(up=up)
    assert r.rejections[2].reason is DropReason.BAD_SIGNATURE
    assert r.server.dropouts[2][:2] == (Phase.CONSISTENCY_CHECK, DropReason.BAD_SIGNATURE)
    assert 2 not in r.server.result.responders  # type: ignore[union-attr]
    r.assert_exact(set(range(1, 8)))            # its masked input was already in the sum


# ============================================================================ construction


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("neighbors", [None, 4])
def test_client_refuses_unsafe_threshold(mode: Mode, neighbors: int | None) -> None:
    """The policy's threshold floor is the mode's own (semi-honest only with the explicit opt-in);
    k = 4 < recommended_degree(10) needs min_neighbors=4 to get as far as the threshold check."""
    m = 10
    holders = holders_of(m, neighbors)
    t_min = thresholds.minimum(holders, mode)
    ident = bytes(32) if mode is ACTIVE else None
    policy = ClientPolicy.semi_honest(min_neighbors=4) if mode is SEMI else ClientPolicy(min_neighbors=4)
    for t in (1, t_min - 1, holders + 1):
        cfg = make_config(m, mode, neighbors=neighbors, threshold=t)
        with pytest.raises(PolicyViolation, match=rf"threshold is {t}, policy requires {t_min}\.\.{holders} "
                                                  rf"for {holders} share holders \({mode.value} floor\)") as info:
            machine(cfg, 1, identity_key=ident, policy=policy)
        assert isinstance(info.value, AbortError)
        assert (info.value.setting, info.value.offered) == ("threshold", t)
    for t in (t_min, holders):
        machine(make_config(m, mode, neighbors=neighbors, threshold=t), 1, identity_key=ident, policy=policy)


def test_client_refuses_group_below_min_group_size() -> None:
    cfg = make_config(5)
    floor6, floor5 = LENIENT.replace(min_group_size=6), LENIENT.replace(min_group_size=5)
    with pytest.raises(PolicyViolation, match=r"members is 5, policy requires at least 6 \(min_group_size\)") as info:
        machine(cfg, 1, policy=floor6)
    assert (info.value.setting, info.value.offered) == ("members", 5)
    machine(cfg, 1, policy=floor5)
    inputs = make_inputs(cfg)
    run = run_cfg(cfg, inputs, policy=floor5)
    assert not run.aborted and run.result is not None
    assert np.array_equal(run.result.total, wrapped_sum(inputs, frozenset(range(1, 6)), cfg))
    with pytest.raises(AbortError, match="min_group_size"):
        run_cfg(cfg, inputs, policy=floor6)


def test_machine_construction_errors() -> None:
    cfg = make_config(5)
    for bad in (0, 6, -1):
        with pytest.raises(LocalProtocolError, match="outside"):
            machine(cfg, bad, contribution=contribution_for(cfg.session, 1))
    with pytest.raises(LocalProtocolError, match="identity key"):
        machine(make_config(5, ACTIVE), 1)
    with pytest.raises(LocalProtocolError, match="identity keys"):
        ServerMachine(make_config(5, ACTIVE))
    with pytest.raises(ValueError, match="identity_keys"):
        run_cfg(make_config(5, ACTIVE), make_inputs(make_config(5, ACTIVE)))
    # the contribution must open this seat's commitment; a config must carry every commitment
    with pytest.raises(AbortError, match="does not carry our commitment at our seat"):
        machine(cfg, 1, contribution=contribution_for(cfg.session, 2))
    with pytest.raises(PolicyViolation, match=r"commitments is 0, policy requires one per member \(5\)"):
        machine(dataclasses.replace(cfg, commitments=()), 1)
    with pytest.raises(ValueError, match="needs the members' contributions"):
        run_group(cfg, make_inputs(cfg))


def test_driver_draws_fresh_contributions_for_a_config_without_commitments() -> None:
    bare = dataclasses.replace(make_config(5, seed=17), commitments=())
    inputs = make_inputs(bare)
    runs = [run_group(bare, inputs) for _ in range(2)]
    for out in runs:
        assert out.result is not None and not out.aborted
        assert np.array_equal(out.result.total, wrapped_sum(inputs, frozenset(range(1, 6)), bare))
        assert out.config is not None and dataclasses.replace(out.config, commitments=()) == bare
        assert len(out.config.commitments) == 5 and len(set(out.config.commitments)) == 5
    assert runs[0].config.commitments != runs[1].config.commitments   # type: ignore[union-attr]
    fixed, contributions = driver.with_contributions(bare, deterministic_randbytes(bytes(32)))
    assert fixed.commitments == tuple(graph.commit_contribution(contributions[i]) for i in range(1, 6))
    assert driver.with_contributions(bare, deterministic_randbytes(bytes(32)))[0] == fixed


# ============================================================================ server: bad input


def test_server_out_of_phase_message_is_rejected_without_dropping() -> None:
    cfg = make_config(6, seed=41)
    r = Round(cfg)
    early = MaskedInput(3, r.inputs[3])
    with pytest.raises(RemoteProtocolError) as info:
        r.server.receive(early)
    assert info.value.reason is DropReason.OUT_OF_PHASE and info.value.index == 3
    assert 3 in r.server.alive and 3 not in r.server.dropouts
    assert r.server.received[Phase.MASKED_INPUT] == {}
    r.step(Phase.ADVERTISE_KEYS)
    with pytest.raises(RemoteProtocolError) as info:
        r.server.receive(UnmaskResponse(2, (), ()))
    assert info.value.reason is DropReason.OUT_OF_PHASE
    with pytest.raises(RemoteProtocolError) as info:   # semi-honest has no consistency phase
        r.server.receive(ConsistencySignature(2, b""))
    assert info.value.reason is DropReason.OUT_OF_PHASE
    assert r.server.alive == set(range(1, 7))
    r.resume()
    r.assert_exact(set(range(1, 7)))


def test_server_duplicate_message_is_rejected_and_first_stands() -> None:
    cfg = make_config(6, seed=42)
    r = Round(cfg)
    first = {}

    def up(phase: Phase, i: int, msg: object) -> object:
        if i == 2 and phase in (Phase.ADVERTISE_KEYS, Phase.MASKED_INPUT):
            r.server.receive(msg)                 # the genuine message first
            first[phase] = msg
            if isinstance(msg, AdvertiseKeys):    # then a different one
                return machine(cfg, 2).advertise_keys()
            return MaskedInput(2, np.zeros(cfg.dim, dtype=cfg.dtype))
        return msg

    r.run(up=up)
    assert r.rejections[2].reason is DropReason.DUPLICATE and r.rejections[2].index == 2
    assert 2 in r.server.alive and 2 not in r.server.dropouts
    assert r.server.received[Phase.ADVERTISE_KEYS][2] is first[Phase.ADVERTISE_KEYS]
    assert 2 in r.server.received[Phase.MASKED_INPUT]  # only a marker: the vector lives in the sum
    r.assert_exact(set(range(1, 7)))              # the zero vector was not added


def test_server_duplicate_after_phase_is_duplicate() -> None:
    cfg = make_config(6, seed=42)
    r = Round(cfg)
    r.step(Phase.ADVERTISE_KEYS)
    with pytest.raises(RemoteProtocolError) as info:
        r.server.receive(r.sent[Phase.ADVERTISE_KEYS][4])  # type: ignore[arg-type]
    assert info.value.reason is DropReason.DUPLICATE
    assert 4 in r.server.alive


@pytest.mark.parametrize("bad", ["short", "long", "dtype", "2d", "list"])
def test_server_wrong_length_masked_input_drops_client(bad: str) -> None:
    cfg = make_config(6, seed=43)
    r = Round(cfg)

    def up(phase: Phase, i: int, msg: object) -> object:
        if i == 3 and isinstance(msg, MaskedInput):
            v = msg.vector
            vec = {"short": v[:-1], "long": np.concatenate([v, v[:1]]), "dtype": v.astype(np.uint64),
                   "2d": v.reshape(2, -1), "list": v.tolist()}[bad]
            return MaskedInput(3, vec)  # type: ignore[arg-type]
        return msg

    r.run(up=up)
    assert r.rejections[3].reason is DropReason.WRONG_LENGTH and r.rejections[3].index == 3
    assert r.server.dropouts[3][:2] == (Phase.MASKED_INPUT, DropReason.WRONG_LENGTH)
    assert 3 not in r.server.result.responders  # type: ignore[union-attr]
    r.assert_exact(set(range(1, 7)) - {3})


def test_server_unknown_index_and_message_after_drop() -> None:
    cfg = make_config(6, seed=44)
    r = Round(cfg)
    ak = r.clients[1].advertise_keys()
    for idx in (0, 7, -3):
        with pytest.raises(RemoteProtocolError, match="not a member") as info:
            r.server.receive(dataclasses.replace(ak, index=idx))
        assert info.value.reason is DropReason.NOT_A_MEMBER and info.value.index is None
    r.server.drop(1, DropReason.DISCONNECTED)
    with pytest.raises(RemoteProtocolError, match="already left") as info:
        r.server.receive(ak)
    assert info.value.reason is DropReason.NOT_A_MEMBER and info.value.index == 1
    assert r.server.dropouts[1] == (Phase.ADVERTISE_KEYS, DropReason.DISCONNECTED, "disconnected")
    r.server.drop(1, DropReason.TIMEOUT)   # a second drop does not overwrite the first reason
    assert r.server.dropouts[1][1] is DropReason.DISCONNECTED
    r.inbox.pop(1)
    r.resume()
    r.assert_exact(set(range(2, 7)))


def test_server_malformed_share_keys_and_unmask_response_drop_client() -> None:
    cfg = make_config(9, seed=45)   # t = 5
    r = Round(cfg)

    def up(phase: Phase, i: int, msg: object) -> object:
        if i == 2 and isinstance(msg, ShareKeys):
            return ShareKeys(2, msg.shares[1:])                                  # one share missing
        if i == 3 and isinstance(msg, ShareKeys):
            return ShareKeys(3, tuple(dataclasses.replace(s, ciphertext=s.ciphertext[:-1]) for s in msg.shares))
        if i == 4 and isinstance(msg, UnmaskResponse):
            return UnmaskResponse(4, msg.self_mask_shares[1:], msg.mask_key_shares)
        if i == 5 and isinstance(msg, UnmaskResponse):
            (o, s), *rest = msg.self_mask_shares
            return UnmaskResponse(5, ((o, b"\x02" + s[1:]), *rest), msg.mask_key_shares)   # >= 2^521
        return msg

    r.run(up=up)
    assert {i: e.reason for i, e in r.rejections.items()} == {i: DropReason.MALFORMED for i in (2, 3, 4, 5)}
    assert r.server.dropouts[2][0] is Phase.SHARE_KEYS and r.server.dropouts[4][0] is Phase.UNMASKING
    r.assert_exact({1, 4, 5, 6, 7, 8, 9})
    assert r.server.result.responders == frozenset({1, 6, 7, 8, 9})  # type: ignore[union-attr]


def test_server_rejects_short_public_keys() -> None:
    cfg = make_config(6, seed=46)
    r = Round(cfg)
    r.run(up=lambda p, i, m: dataclasses.replace(m, s_public=m.s_public[:31]) if i == 6 and isinstance(m, AdvertiseKeys) else m)
    assert r.rejections[6].reason is DropReason.MALFORMED
    r.assert_exact(set(range(1, 6)))


def test_server_after_done_or_abort_refuses_everything() -> None:
    cfg = make_config(5, seed=47)
    r = Round(cfg)
    r.run()
    assert r.server.state is ServerState.DONE and r.server.waiting_for() == frozenset()
    with pytest.raises(LocalProtocolError, match="done"):
        r.server.receive(UnmaskResponse(1, (), ()))
    with pytest.raises(LocalProtocolError, match="done"):
        r.server.close_phase()
    s = ServerMachine(cfg)
    with pytest.raises(AbortError, match="threshold"):
        s.close_phase()
    assert s.state is ServerState.ABORTED and "threshold" in s.abort_reason
    with pytest.raises(LocalProtocolError, match="aborted"):
        s.close_phase()


def test_server_waiting_for_and_timeouts() -> None:
    cfg = make_config(5, seed=48)
    s = ServerMachine(cfg)
    clients = {i: machine(cfg, i) for i in range(1, 6)}
    assert s.waiting_for() == frozenset(range(1, 6))
    for i in (1, 2, 3, 4):
        s.receive(clients[i].advertise_keys())
    assert s.waiting_for() == frozenset({5})
    out = s.close_phase()
    assert set(out) == {1, 2, 3, 4}
    assert s.dropouts[5] == (Phase.ADVERTISE_KEYS, DropReason.TIMEOUT, "no advertise_keys message before the deadline")


# ============================================================================ the state table


def _call(c: ClientMachine, method: str) -> object:
    args = {
        "advertise_keys": (),
        "share_keys": (KeysBroadcast(()),),
        "masked_input": (SharesDelivery(c.index, ()), np.zeros(c.config.dim, dtype=c.config.dtype)),
        "receive_shares": (SharesDelivery(c.index, ()),),
        "pass_input": (PassStart(1, frozenset(), np.zeros(0)), np.zeros(c.config.dim, dtype=c.config.dtype)),
        "consistency_check": (ConsistencyRequest(frozenset()),),
        "unmask": (UnmaskRequest(frozenset(), frozenset()),),
    }[method]
    return getattr(c, method)(*args)


@pytest.mark.parametrize("mode", list(Mode))
def test_every_disallowed_state_method_pair_is_a_local_protocol_error(mode: Mode) -> None:
    cfg = make_config(5, mode)
    ident = bytes(32) if mode is ACTIVE else None
    pairs = [(s, m) for s, m in itertools.product(ClientState, TRANSITIONS) if s not in TRANSITIONS[m][0]]
    assert len(pairs) == len(ClientState) * len(TRANSITIONS) - sum(len(v) for v, _ in TRANSITIONS.values())
    for state, method in pairs:
        c = machine(cfg, 1, identity_key=ident)
        c.state = state
        with pytest.raises(LocalProtocolError, match=f"{method} is not allowed in state {state.value}"):
            _call(c, method)
        assert c.state is state, (state, method)


def test_terminal_states_accept_nothing() -> None:
    for state in (ClientState.DONE, ClientState.ABORTED):
        assert all(state not in valid for valid, _ in TRANSITIONS.values())


@pytest.mark.parametrize("mode", list(Mode))
def test_states_follow_the_table_through_a_round(mode: Mode) -> None:
    cfg = make_config(5, mode, seed=51)
    r = Round(cfg)
    method = {Phase.ADVERTISE_KEYS: "advertise_keys", Phase.SHARE_KEYS: "share_keys", Phase.MASKED_INPUT: "masked_input",
              Phase.CONSISTENCY_CHECK: "consistency_check", Phase.UNMASKING: "unmask"}
    for phase in PHASES[mode]:
        before = {i: c.state for i, c in r.clients.items()}
        r.step(phase)
        valid, nxt = TRANSITIONS[method[phase]]
        for i, c in r.clients.items():
            assert before[i] in valid and c.state is nxt
    r.assert_exact(set(range(1, 6)))


def test_consistency_check_is_local_error_in_semi_honest_mode() -> None:
    cfg = make_config(5, seed=52)
    r = Round(cfg)
    r.run_until(Phase.MASKED_INPUT)
    with pytest.raises(LocalProtocolError, match="active mode"):
        r.clients[1].consistency_check(ConsistencyRequest(frozenset(range(1, 6))))
    assert r.clients[1].state is ClientState.MASKED   # not aborted: the caller erred


def test_wrong_encoded_input_is_a_local_error_and_can_be_retried() -> None:
    cfg = make_config(5, seed=53)
    r = Round(cfg)
    r.run_until(Phase.SHARE_KEYS)
    c = r.clients[1]
    for bad in (np.zeros(cfg.dim - 1, dtype=cfg.dtype), np.zeros(cfg.dim, dtype=np.uint64), np.zeros(cfg.dim)):
        with pytest.raises(LocalProtocolError, match="encoded input"):
            c.masked_input(r.inbox[1], bad)  # type: ignore[arg-type]
        assert c.state is ClientState.SHARED
    r.resume()
    r.assert_exact(set(range(1, 6)))


# ============================================================================ determinism


def _recording_server(monkeypatch: pytest.MonkeyPatch) -> list[dict[int, np.ndarray]]:
    runs: list[dict[int, np.ndarray]] = []

    class Recording(ServerMachine):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, **kw)  # type: ignore[arg-type]
            self.masked: dict[int, np.ndarray] = {}
            runs.append(self.masked)

        def receive(self, msg):  # type: ignore[no-untyped-def]
            if isinstance(msg, MaskedInput):
                self.masked[msg.index] = msg.vector.copy()
            return super().receive(msg)

    monkeypatch.setattr(driver, "ServerMachine", Recording)
    return runs


@pytest.mark.parametrize("mode", list(Mode))
def test_deterministic_randbytes_reproduce_masked_vectors_and_aggregate(mode: Mode, monkeypatch: pytest.MonkeyPatch) -> None:
    # no commitments: the driver draws each member's contribution from its own source too
    cfg = dataclasses.replace(make_config(6, mode, seed=61), commitments=())
    inputs = make_inputs(cfg)
    ids = make_identities(cfg)
    runs = _recording_server(monkeypatch)

    def sources(tag: bytes) -> dict[int, Callable[[int], bytes]]:
        return {i: deterministic_randbytes(tag + bytes([i]) * 31) for i in range(1, 7)}

    drops = {Phase.MASKED_INPUT: {4}}
    a = run_group(cfg, inputs, drops=drops, identity_keys=ids, randbytes=sources(b"a"))
    b = run_group(cfg, inputs, drops=drops, identity_keys=ids, randbytes=sources(b"a"))
    c = run_group(cfg, inputs, drops=drops, identity_keys=ids, randbytes=sources(b"c"))
    assert len(runs) == 3
    assert a.config == b.config and a.config != c.config      # same seeds: same contributions, same digest
    assert set(runs[0]) == {1, 2, 3, 5, 6}
    for i in runs[0]:
        assert np.array_equal(runs[0][i], runs[1][i])         # same seeds: identical masked vectors
        assert not np.array_equal(runs[0][i], runs[2][i])     # other seeds: other masks
        assert not np.array_equal(runs[0][i], inputs[i])      # and the input is masked
    assert a.result is not None and b.result is not None and c.result is not None
    assert np.array_equal(a.result.total, b.result.total)
    assert np.array_equal(a.result.total, c.result.total)
    assert np.array_equal(a.result.total, wrapped_sum(inputs, {1, 2, 3, 5, 6}, cfg))


def test_deterministic_randbytes_is_a_reproducible_stream() -> None:
    seed = bytes(range(32))
    r1, r2 = deterministic_randbytes(seed), deterministic_randbytes(seed)
    assert r1(5) + r1(27) == r2(32)
    assert deterministic_randbytes(bytes(32))(16) != r2(16)


# ============================================================================ bench and CLI


@pytest.mark.parametrize("mode", list(Mode))
def test_bench_round_is_correct_and_reports_every_phase(mode: Mode) -> None:
    rep = bench.bench_round(clients=8, dim=100, dropout=0.25, mode=mode)
    assert rep["correct"] is True, rep["aborted"]
    assert rep["aborted"] == ""
    assert rep["survivors"] < 8
    assert set(rep["phases"]) == {p.label for p in PHASES[mode]}
    for ph in rep["phases"].values():
        assert ph["client_seconds_mean"] >= 0 and ph["bytes_up"] > 0
    assert rep["total_seconds"] > 0
    json.dumps(rep)


def test_cli_bench_writes_json(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from secagg.cli.main import main

    path = tmp_path / "out" / "bench.json"
    assert main(["bench", "--clients", "6", "--dim", "50", "--json", str(path)]) == 0
    rep = json.loads(path.read_text())
    assert rep["correct"] is True
    assert isinstance(rep["total_seconds"], float) and rep["total_seconds"] > 0
    assert rep["clients"] == 6 and rep["dim"] == 50
    assert "correct=true" in capsys.readouterr().out


# ============================================================================ regressions: bugs found by review


def test_server_keeps_only_the_running_sum_not_every_masked_vector() -> None:
    cfg = make_config(4, threshold=3, dim=64, seed=71)
    r = Round(cfg)
    r.run_until(Phase.SHARE_KEYS)
    refs = []
    for i in range(1, 5):
        msg = r.clients[i].masked_input(r.inbox[i], r.inputs[i])  # type: ignore[arg-type]
        refs.append(weakref.ref(msg.vector))
        r.server.receive(msg)
        del msg
    gc.collect()
    assert all(ref() is None for ref in refs), "the server still references the clients' masked vectors"


def test_server_rejects_a_copied_public_key_and_the_round_goes_on() -> None:
    cfg = make_config(6, seed=72)
    r = Round(cfg)

    def up(phase: Phase, i: int, msg: object) -> object:
        if i == 6 and isinstance(msg, AdvertiseKeys):
            victim = r.sent[Phase.ADVERTISE_KEYS][1]
            return dataclasses.replace(msg, c_public=victim.c_public, s_public=victim.s_public)  # type: ignore[attr-defined]
        return msg

    try:
        r.run(up=up)
    except AbortError:
        pass
    assert 6 in r.rejections and r.rejections[6].reason is DropReason.MALFORMED
    r.assert_exact(set(range(1, 6)))


def test_server_rejects_a_small_order_public_key_and_the_round_goes_on() -> None:
    cfg = make_config(6, seed=73)
    r = Round(cfg)
    try:
        r.run(up=lambda p, i, m: dataclasses.replace(m, c_public=bytes(32)) if i == 6 and isinstance(m, AdvertiseKeys) else m)
    except AbortError:
        pass
    assert 6 in r.rejections and r.rejections[6].reason is DropReason.MALFORMED
    r.assert_exact(set(range(1, 6)))


@pytest.mark.parametrize("msg", [KeysBroadcast(()), SharesDelivery(1, ()), ConsistencyRequest(frozenset())],
                         ids=["KeysBroadcast", "SharesDelivery", "ConsistencyRequest"])
def test_server_refuses_a_non_client_message_with_local_protocol_error(msg: object) -> None:
    s = ServerMachine(make_config(5))
    with pytest.raises(LocalProtocolError, match="not a client message"):
        s.receive(msg)  # type: ignore[arg-type]


def test_server_deadline_is_injected_time() -> None:
    """The core never reads a clock: the caller passes ``now`` and asks whether the phase is due."""
    cfg = make_config(4, seed=90)
    clients = {i: machine(cfg, i) for i in range(1, 5)}
    server = ServerMachine(cfg, phase_seconds=10.0, now=100.0)
    assert server.deadline == 110.0 and not server.ready_to_close(now=109.9)
    for i in (1, 2, 3):
        server.receive(clients[i].advertise_keys())
    assert not server.ready_to_close(now=105.0)          # client 4 is still expected
    assert server.ready_to_close(now=110.0)              # ... but the deadline has come
    out = server.close_phase(now=110.0)
    assert set(out) == {1, 2, 3} and server.dropouts[4][1] is DropReason.TIMEOUT
    assert server.deadline == 120.0 and server.phase is Phase.SHARE_KEYS
    for i in (1, 2, 3):
        server.receive(clients[i].share_keys(out[i]))  # type: ignore[arg-type]
    assert server.ready_to_close(now=111.0)              # everyone expected has answered
