"""Why the default policy refuses semi-honest rounds: a server that deviates unmasks one client.

In semi-honest mode round keys are unsigned, so a server can seat members it invented (it
holds their key pairs), collect the victim's shares of its self-mask seed through them, and
subtract the victim's whole mask from its masked input: the update, exactly, with no honest
party ever asked for both kinds of share.  The same attack in active mode with the victim's
pinned identities is refused (invented seats cannot sign under the pinned keys), and under
the default policy the semi-honest configuration is refused before any key exists.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from secagg.protocol import shamir, signatures, thresholds
from secagg.protocol.client import ClientMachine, mask_vector
from secagg.protocol.driver import with_contributions
from secagg.protocol.encoding import EncodingParams, decode, encode
from secagg.protocol.errors import AbortError
from secagg.protocol.messages import GroupConfig, Mode
from secagg.protocol.policy import ClientPolicy, PolicyViolation
from secagg.protocol.server import ServerMachine

M, DIM = 6, 32
PARAMS = EncodingParams(clip_norm=5.0)


def config(mode: Mode) -> tuple[GroupConfig, dict[int, bytes]]:
    base = GroupConfig(session=os.urandom(32), members=M, threshold=thresholds.default(M, Mode.ACTIVE), dim=DIM + 2,
                       modulus_bits=PARAMS.modulus_bits(M), mode=mode)
    return with_contributions(base)


def test_a_deviating_server_recovers_one_update_in_semi_honest_mode():
    cfg, contributions = config(Mode.SEMI_HONEST)
    update = np.linspace(-1, 1, DIM)
    x = encode(update, PARAMS, M, rounding_seed=os.urandom(32))
    victim = ClientMachine(cfg, 1, contribution=contributions[1], policy=ClientPolicy.semi_honest())
    # every other seat is the server's own invention: it runs those machines and keeps their secrets
    fakes = {i: ClientMachine(cfg, i, contribution=contributions[i], policy=ClientPolicy.lenient()) for i in range(2, M + 1)}
    server = ServerMachine(cfg)
    for c in (victim, *fakes.values()):
        server.receive(c.advertise_keys())
    broadcast = server.close_phase()
    for i, c in {1: victim, **fakes}.items():
        server.receive(c.share_keys(broadcast[i]))
    deliveries = server.close_phase()
    masked = victim.masked_input(deliveries[1], x)          # all the server ever gets from the victim
    for i, c in fakes.items():
        c.masked_input(deliveries[i], np.zeros(cfg.dim, cfg.dtype))
    # the fakes decrypted the victim's shares of b_1 (their AEAD keys are the server's)
    shares = [shamir.share_from_bytes(i, c._held_b[1]) for i, c in fakes.items()]
    b1 = shamir.reconstruct(shares, cfg.threshold)
    pair_seeds = {i: c._mask_seeds[1] for i, c in fakes.items()}
    recovered = masked.vector - mask_vector(cfg.dim, cfg.dtype, b1, pair_seeds, 1)
    assert np.array_equal(recovered, x)
    np.testing.assert_allclose(decode(recovered, PARAMS).total, update, atol=1.0 / PARAMS.scale)


def test_the_default_policy_refuses_that_round_before_any_key_exists():
    cfg, contributions = config(Mode.SEMI_HONEST)
    drawn: list[int] = []
    with pytest.raises(PolicyViolation, match="mode is semi-honest"):
        ClientMachine(cfg, 1, contribution=contributions[1], randbytes=lambda n: drawn.append(n) or os.urandom(n))
    assert not drawn


def test_in_active_mode_invented_seats_cannot_sign_under_pinned_identities():
    cfg, contributions = config(Mode.ACTIVE)
    real = {i: os.urandom(32) for i in range(1, M + 1)}        # the members' registered identity keys
    invented = {i: os.urandom(32) for i in range(2, M + 1)}    # what the server would sign with instead
    pinned = {i: signatures.public_key(k) for i, k in real.items()}
    victim = ClientMachine(cfg, 1, contribution=contributions[1], identity_key=real[1], pinned_identities=pinned)
    fakes = {i: ClientMachine(cfg, i, contribution=contributions[i], identity_key=invented[i], policy=ClientPolicy.lenient())
             for i in range(2, M + 1)}
    server = ServerMachine(cfg, identities={1: pinned[1], **{i: signatures.public_key(k) for i, k in invented.items()}})
    for c in (victim, *fakes.values()):
        server.receive(c.advertise_keys())
    broadcast = server.close_phase()
    with pytest.raises(AbortError, match="not the one pinned"):
        victim.share_keys(broadcast[1])                    # no share of the victim's secrets ever leaves it
