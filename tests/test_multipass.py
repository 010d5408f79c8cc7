"""Multi-pass rounds: one key agreement, P masked inputs, robust rules over individual clients.

The key schedule (pass 1 of a single-pass round is today's round; every pass has its own seeds),
exact sums on every pass with dropouts between and within passes, RFA and centered clipping
through secure sums against their plaintext definitions, and the honest client's refusals:
too many passes, a mask key after an earlier pass was unmasked, a pairwise secret and a root
of the same member, a replayed or skipped pass, different public values in one pass.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from secagg.protocol import prg, robust
from secagg.protocol.client import ClientMachine
from secagg.protocol.driver import GroupDriver, deterministic_randbytes, run_group
from secagg.protocol.encoding import EncodingParams, to_signed
from secagg.protocol.errors import AbortError, RemoteProtocolError
from secagg.protocol.individual import IndividualRule, pass_words
from secagg.protocol.keys import Purpose, pair_seed, pass_self_seed
from secagg.protocol.messages import GroupConfig, Mode, PassStart, Phase, UnmaskRequest
from secagg.protocol.multipass import multipass_config, run_multipass
from secagg.protocol.policy import ClientPolicy, PolicyViolation

PARAMS = EncodingParams(clip_norm=1.0, precision_bits=24)


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _updates(groups: int, members: int, dim: int, seed: int, outliers: int = 0) -> list[dict[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for g in range(groups):
        ups = {i: 0.3 * np.ones(dim) / np.sqrt(dim) + 0.05 * rng.standard_normal(dim) for i in range(1, members + 1)}
        for i in range(1, outliers + 1):
            ups[i] = -0.9 * np.ones(dim) / np.sqrt(dim)   # far from the honest cluster, inside the ball
        out.append(ups)
    return out


# ============================================================================ key schedule


def test_a_single_pass_round_masks_exactly_as_before_passes_existed() -> None:
    """P = 1: the masked input is x + PRG(b) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv) with
    s_uv = HKDF(DH, salt=digest, info=version|purpose|lo|hi), recomputed here from the primitives."""
    cfg = GroupConfig(session=bytes(range(32)), members=3, threshold=2, dim=6, mode=Mode.SEMI_HONEST)
    assert cfg.pass_tag(1) == 0 and cfg.digest == dataclasses.replace(cfg, passes=1).digest
    assert dataclasses.replace(cfg, passes=2).digest != cfg.digest
    rb = {i: deterministic_randbytes(bytes([i]) * 32) for i in (1, 2, 3)}
    inputs = {i: np.arange(6, dtype=np.uint32) * i for i in (1, 2, 3)}
    captured: dict[int, np.ndarray] = {}
    original = ClientMachine.masked_input

    def spy(self: ClientMachine, delivery, encoded):  # type: ignore[no-untyped-def]
        out = original(self, delivery, encoded)
        captured[self.index] = out.vector.copy()
        machines[self.index] = self
        return out

    machines: dict[int, ClientMachine] = {}
    ClientMachine.masked_input = spy  # type: ignore[method-assign]
    try:
        run = run_group(cfg, inputs, randbytes=rb)
    finally:
        ClientMachine.masked_input = original  # type: ignore[method-assign]
    c1 = machines[1]
    digest = run.config.digest  # type: ignore[union-attr]
    sk = X25519PrivateKey.from_private_bytes(c1._s.private)  # type: ignore[union-attr]
    expect = inputs[1].copy()
    expect += prg.expand(c1._self_seed, 6)
    for v in (2, 3):
        shared = sk.exchange(X25519PublicKey.from_public_bytes(machines[v]._s.public))  # type: ignore[union-attr]
        info = b"|".join((b"secagg/v1", b"pairwise-mask-seed", (1).to_bytes(4, "big"), v.to_bytes(4, "big")))
        expect += prg.expand(_hkdf(shared, digest, info), 6)
    assert np.array_equal(captured[1], expect)
    assert np.array_equal(run.result.total, sum(inputs.values()))  # type: ignore[union-attr]


def test_every_pass_has_its_own_seeds_and_a_pass_seed_reveals_no_other() -> None:
    shared, session, root = os.urandom(32), os.urandom(32), os.urandom(32)
    seeds = {p: pair_seed(shared, session=session, purpose=Purpose.MASK_SEED, u=1, v=2, pass_tag=p) for p in range(4)}
    assert len(set(seeds.values())) == 4   # tag 0 (single pass) and passes 1..3 all differ
    info = b"|".join((b"secagg/v1", b"pairwise-mask-seed", (1).to_bytes(4, "big"), (2).to_bytes(4, "big"), b"pass", (2).to_bytes(4, "big")))
    assert seeds[2] == _hkdf(shared, session, info)
    assert pass_self_seed(root, session=session, index=1, pass_tag=0) == root
    selfs = [pass_self_seed(root, session=session, index=1, pass_tag=p) for p in (1, 2, 3)]
    assert len(set(selfs)) == 3 and root not in selfs
    assert pass_self_seed(root, session=session, index=2, pass_tag=1) != selfs[0]


# ============================================================================ exact sums


def _exact_run(mode: Mode, **kw: object) -> tuple[object, dict]:
    rule = IndividualRule("cclip_secure", passes=3, tau=0.5)
    updates = _updates(2, 10, 8, seed=3)
    sent: dict[tuple[int, int, int], np.ndarray] = {}

    def record(g: int, i: int, start: PassStart, m: int) -> np.ndarray:
        words = pass_words(rule, updates[g][i], start.public, PARAMS, m, rounding_seed=os.urandom(32))
        sent[g, start.pass_index, i] = words
        return words

    run = run_multipass(rule, updates, PARAMS, mode=mode, input_for=record, **kw)  # type: ignore[arg-type]
    return run, sent


def _assert_each_pass_exact(run, sent: dict, groups: int) -> None:  # type: ignore[no-untyped-def]
    for g in range(groups):
        d = run.drivers[g]
        assert len(d.pass_results) == 3, run.aborted
        for p, res in enumerate(d.pass_results, start=1):
            expect = sum(sent[g, p, i] for i in res.survivors)
            assert np.array_equal(res.total, expect), (g, p)


@pytest.mark.parametrize("mode", [Mode.SEMI_HONEST, Mode.ACTIVE])
def test_every_pass_is_exact_with_dropouts_between_and_within_passes(mode: Mode) -> None:
    drops = {
        0: {1: {Phase.MASKED_INPUT: frozenset({10})},      # never sent an input: its mask key is recovered
            2: {Phase.MASKED_INPUT: frozenset({9})}},      # unmasked in pass 1, gone before pass 2's input: pair seeds
        1: {3: {Phase.MASKED_INPUT: frozenset({2})}},
    }
    if mode is Mode.ACTIVE:   # sent pass 2's input, never signed: its self-mask root is recovered
        drops[1][2] = {Phase.CONSISTENCY_CHECK: frozenset({4})}
    left = {1: {2: frozenset({10})}}                       # closed its stream between passes 1 and 2
    run, sent = _exact_run(mode, drops=drops, left=left)
    assert not run.aborted and run.estimate is not None
    _assert_each_pass_exact(run, sent, 2)
    g0 = run.drivers[0].pass_results
    assert [sorted(r.survivors) for r in g0] == [list(range(1, 10)), list(range(1, 9)), list(range(1, 9))]
    g1 = run.drivers[1].pass_results
    assert sorted(g1[1].survivors) == list(range(1, 10))
    assert sorted(g1[2].survivors) == [i for i in range(1, 10) if i != 2 and (i != 4 or mode is Mode.SEMI_HONEST)]
    assert run.drivers[1].server.dropouts[10][1].value == "disconnected"


def test_a_member_that_leaves_after_its_input_and_a_peer_before_its_own_aborts_only_that_group() -> None:
    """Semi-honest: a survivor of pass 1 that sends pass 2's input and then leaves has no seed to
    reveal, and its root would unmask nothing new but the pair seed with a member that left before
    its input is then unrecoverable: the group aborts instead of releasing a wrong sum."""
    drops = {0: {2: {Phase.MASKED_INPUT: frozenset({5}), Phase.UNMASKING: frozenset({4})}}}
    run, sent = _exact_run(Mode.SEMI_HONEST, drops=drops)
    assert 0 in run.aborted and "neither revealed its pass seed" in run.aborted[0]
    assert 1 not in run.aborted and run.estimate is not None
    assert len(run.outcomes) == 3 and run.outcomes[2].accepted == (1,)


# ============================================================================ rules vs plaintext


def _weiszfeld(x: np.ndarray, nu: float, iters: int) -> np.ndarray:
    """Smoothed Weiszfeld (Pillutla et al.): start at the mean, v <- sum b_i x_i / sum b_i with
    b_i = 1 / max(nu, ||x_i - v||); written out here as the independent reference."""
    v = x.mean(axis=0)
    for _ in range(iters):
        b = 1.0 / np.maximum(nu, np.linalg.norm(x - v, axis=1))
        v = (b[:, None] * x).sum(axis=0) / b.sum()
    return v


def test_rfa_through_secure_sums_equals_plaintext_smoothed_weiszfeld() -> None:
    rule = IndividualRule("rfa_secure", passes=5, nu=1e-3)
    updates = _updates(3, 5, 16, seed=11, outliers=2)
    run = run_multipass(rule, updates, PARAMS)
    x = np.stack([u for g in updates for u in g.values()])
    expect = _weiszfeld(x, 1e-3, 4)
    assert run.estimate is not None and len(run.outcomes) == 5
    assert np.max(np.abs(run.estimate - expect)) < 1e-5
    assert np.linalg.norm(expect - x.mean(axis=0)) > 0.05   # the rule did something the mean does not
    assert run.outcomes[0].weight_total == pytest.approx(15, abs=1e-5)


def test_centered_clipping_through_secure_sums_equals_the_plaintext_rule() -> None:
    rule = IndividualRule("cclip_secure", passes=3, tau=0.2)
    updates = _updates(3, 5, 16, seed=12, outliers=2)
    center = np.full(16, 0.05)
    run = run_multipass(rule, updates, PARAMS, center=center, mode=Mode.ACTIVE)
    x = np.stack([u for g in updates for u in g.values()])
    expect = robust.centered_clipping(x, tau=0.2, iters=3, center=center).vector
    assert run.estimate is not None
    assert np.max(np.abs(run.estimate - expect)) < 1e-5
    assert np.linalg.norm(expect - x.mean(axis=0)) > 0.05


def test_a_group_whose_pass_sum_fails_the_checks_takes_no_further_part() -> None:
    rule = IndividualRule("rfa_secure", passes=3, nu=1e-3)
    updates = _updates(3, 5, 8, seed=13)

    def bypass(g: int, i: int, start: PassStart, m: int) -> np.ndarray:
        words = pass_words(rule, updates[g][i], start.public, PARAMS, m, rounding_seed=os.urandom(32))
        if g == 2 and i == 1 and start.pass_index == 2:
            words = words.copy()
            words[-3] += np.uint64(10 << 24) if words.dtype == np.uint64 else np.uint32(10 << 24)  # weight 10 > 1
        return words

    run = run_multipass(rule, updates, PARAMS, input_for=bypass)
    assert run.outcomes[1].accepted == (0, 1) and "weight total" in run.outcomes[1].rejected[2][0]
    assert run.outcomes[2].accepted == (0, 1) and 2 in run.aborted


# ============================================================================ refusals


def test_a_client_refuses_more_passes_than_its_policy_allows() -> None:
    cfg = dataclasses.replace(multipass_config(5, 4, 1000, PARAMS, mode=Mode.ACTIVE), commitments=(bytes(32),) * 5)
    with pytest.raises(PolicyViolation, match="passes is 1000, policy requires at most 10"):
        ClientMachine(cfg, 1, contribution=bytes(32), identity_key=bytes(32), policy=ClientPolicy())


def _two_passes_done_one(mode: Mode = Mode.SEMI_HONEST) -> GroupDriver:
    cfg = multipass_config(5, 4, 2, PARAMS, mode=mode)
    keys = {i: os.urandom(32) for i in range(1, 6)} if mode is Mode.ACTIVE else None
    d = GroupDriver(cfg, identity_keys=keys)
    d.keys({})
    zero = lambda i, start: np.zeros(cfg.dim, dtype=cfg.dtype)  # noqa: E731
    d.run_pass(np.zeros(0), zero)
    return d


def test_after_a_pass_was_unmasked_a_client_never_reveals_that_members_mask_key() -> None:
    d = _two_passes_done_one()
    c = d.clients[1]
    start = PassStart(2, frozenset(range(1, 6)), np.zeros(0))
    c.pass_input(start, np.zeros(d.config.dim, dtype=d.config.dtype))
    with pytest.raises(AbortError, match="mask key of client\\(s\\) \\[5\\], whose self-mask seeds of an earlier pass"):
        c.unmask(UnmaskRequest(frozenset({1, 2, 3, 4}), frozenset({5}), pass_index=2))


def test_a_client_never_reveals_a_pairwise_secret_of_a_member_whose_root_it_revealed() -> None:
    cfg = multipass_config(5, 4, 3, PARAMS)
    d = GroupDriver(cfg)
    d.keys({})
    c = d.clients[1]
    zeros = np.zeros(cfg.dim, dtype=cfg.dtype)
    c.pass_input(PassStart(1, frozenset(range(1, 6)), np.zeros(0)), zeros)
    c.unmask(UnmaskRequest(frozenset(range(1, 6)), frozenset(), pass_index=1, recover=frozenset({5})))
    with pytest.raises(AbortError, match="member\\(s\\) \\[5\\] whose secrets we helped reveal"):
        c.pass_input(PassStart(2, frozenset(range(1, 6)), np.zeros(0)), zeros)
    c2 = d.clients[2]
    c2.pass_input(PassStart(1, frozenset(range(1, 6)), np.zeros(0)), zeros)
    c2.unmask(UnmaskRequest(frozenset(range(1, 6)), frozenset(), pass_index=1, recover=frozenset({5})))
    c2.state = type(c2.state).BETWEEN_PASSES
    c2.pass_input(PassStart(2, frozenset(range(1, 5)), np.zeros(0)), zeros)
    with pytest.raises(AbortError, match="pairwise secret and the self-mask root of client\\(s\\) \\[5\\]"):
        c2.unmask(UnmaskRequest(frozenset(range(1, 5)), frozenset(), pass_index=2, dropped_pairs=frozenset({5})))


@pytest.mark.parametrize("pass_index", [1, 3])
def test_a_client_refuses_a_replayed_or_skipped_pass(pass_index: int) -> None:
    d = _two_passes_done_one()
    with pytest.raises(AbortError, match=f"server opened pass {pass_index}; the next pass is 2 of 2"):
        d.clients[1].pass_input(PassStart(pass_index, frozenset(range(1, 6)), np.zeros(0)), np.zeros(d.config.dim, dtype=d.config.dtype))


def test_members_shown_different_public_values_refuse_to_unmask_together() -> None:
    """Active mode: the consistency signature binds the pass and its public value, so a server
    that shows client 1 another estimate (to steer its weight) cannot collect its unmasking."""
    d = _two_passes_done_one(Mode.ACTIVE)
    cfg = d.config
    honest, other = np.full(4, 0.1), np.full(4, -0.1)
    inputs = np.zeros(cfg.dim, dtype=cfg.dtype)
    sigs = []
    for i in range(1, 6):
        c = d.clients[i]
        c.pass_input(PassStart(2, frozenset(range(1, 6)), other if i == 1 else honest), inputs)
    u3 = frozenset(range(1, 6))
    from secagg.protocol.messages import ConsistencyRequest

    sigs = tuple(d.clients[i].consistency_check(ConsistencyRequest(u3)) for i in range(1, 6))
    # client 1 sees 4 signatures over another value: fewer than t = 4 valid ones
    with pytest.raises(RemoteProtocolError, match="signature of client 2 does not verify"):
        d.clients[1].unmask(UnmaskRequest(u3, frozenset(), sigs, pass_index=2))
    # the others see client 1's bad signature but 4 valid ones: they proceed without it being valid
    out = d.clients[2].unmask(UnmaskRequest(u3, frozenset(), tuple(s for s in sigs if s.index != 1), pass_index=2))
    assert out.own_seed
