"""Adaptive attacks on the rule's inputs, each against its paper's construction on a hand case,
and group takeover as the in-memory driver runs it (every check passes, the mean is the target)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from secagg.protocol.aggregation import bounds_of
from secagg.protocol.checks import check_group_sum
from secagg.protocol.encoding import decode
from secagg.protocol.robust import krum
from secagg.simulation.attacks import (AttackConfig, alie_vector, craft_update, fang_krum_lambda_bound,
                                       fang_krum_vectors, fang_trim_vectors, group_targets, min_max_vector,
                                       min_sum_vector)
from secagg.simulation.fl import Federation, FLConfig, feasible_target

BENIGN = np.array([[1.0, -2.0, 0.5], [2.0, -1.0, 0.25], [1.5, -3.0, 1.0], [3.0, -1.5, -0.5]])


def test_fang_trim_samples_past_the_benign_extremes_against_the_mean_direction() -> None:
    # mean = (1.875, -1.875, 0.3125): s = (+, -, +). Coordinate 0: w_min = 1 > 0 -> [1/2, 1];
    # coordinate 1: w_max = -1 < 0 -> [-1, -1/2]; coordinate 2: w_min = -0.5 < 0 -> [-1, -0.5].
    out = fang_trim_vectors(BENIGN, 200, np.random.default_rng(0), b=2.0)
    lo, hi = np.array([0.5, -1.0, -1.0]), np.array([1.0, -0.5, -0.5])
    assert out.shape == (200, 3) and np.all(out >= lo) and np.all(out <= hi)
    assert np.all(out.min(axis=0) < lo + 0.05) and np.all(out.max(axis=0) > hi - 0.05)   # the whole interval


def test_fang_krum_is_the_first_halving_of_the_bound_that_krum_selects() -> None:
    rng = np.random.default_rng(1)
    benign = rng.normal(0.05, 1.0, size=(8, 5))   # spread wide relative to the mean, as updates are
    c, f = 3, 3
    n, d = 11, 5
    # the bound by hand: distances to the n - c - 2 = 6 nearest benign neighbours
    dist = np.linalg.norm(benign[:, None] - benign[None], axis=-1)
    near = [np.sort(np.delete(dist[i], i))[:6].sum() for i in range(8)]
    bound = min(near) / ((n - 2 * c - 1) * math.sqrt(d)) + np.linalg.norm(benign, axis=1).max() / math.sqrt(d)
    assert fang_krum_lambda_bound(benign, n, c) == pytest.approx(bound, rel=1e-12)
    crafted = fang_krum_vectors(benign, c, f)
    s = np.sign(benign.mean(axis=0))
    lam = -crafted[0] @ s / d
    np.testing.assert_allclose(crafted, np.tile(-lam * s, (c, 1)), rtol=1e-12)
    k = round(math.log2(bound / lam))
    assert lam == pytest.approx(bound / 2**k, rel=1e-9)                     # a halving of the bound
    assert krum(np.vstack([crafted, benign]), f=f).selected[0] < c         # Krum picks a crafted input
    bigger = np.tile(-2 * lam * s, (c, 1))
    assert k == 0 or krum(np.vstack([bigger, benign]), f=f).selected[0] >= c   # and the previous one failed


def _largest_gamma(benign: np.ndarray, p: np.ndarray, limit: float, kind: str) -> float:
    """Closed form of Shejwalkar & Houmansadr's constraint in gamma (a quadratic)."""
    mean = benign.mean(axis=0)
    a = mean - benign
    if kind == "min_max":   # ||a_i - g p||^2 <= L for all i: the smallest positive root over i
        pp, ap, aa = p @ p, a @ p, np.einsum("ij,ij->i", a, a)
        return float(np.min((ap + np.sqrt(ap**2 - pp * (aa - limit))) / pp))
    # min-sum: sum_i ||a_i - g p||^2 = sum ||a_i||^2 + k g^2 ||p||^2 (sum_i a_i = 0)
    return float(np.sqrt((limit - np.sum(a * a)) / (len(benign) * (p @ p))))


@pytest.mark.parametrize("deviation", ["std", "unit_vec", "sign"])
def test_min_max_and_min_sum_find_the_largest_gamma_of_the_paper(deviation: str) -> None:
    rng = np.random.default_rng(2)
    benign = rng.normal(0.0, 1.0, size=(6, 4)) + np.array([1.0, 0.5, -0.2, 0.0])
    mean = benign.mean(axis=0)
    p = {"std": benign.std(axis=0), "unit_vec": mean / np.linalg.norm(mean), "sign": np.sign(mean)}[deviation]
    d2 = ((benign[:, None] - benign[None]) ** 2).sum(-1)
    g_max = _largest_gamma(benign, p, d2.max(), "min_max")
    g_sum = _largest_gamma(benign, p, d2.sum(axis=1).max(), "min_sum")
    np.testing.assert_allclose(min_max_vector(benign, deviation), mean - g_max * p, atol=1e-4 * np.abs(p).max())
    np.testing.assert_allclose(min_sum_vector(benign, deviation), mean - g_sum * p, atol=1e-4 * np.abs(p).max())


def test_group_alie_uses_the_group_count_and_ipm_the_group_means() -> None:
    # 6 rule inputs, 2 bad: s = floor(6/2 + 1) - 2 = 2, z = Phi^-1(4/6)
    z = 0.4307272992954576
    np.testing.assert_allclose(alie_vector(BENIGN, 6, 2), BENIGN.mean(0) - z * BENIGN.std(0), rtol=1e-12)
    t = group_targets(AttackConfig("alie"), BENIGN, n_inputs=6, n_bad=2, rule_f=2, clip_norm=5.0,
                      rng=np.random.default_rng(0))
    np.testing.assert_allclose(t, np.tile(BENIGN.mean(0) - z * BENIGN.std(0), (2, 1)), rtol=1e-12)
    t = group_targets(AttackConfig("ipm", ipm_epsilon=0.5), BENIGN, n_inputs=6, n_bad=2, rule_f=2, clip_norm=5.0,
                      rng=np.random.default_rng(0))
    np.testing.assert_allclose(t, np.tile(-0.5 * BENIGN.mean(0), (2, 1)), rtol=1e-12)


def test_model_replacement_boosts_by_n_over_eta_unlike_scaling() -> None:
    own = np.array([0.1, -0.2, 0.3])
    out = craft_update(AttackConfig("model_replacement"), own, np.empty((0, 3)), np.random.default_rng(0),
                       n_total=30, n_byzantine=3, server_lr=0.5)
    np.testing.assert_allclose(out, 60.0 * own)   # gamma = n / eta = 30 / 0.5
    fed = Federation(FLConfig(clients=10, groups=5, attack=AttackConfig("model_replacement"), byzantine=0.2, rounds=1))
    bad = min(fed.byzantine_ids)
    params = fed.initial_params()
    poisoned = fed._train(bad, params, 0, poisoned=True)   # trained on backdoored data, then boosted
    np.testing.assert_allclose(fed.update(bad, params, 0), 10.0 * poisoned)
    assert not np.allclose(poisoned, fed.honest_update(bad, params, 0))


@pytest.mark.parametrize("attack", ["takeover", "alie", "ipm", "min_max", "fang_trim", "scaling:-100"])
@pytest.mark.parametrize("groups", [6, 3])
def test_group_takeover_passes_every_check_and_sets_the_group_mean(attack: str, groups: int) -> None:
    name, _, scale = attack.partition(":")
    acfg = AttackConfig(name, scale=float(scale)) if scale else AttackConfig(name)
    cfg = FLConfig(clients=30, groups=groups, rounds=1, attack=acfg, byzantine=0.2, bypass_bounds=True, seed=3)
    fed = Federation(cfg)
    enc = cfg.encoding_params()
    params = fed.initial_params()
    groups_ = fed.assignment(0)
    present = {c for g in groups_ for c in g}
    words = fed.round_inputs(params, 0, groups_, present, enc)
    # the targets the driver aims at, recomputed here from the honest group means
    honest = {c: fed.sent_honest(c, params, 0) for c in present if c not in fed.byzantine_ids}
    bad = [i for i, g in enumerate(groups_) if fed.byzantine_ids.intersection(g)]
    assert bad
    if name in ("takeover", "alie", "ipm", "min_max", "fang_trim"):
        good = [np.mean([honest[c] for c in g], axis=0) for i, g in enumerate(groups_) if i not in bad]
        benign = np.stack(good) if len(good) >= 2 else np.stack(list(honest.values()))
        targets = group_targets(acfg, benign, n_inputs=groups, n_bad=len(bad), rule_f=fed.server_f(groups),
                                clip_norm=cfg.clip_norm, rng=np.random.default_rng([3, 8, 0]))
    else:
        targets = [np.mean([fed.update(c, params, 0) for c in groups_[i] if c in fed.byzantine_ids], axis=0)
                   for i in bad]
    for i, t in zip(bad, targets):
        g = groups_[i]
        total = np.sum([words[c] for c in g], axis=0, dtype=enc.dtype(len(g)))
        dec = decode(total, enc)
        verdict = check_group_sum(dec.total, dec.count, dec.sqnorm_total, len(g), bounds_of(enc))
        assert verdict.accepted, verdict.reasons
        want = feasible_target(t, enc)
        assert np.max(np.abs(dec.mean(len(g)) - want)) < 1e-3
        assert dec.sqnorm_total == pytest.approx(len(g) * cfg.clip_norm**2, rel=1e-4)   # the budget, filled
