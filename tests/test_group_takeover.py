"""Group takeover: what the sum checks cannot stop, measured.

One member that skips the client library sends ``n*v - (sum of the others)`` and claims
``n*B^2 - (the others' claims)`` as its squared norm.  Its own vector is up to (2n-1)*B long,
yet every check on the group sum passes and the group mean is exactly the attacker's target
``v`` (to the quantisation step) for any ``||v|| <= B``.  docs/threat-model.md and
docs/robust-rules.md state this as the rule: a group with one bypassing member is
attacker-controlled inside the B-ball.
"""

from __future__ import annotations

import numpy as np
import pytest
from secagg.protocol.aggregation import bounds_of
from secagg.protocol.checks import check_group_sum
from secagg.protocol.encoding import EncodingParams, decode, embed, encode, to_signed

PARAMS = EncodingParams(clip_norm=5.0, precision_bits=16)
DIM = 64


def honest_group(n_honest: int, direction: np.ndarray, seed: int) -> list[np.ndarray]:
    """Honest members at the full norm B, all along ``direction``: the attacker's hardest case
    for the norm it needs, since it must cancel them before adding its target."""
    words = []
    for i in range(n_honest):
        x = direction * PARAMS.clip_norm
        words.append(encode(x, PARAMS, n_honest + 1, rounding_seed=bytes([seed, i]) * 16))
    return words


def takeover_words(honest: list[np.ndarray], target: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """The bypassing member's words: it knows the others' encodings (omniscient, as the threat model allows)."""
    others = np.sum([to_signed(w).astype(np.int64) for w in honest], axis=0)
    want = np.empty(DIM + 2, dtype=np.int64)
    want[:DIM] = np.round(n * target * PARAMS.scale)
    want[-2] = n                                                     # the count must say n
    want[-1] = int(np.floor(n * PARAMS.clip_norm**2 * PARAMS.sqnorm_scale))   # fill the squared-norm budget
    q = want - others
    raw_norm = float(np.linalg.norm(q[:DIM] / PARAMS.scale))
    return embed(q, PARAMS.dtype(n)), raw_norm


@pytest.mark.parametrize("n", [2, 5, 10])
def test_one_bypassing_member_sets_its_groups_mean_and_passes_every_check(n):
    rng = np.random.default_rng(n)
    u = rng.standard_normal(DIM)
    u /= np.linalg.norm(u)
    honest = honest_group(n - 1, u, seed=n)
    target = -PARAMS.clip_norm * u                                   # the opposite of the honest mean, at the bound
    attacker, attacker_norm = takeover_words(honest, target, n)
    total = np.sum([*honest, attacker], axis=0, dtype=PARAMS.dtype(n))   # what unmasking reveals, mod 2^k
    dec = decode(total, PARAMS)
    verdict = check_group_sum(dec.total, dec.count, dec.sqnorm_total, n, bounds_of(PARAMS))
    assert verdict.accepted, verdict.reasons
    np.testing.assert_allclose(dec.mean(n), target, atol=1.0 / PARAMS.scale)   # the mean is the attacker's choice
    assert attacker_norm == pytest.approx((2 * n - 1) * PARAMS.clip_norm, rel=1e-3)   # (2n-1)B, far above B


def test_takeover_reaches_any_target_in_the_ball_but_not_beyond():
    """Inside the B-ball every target passes; a target just outside it is caught by the norm check."""
    n = 5
    rng = np.random.default_rng(0)
    u = rng.standard_normal(DIM)
    u /= np.linalg.norm(u)
    honest = honest_group(n - 1, u, seed=1)
    for trial in range(20):
        v = rng.standard_normal(DIM)
        v *= PARAMS.clip_norm * rng.uniform(0, 1) / np.linalg.norm(v)
        total = np.sum([*honest, takeover_words(honest, v, n)[0]], axis=0, dtype=PARAMS.dtype(n))
        dec = decode(total, PARAMS)
        assert check_group_sum(dec.total, dec.count, dec.sqnorm_total, n, bounds_of(PARAMS)).accepted, trial
    outside = -1.01 * PARAMS.clip_norm * u
    total = np.sum([*honest, takeover_words(honest, outside, n)[0]], axis=0, dtype=PARAMS.dtype(n))
    dec = decode(total, PARAMS)
    verdict = check_group_sum(dec.total, dec.count, dec.sqnorm_total, n, bounds_of(PARAMS))
    assert not verdict.accepted and any(r.startswith("norm") for r in verdict.reasons), verdict.reasons
