"""Tests for secagg.protocol.robust: hand-computed cases, slow reference implementations of
each definition, and the robustness properties the rules exist for."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.protocol import robust
from secagg.protocol.robust import RULES, RuleResult, aggregate, pairwise_sq_distances

# ----------------------------------------------------------------------------- references
# Deliberately naive: Python loops over plain lists, written straight from the definitions.


def ref_mean(x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    g, d = x.shape
    w = [1.0] * g if w is None else list(w)
    return np.array([sum(w[i] * x[i, j] for i in range(g)) / sum(w) for j in range(d)])


def ref_median(x: np.ndarray) -> np.ndarray:
    g, d = x.shape
    out = []
    for j in range(d):
        col = sorted(x[i, j] for i in range(g))
        out.append(col[g // 2] if g % 2 else (col[g // 2 - 1] + col[g // 2]) / 2)
    return np.array(out)


def ref_trimmed(x: np.ndarray, b: int) -> np.ndarray:
    g, d = x.shape
    out = []
    for j in range(d):
        kept = sorted(x[i, j] for i in range(g))[b:g - b]
        out.append(sum(kept) / len(kept))
    return np.array(out)


def ref_sqdist(a: np.ndarray, b: np.ndarray) -> float:
    return sum((float(p) - float(q)) ** 2 for p, q in zip(a, b))


def ref_krum_scores(x: np.ndarray, f: int) -> list[float]:
    g = len(x)
    k = g - f - 2
    return [sum(sorted(ref_sqdist(x[i], x[j]) for j in range(g) if j != i)[:k])
            for i in range(g)]


def ref_krum(x: np.ndarray, f: int) -> int:
    s = ref_krum_scores(x, f)
    return min(range(len(x)), key=lambda i: (s[i], i))


def ref_multi_krum(x: np.ndarray, f: int, m: int) -> list[int]:
    s = ref_krum_scores(x, f)
    return sorted(sorted(range(len(x)), key=lambda i: (s[i], i))[:m])


def ref_objective(x: np.ndarray, v: np.ndarray, w: np.ndarray | None = None) -> float:
    w = np.ones(len(x)) if w is None else w
    return sum(w[i] * math.sqrt(ref_sqdist(x[i], v)) for i in range(len(x)))


def ref_kuhn_vertex(x: np.ndarray, w: list[float], j: int) -> bool:
    """Kuhn (1973): x_j minimises sum_i w_i ||x_i - v|| iff the unit pulls of the other
    points sum to a vector no longer than the weight sitting at x_j."""
    d = x.shape[1]
    pull = np.zeros(d)
    here = 0.0
    for i in range(len(x)):
        dist = math.sqrt(ref_sqdist(x[i], x[j]))
        if dist == 0:
            here += w[i]
        else:
            pull += w[i] * (x[i] - x[j]) / dist
    return math.sqrt(ref_sqdist(pull, 0 * pull)) <= here


def ref_weiszfeld(
    x: np.ndarray, w: np.ndarray | None = None, iters: int = 20000
) -> tuple[np.ndarray, bool]:
    """An input that passes Kuhn's test, else plain Weiszfeld; (point, converged)."""
    g, d = x.shape
    w = [1.0] * g if w is None else list(w)
    for j in range(g):
        if ref_kuhn_vertex(x, w, j):
            return x[j].copy(), True
    v = ref_mean(x, np.array(w))
    for _ in range(iters):
        num = np.zeros(d)
        den = 0.0
        for i in range(g):
            dist = max(math.sqrt(ref_sqdist(x[i], v)), 1e-12)
            num += w[i] * x[i] / dist
            den += w[i] / dist
        new = num / den
        if math.sqrt(ref_sqdist(new, v)) <= 1e-13 * (1 + math.sqrt(ref_sqdist(new, 0 * new))):
            return new, True
        v = new
    return v, False


def ref_centered_clipping(x: np.ndarray, v0: np.ndarray, tau: float, iters: int) -> np.ndarray:
    g = len(x)
    v = v0.astype(float).copy()
    for _ in range(iters):
        acc = np.zeros_like(v)
        for i in range(g):
            z = x[i] - v
            n = math.sqrt(ref_sqdist(z, 0 * z))
            acc += z if n <= tau else z * (tau / n)
        v = v + acc / g
    return v


def random_points(seed: int, g: int, d: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(g, d)) * rng.choice([0.1, 1.0, 50.0]) + rng.normal(size=d) * 3


shapes = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 9), st.integers(1, 6))
FAST = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------------------- hand cases


def test_mean_hand() -> None:
    x = np.array([[0.0, 0.0], [2.0, 4.0], [4.0, 2.0]])
    np.testing.assert_allclose(aggregate("mean", x).vector, [2.0, 2.0])
    # weights 1,1,2: x = (0 + 2 + 8) / 4 = 2.5, y = (0 + 4 + 4) / 4 = 2
    res = aggregate("mean", x, weights=np.array([1, 1, 2]))
    np.testing.assert_allclose(res.vector, [2.5, 2.0])
    assert res.selected == (0, 1, 2)


def test_median_hand_even_count() -> None:
    x = np.array([[1.0, 10.0], [3.0, 0.0], [2.0, 5.0], [100.0, -7.0]])
    # col 0 sorted 1,2,3,100 -> (2+3)/2 = 2.5 ; col 1 sorted -7,0,5,10 -> (0+5)/2 = 2.5
    np.testing.assert_allclose(aggregate("median", x).vector, [2.5, 2.5])


def test_median_hand_odd_count() -> None:
    x = np.array([[5.0], [-1.0], [1e9]])
    np.testing.assert_allclose(aggregate("median", x).vector, [5.0])


def test_trimmed_mean_hand() -> None:
    x = np.array([[1.0, -50.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]])
    # trim 1: col 0 keeps 2,3,4 -> 3 ; col 1 keeps 0,1,2 -> 1
    res = aggregate("trimmed_mean", x, f=1)
    np.testing.assert_allclose(res.vector, [3.0, 1.0])
    assert res.info["trim"] == 1 and res.info["kept"] == 3
    # explicit trim 2 overrides f: keeps the middle value 3 and 1
    np.testing.assert_allclose(aggregate("trimmed_mean", x, f=0, trim=2).vector, [3.0, 1.0])
    # trim 0 is the mean: (110/5, -44/5)
    np.testing.assert_allclose(aggregate("trimmed_mean", x).vector, [22.0, -8.8])


def test_krum_hand_1d_tie_goes_to_lowest_index() -> None:
    x = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    # f = 1, k = g - f - 2 = 2 nearest others:
    # score(0) = 1 + 4 = 5, score(1) = 1 + 1 = 2, score(2) = 1 + 1 = 2, score(3) = 1 + 4 = 5,
    # score(4) = 97^2 + 98^2 = 9409 + 9604 = 19013. Tie 1/2 -> index 1.
    np.testing.assert_allclose(robust.krum_scores(x, 1), [5, 2, 2, 5, 19013])
    res = aggregate("krum", x, f=1)
    assert res.selected == (1,)
    np.testing.assert_allclose(res.vector, [1.0])
    assert res.info["score_min"] == 2.0 and res.info["score_max"] == 19013.0


def test_krum_hand_2d() -> None:
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [10.0, 10.0]])
    # f = 1, k = 2: each square corner has two neighbours at squared distance 1 -> score 2;
    # (10,10): nearest (1,1) at 81+81 = 162, then (1,0) at 81+100 = 181 -> 343.
    np.testing.assert_allclose(robust.krum_scores(x, 1), [2, 2, 2, 2, 343])
    res = aggregate("krum", x, f=1)
    assert res.selected == (0,)
    np.testing.assert_allclose(res.vector, [0.0, 0.0])


def test_multi_krum_hand() -> None:
    x = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    # scores 5, 2, 2, 5, 19013 (above). default m = g - f = 4 -> {0,1,2,3}, mean 1.5
    res = aggregate("multi_krum", x, f=1)
    assert res.selected == (0, 1, 2, 3)
    np.testing.assert_allclose(res.vector, [1.5])
    # m = 2 -> {1, 2}, mean 1.5 ; m = 3 -> {1, 2} then the 5-tie goes to index 0 -> mean 1
    np.testing.assert_allclose(aggregate("multi_krum", x, f=1, m=2).vector, [1.5])
    res3 = aggregate("multi_krum", x, f=1, m=3)
    assert res3.selected == (0, 1, 2)
    np.testing.assert_allclose(res3.vector, [1.0])
    # m = 1 is Krum
    assert aggregate("multi_krum", x, f=1, m=1).selected == aggregate("krum", x, f=1).selected


def test_geometric_median_hand_fermat_point() -> None:
    # Right isosceles triangle (0,0),(1,0),(0,1): the Fermat point (t, t) sees every pair of
    # vertices at 120 degrees: 6t^2 - 6t + 1 = 0 -> t = (3 - sqrt 3) / 6 = 0.2113248654...
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    res = aggregate("geometric_median", x)
    t = (3 - math.sqrt(3)) / 6
    np.testing.assert_allclose(res.vector, [t, t], atol=1e-6)
    assert res.info["converged"] == 1 and 1 <= int(res.info["iterations"]) < 200


def test_geometric_median_hand_obtuse_vertex() -> None:
    # (0,0),(10,0),(5,1): the angle at (5,1) is acos(-24/26) ~ 157 deg >= 120, so the
    # geometric median is that vertex itself.
    x = np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 1.0]])
    np.testing.assert_allclose(aggregate("geometric_median", x).vector, [5.0, 1.0], atol=1e-5)


def test_geometric_median_hand_weighted_1d() -> None:
    # In 1-D it is the weighted median: weights 1, 3 on 0 and 1 -> 1.
    x = np.array([[0.0], [1.0]])
    res = aggregate("geometric_median", x, weights=np.array([1.0, 3.0]))
    np.testing.assert_allclose(res.vector, [1.0], atol=1e-6)
    # points 0, 1, 10 unweighted -> the middle one
    x3 = np.array([[0.0], [1.0], [10.0]])
    np.testing.assert_allclose(aggregate("geometric_median", x3).vector, [1.0], atol=1e-6)


def test_centered_clipping_hand_1d() -> None:
    x = np.array([[0.0], [0.0], [1.0], [5.0], [100.0]])
    # v0 = median = 1, tau = 2.
    # iter 1: x - v = -1,-1,0,4,99 -> clipped -1,-1,0,2,2, sum 2 -> v = 1 + 2/5 = 1.4
    res1 = aggregate("centered_clipping", x, tau=2.0, iters=1)
    np.testing.assert_allclose(res1.vector, [1.4])
    # iter 2: x - v = -1.4,-1.4,-0.4,3.6,98.6 -> -1.4,-1.4,-0.4,2,2, sum 0.8 -> v = 1.56
    np.testing.assert_allclose(aggregate("centered_clipping", x, tau=2.0, iters=2).vector,
                               [1.56])
    # default tau = median |x - 1| = median(1,1,0,4,99) = 1; clipped -1,-1,0,1,1 sums to 0,
    # so v stays at 1 for all 3 default iterations.
    res = aggregate("centered_clipping", x)
    np.testing.assert_allclose(res.vector, [1.0])
    assert res.info["tau"] == 1.0 and res.info["iters"] == 3 and res.info["center"] == "median"


def test_centered_clipping_hand_2d_given_center() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.5]])
    # from (0,0), tau 1: (3,4) has norm 5 -> (0.6, 0.8); (0, 0.5) unclipped;
    # v = ((0.6, 0.8) + (0, 0.5)) / 2 = (0.3, 0.65)
    res = aggregate("centered_clipping", x, tau=1.0, iters=1, center=np.zeros(2))
    np.testing.assert_allclose(res.vector, [0.3, 0.65])
    assert res.info["center"] == "given" and res.info["clipped_last_iter"] == 1


def test_centered_clipping_tau_zero_keeps_center() -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    c = np.array([7.0, 7.0])
    np.testing.assert_allclose(aggregate("centered_clipping", x, tau=0.0, center=c).vector, c)


def test_pairwise_distances_hand_and_far_from_origin() -> None:
    x = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    np.testing.assert_allclose(pairwise_sq_distances(x),
                               [[0, 25, 2], [25, 0, 13], [2, 13, 0]])
    # a unit-spread cluster 1e8 from the origin: naive Gram would lose every digit
    np.testing.assert_allclose(pairwise_sq_distances(x + 1e8),
                               [[0, 25, 2], [25, 0, 13], [2, 13, 0]], atol=1e-6)


# ----------------------------------------------------------------------------- vs references


@FAST
@given(shapes, st.booleans())
def test_mean_matches_reference(shape, weighted) -> None:
    seed, g, d = shape
    x = random_points(seed, g, d)
    w = np.random.default_rng(seed + 1).uniform(0.5, 5, size=g) if weighted else None
    np.testing.assert_allclose(aggregate("mean", x, weights=w).vector, ref_mean(x, w),
                               rtol=1e-12, atol=1e-12)


@FAST
@given(shapes)
def test_median_matches_reference(shape) -> None:
    seed, g, d = shape
    x = random_points(seed, g, d)
    np.testing.assert_allclose(aggregate("median", x).vector, ref_median(x), rtol=1e-13)


@FAST
@given(shapes, st.data())
def test_trimmed_mean_matches_reference(shape, data) -> None:
    seed, g, d = shape
    x = random_points(seed, g, d)
    b = data.draw(st.integers(0, (g - 1) // 2))
    np.testing.assert_allclose(aggregate("trimmed_mean", x, trim=b).vector, ref_trimmed(x, b),
                               rtol=1e-12, atol=1e-12)


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(3, 10), st.integers(1, 6), st.data())
def test_krum_and_multi_krum_match_reference(seed, g, d, data) -> None:
    x = random_points(seed, g, d)
    f = data.draw(st.integers(0, g - 3))
    m = data.draw(st.integers(1, g))
    ref_scores = ref_krum_scores(x, f)
    np.testing.assert_allclose(robust.krum_scores(x, f), ref_scores, rtol=1e-9, atol=1e-9)
    i = ref_krum(x, f)
    res = aggregate("krum", x, f=f)
    assert res.selected == (i,)
    np.testing.assert_array_equal(res.vector, x[i])
    chosen = ref_multi_krum(x, f, m)
    mres = aggregate("multi_krum", x, f=f, m=m)
    assert mres.selected == tuple(chosen)
    np.testing.assert_allclose(mres.vector, ref_mean(x[chosen]), rtol=1e-12, atol=1e-12)
    assert aggregate("multi_krum", x, f=f).selected == tuple(ref_multi_krum(x, f, g - f))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(3, 8), st.integers(2, 5), st.booleans())
def test_geometric_median_matches_reference_and_definition(seed, g, d, weighted) -> None:
    x = random_points(seed, g, d)
    w = np.random.default_rng(seed + 7).uniform(0.5, 3, size=g) if weighted else None
    res = aggregate("geometric_median", x, weights=w, tol=1e-10, max_iter=5000)
    v = res.vector
    spread = float(np.max(np.abs(x - x.mean(axis=0)))) + 1e-300
    ref, ref_converged = ref_weiszfeld(x, w)
    obj = ref_objective(x, v, w)
    # Near a heavy input the objective is so flat that Weiszfeld may not pin the point down
    # in max_iter steps (and then says so); the objective value must match regardless.
    np.testing.assert_allclose(obj, ref_objective(x, ref, w), rtol=1e-7)
    if ref_converged and res.info["converged"]:
        np.testing.assert_allclose(v, ref, rtol=0, atol=1e-5 * spread)
    # Definition: v minimises sum_i w_i ||x_i - v||; no nearby or data point does better.
    assert obj == pytest.approx(float(res.info["objective"]), rel=1e-9)
    rng = np.random.default_rng(seed + 3)
    # (The stop at tol leaves v a hair from a non-input optimum: a small relative allowance.)
    for step in (1e-2, 1e-1):
        for _ in range(5):
            u = rng.normal(size=d)
            assert ref_objective(x, v + step * spread * u / np.linalg.norm(u), w) >= obj * (
                1 - 1e-7)
    for i in range(g):
        assert ref_objective(x, x[i], w) >= obj * (1 - 1e-7)


@FAST
@given(shapes, st.integers(1, 5), st.booleans(), st.booleans())
def test_centered_clipping_matches_reference(shape, iters, given_tau, given_center) -> None:
    seed, g, d = shape
    x = random_points(seed, g, d)
    rng = np.random.default_rng(seed + 5)
    center = x.mean(axis=0) + rng.normal(size=d) if given_center else None
    v0 = center if given_center else ref_median(x)
    tau = float(rng.uniform(0.01, 5)) if given_tau else float(
        np.median([math.sqrt(ref_sqdist(p, v0)) for p in x]))
    kwargs = {"iters": iters}
    if given_tau:
        kwargs["tau"] = tau
    if given_center:
        kwargs["center"] = center
    res = aggregate("centered_clipping", x, **kwargs)
    np.testing.assert_allclose(res.vector, ref_centered_clipping(x, v0, tau, iters),
                               rtol=1e-10, atol=1e-10)
    assert res.info["tau"] == pytest.approx(tau)


# ----------------------------------------------------------------------------- robustness


def attacked(seed: int, g: int, f: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """g points of which f (at random positions) are at 1e6; returns points, honest mask."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(g, d))
    bad = rng.choice(g, size=f, replace=False)
    x[bad] = 1e6 + rng.normal(size=(f, d))
    honest = np.ones(g, dtype=bool)
    honest[bad] = False
    return x, honest


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("g, f", [(7, 2), (10, 3), (11, 4)])
def test_outliers_do_not_move_robust_rules(seed, g, f) -> None:
    d = 5
    x, honest = attacked(seed, g, f, d)
    h = x[honest]
    hm = h.mean(axis=0)
    radius = float(np.max(np.linalg.norm(h - hm, axis=1)))
    lo, hi = h.min(axis=0), h.max(axis=0)

    assert np.linalg.norm(aggregate("mean", x, f=f).vector - hm) > 1e5

    for rule in ("median", "trimmed_mean"):
        v = aggregate(rule, x, f=f).vector
        assert np.all(v >= lo) and np.all(v <= hi), rule  # inside the honest box

    for rule in ("krum", "multi_krum"):
        res = aggregate(rule, x, f=f)
        assert all(honest[i] for i in res.selected), rule

    # Geometric median: ||gm - z|| <= (2(1 - a) / (1 - 2a)) max_honest ||x_i - z||, a = f/g.
    a = f / g
    gm = aggregate("geometric_median", x, f=f).vector
    assert np.linalg.norm(gm - hm) <= (2 * (1 - a) / (1 - 2 * a)) * radius + 1e-6

    # Centered clipping from the median: each of `iters` steps moves v by at most tau.
    res = aggregate("centered_clipping", x, f=f)
    v0 = np.median(x, axis=0)
    tau = float(res.info["tau"])
    assert tau < 10 * radius
    assert np.linalg.norm(res.vector - hm) <= np.linalg.norm(v0 - hm) + 3 * tau + 1e-9


def test_weights_only_reach_mean_and_geometric_median() -> None:
    x, _ = attacked(0, 9, 2, 3)
    w = np.arange(1.0, 10.0)
    for rule in RULES:
        params = {"f": 2}
        a = aggregate(rule, x, **params).vector
        b = aggregate(rule, x, weights=w, **params).vector
        if rule in ("mean", "geometric_median"):
            assert not np.allclose(a, b), rule
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("seed", range(3))
def test_permutation_invariance(rule, seed) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(9, 4))
    perm = rng.permutation(9)
    a = aggregate(rule, x, f=2)
    b = aggregate(rule, x[perm], f=2)
    np.testing.assert_allclose(a.vector, b.vector, rtol=1e-9, atol=1e-9)
    assert sorted(a.selected) == sorted(int(perm[i]) for i in b.selected)


@pytest.mark.parametrize("rule", RULES)
def test_translation_and_scale_equivariance(rule) -> None:
    rng = np.random.default_rng(11)
    x = rng.normal(size=(8, 3))
    t = np.array([1e4, -3.0, 0.5])
    base = aggregate(rule, x, f=2).vector
    np.testing.assert_allclose(aggregate(rule, x + t, f=2).vector, base + t, atol=1e-6)
    np.testing.assert_allclose(aggregate(rule, 7.0 * x, f=2).vector, 7.0 * base, rtol=1e-6,
                               atol=1e-9)


def test_all_rules_agree_on_identical_points() -> None:
    x = np.tile([1.5, -2.0, 3.0], (6, 1))
    for rule in RULES:
        res = aggregate(rule, x, f=1)
        np.testing.assert_allclose(res.vector, x[0], err_msg=rule)
        assert isinstance(res, RuleResult) and res.vector.shape == (3,)


def test_single_group() -> None:
    x = np.array([[1.0, 2.0]])
    for rule in ("mean", "median", "trimmed_mean", "geometric_median", "centered_clipping"):
        np.testing.assert_allclose(aggregate(rule, x).vector, x[0])


def test_result_does_not_alias_input() -> None:
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    res = aggregate("krum", x, f=0)
    res.vector[0] = 99.0
    assert x[res.selected[0], 0] != 99.0


def test_direct_functions_match_aggregate() -> None:
    x, _ = attacked(4, 8, 2, 3)
    np.testing.assert_array_equal(robust.mean(x).vector, aggregate("mean", x).vector)
    np.testing.assert_array_equal(robust.coordinate_median(x).vector,
                                  aggregate("median", x).vector)
    np.testing.assert_array_equal(robust.trimmed_mean(x, trim=2).vector,
                                  aggregate("trimmed_mean", x, f=2).vector)
    np.testing.assert_array_equal(robust.krum(x, f=2).vector, aggregate("krum", x, f=2).vector)
    np.testing.assert_array_equal(robust.multi_krum(x, f=2).vector,
                                  aggregate("multi_krum", x, f=2).vector)
    np.testing.assert_array_equal(robust.geometric_median(x).vector,
                                  aggregate("geometric_median", x).vector)
    np.testing.assert_array_equal(robust.centered_clipping(x).vector,
                                  aggregate("centered_clipping", x).vector)


def test_geometric_median_reports_non_convergence() -> None:
    x = np.random.default_rng(0).normal(size=(6, 3))
    res = aggregate("geometric_median", x, max_iter=1, tol=1e-15)
    assert res.info["iterations"] == 1 and res.info["converged"] == 0


# ----------------------------------------------------------------------------- bad arguments

X5 = np.arange(10.0).reshape(5, 2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: aggregate("bulyan", X5), "unknown rule 'bulyan'; choose one of mean, median"),
        (lambda: aggregate("krum", X5, f=3), r"needs at least f \+ 3 = 6 groups, got 5"),
        (lambda: aggregate("multi_krum", X5, f=3), "at least f"),
        (lambda: aggregate("trimmed_mean", X5, f=3), r"2\*trim < groups \(5\)"),
        (lambda: aggregate("trimmed_mean", X5, trim=-1), "trim must be in"),
        (lambda: aggregate("trimmed_mean", X5, trim=1.0), "trim must be an int"),
        (lambda: aggregate("mean", X5, f=5), r"f must be in \[0, 4\]"),
        (lambda: aggregate("mean", X5, f=-1), "f must be in"),
        (lambda: aggregate("krum", X5, trim=1), "unknown parameter.*trim.*accepts: none"),
        (lambda: aggregate("geometric_median", X5, tau=1), "accepts: eps, tol, max_iter"),
        (lambda: aggregate("multi_krum", X5, f=1, m=0), r"m must be in \[1, 5\]"),
        (lambda: aggregate("multi_krum", X5, f=1, m=6), "m must be in"),
        (lambda: aggregate("mean", X5, weights=np.ones(4)), r"shape \(5,\)"),
        (lambda: aggregate("mean", X5, weights=-np.ones(5)), "weights must be finite, >= 0"),
        (lambda: aggregate("mean", X5, weights=np.zeros(5)), "not all 0"),
        (lambda: aggregate("mean", np.arange(3.0)), r"shape \(groups, dim\)"),
        (lambda: aggregate("mean", np.zeros((0, 3))), r"shape \(groups, dim\)"),
        (lambda: aggregate("mean", np.zeros((3, 0))), r"shape \(groups, dim\)"),
        (lambda: aggregate("median", np.array([[1.0], [np.nan]])), "NaN or inf"),
        (lambda: aggregate("median", np.array([["a"], ["b"]])), "real numbers"),
        (lambda: aggregate("geometric_median", X5, eps=0.0), "eps must be finite and > 0"),
        (lambda: aggregate("geometric_median", X5, max_iter=0), "max_iter must be >= 1"),
        (lambda: aggregate("centered_clipping", X5, tau=-1.0), "tau must be finite and >= 0"),
        (lambda: aggregate("centered_clipping", X5, iters=0), "iters must be >= 1"),
        (lambda: aggregate("centered_clipping", X5, center=np.zeros(3)), r"shape \(2,\)"),
        (lambda: aggregate("centered_clipping", X5, center=np.array([np.inf, 0])),
         "center contains NaN"),
    ],
)
def test_bad_arguments_raise(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()
