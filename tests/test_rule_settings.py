"""Rules as the papers run them: bucketing size s, f from an assumed fraction (never the true
count), worker momentum, centered clipping centred on the previous aggregate."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.protocol import robust
from secagg.protocol.robust import aggregate, assumed_f, bucket_means, bucket_seed
from secagg.simulation.attacks import AttackConfig
from secagg.simulation.fl import Federation, FLConfig, run_in_memory


def test_bucketing_averages_shuffled_buckets_of_s() -> None:
    x = np.arange(14.0).reshape(7, 2)
    means, w, perm = bucket_means(x, 3, seed=bucket_seed("t", 1))
    assert sorted(perm.tolist()) == list(range(7)) and perm.tolist() != list(range(7))
    np.testing.assert_allclose(means, [x[perm[0:3]].mean(0), x[perm[3:6]].mean(0), x[perm[6:]].mean(0)])
    assert w is None
    wts = np.array([1.0, 2, 3, 4, 5, 6, 7])
    wm, bw, _ = bucket_means(x, 3, seed=bucket_seed("t", 1), weights=wts)
    np.testing.assert_allclose(bw, [wts[perm[0:3]].sum(), wts[perm[3:6]].sum(), wts[perm[6]]])
    np.testing.assert_allclose(wm[0], (x[perm[0:3]] * wts[perm[0:3], None]).sum(0) / bw[0])
    # the same seed, the same buckets; s = 1 is the identity
    np.testing.assert_array_equal(bucket_means(x, 3, seed=bucket_seed("t", 1))[2], perm)
    np.testing.assert_array_equal(bucket_means(x, 1)[0], x)


def test_aggregate_with_bucketing_runs_the_rule_over_bucket_means_with_f_capped() -> None:
    x = np.random.default_rng(0).normal(size=(10, 3))
    seed = bucket_seed("t", 2)
    out = aggregate("median", x, f=4, bucket=2, bucket_seed=seed)
    np.testing.assert_allclose(out.vector, np.median(bucket_means(x, 2, seed=seed)[0], axis=0))
    assert out.info["buckets"] == 5 and out.info["bucket"] == 2
    tm = aggregate("trimmed_mean", x, f=4, bucket=2, bucket_seed=seed)   # 5 buckets: trim capped to 2
    assert tm.info["trim"] == 2 and tm.info["f"] == 2
    with pytest.raises(ValueError, match="bucket"):
        aggregate("median", x, bucket=0)


def test_assumed_f_counts_the_worst_placement_of_the_assumed_attackers() -> None:
    assert assumed_f(0.2, 25, 25) == 5          # 5 attackers, one per input
    assert assumed_f(0.2, 25, 5) == 4           # 5 attackers could spoil every group: f stops at g - 1
    assert assumed_f(0.0, 25, 5) == 0
    assert assumed_f(0.1, 30, 15) == 3
    with pytest.raises(ValueError, match="fraction"):
        assumed_f(1.0, 10, 5)


def test_the_rule_gets_f_from_the_assumption_not_from_who_attacks() -> None:
    # the same assumed fraction, with and without attackers: the same f every round
    base = dict(clients=20, groups=10, rounds=2, rule="trimmed_mean", assumed_byzantine=0.1, seed=1)
    clean = run_in_memory(FLConfig(**base))
    attacked = run_in_memory(FLConfig(**base, attack=AttackConfig("scaling", scale=-100.0), byzantine=0.3))
    assert [m.f for m in clean.rounds] == [m.f for m in attacked.rounds] == [2, 2]


def test_worker_momentum_is_the_exponential_average_of_deltas() -> None:
    fed = Federation(FLConfig(clients=6, groups=3, rounds=3, momentum=0.9))
    p0 = fed.initial_params()
    d0 = fed.honest_update(2, p0, 0)
    np.testing.assert_allclose(fed.sent_honest(2, p0, 0), d0)          # m starts at the first delta
    np.testing.assert_allclose(fed.sent_honest(2, p0, 0), d0)          # a repeat call does not advance it
    p1 = p0 + 0.1
    d1 = fed.honest_update(2, p1, 1)
    np.testing.assert_allclose(fed.sent_honest(2, p1, 1), 0.9 * d0 + 0.1 * d1)


def test_centered_clipping_is_centred_on_the_previous_aggregate(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[np.ndarray] = []
    outs: list[np.ndarray] = []
    real = robust.centered_clipping

    def spy(points, **kw):  # record the centre the driver passes; the real rule still runs
        seen.append(np.array(kw["center"]))
        out = real(points, **kw)
        outs.append(out.vector.copy())
        return out

    monkeypatch.setattr(robust, "centered_clipping", spy)
    res = run_in_memory(FLConfig(clients=10, groups=5, rounds=3, rule="centered_clipping",
                                 rule_params={"tau": 0.5, "iters": 1}, momentum=0.5))
    assert len(seen) == 3 and not np.any(seen[0])                       # round 0: the zero vector
    assert all(m.updated for m in res.rounds)
    for r in (1, 2):                                                     # then the previous aggregate
        np.testing.assert_array_equal(seen[r], outs[r - 1])
        assert np.linalg.norm(seen[r]) > 0
