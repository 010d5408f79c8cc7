"""Tests for secagg.protocol.checks: honest group sums pass, each kind of cheat is named."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.protocol.checks import CHECKS, CheckResult, SumBounds, check_group_sum

B, C = 10.0, 4.0
BOUNDS = SumBounds(clip_norm=B, clip_value=C, scale=2.0**16, sqnorm_scale=2.0**10)


# ----------------------------------------------------------------------------- helpers


def sround(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unbiased stochastic rounding: floor(y) + 1 with probability frac(y)."""
    fl = np.floor(y)
    return (fl + (rng.random(np.shape(y)) < (y - fl))).astype(np.int64)


def bound_update(x: np.ndarray, b: float, c: float) -> np.ndarray:
    """What the client library does: L2 clip to b, then clip each coordinate to [-c, c]."""
    n = np.linalg.norm(x)
    if n > b:
        x = x * (b / n)
    return np.clip(x, -c, c)


def encode_decode_sum(
    xs: np.ndarray,
    bounds: SumBounds,
    rng: np.random.Generator,
    sqnorms: np.ndarray | None = None,
    counts: np.ndarray | None = None,
) -> tuple[np.ndarray, float, float]:
    """Encode each client's (x, count, ||x||^2) in fixed point, sum the integers, decode."""
    q = sround(xs * bounds.scale, rng)
    sq = np.einsum("ij,ij->i", xs, xs) if sqnorms is None else np.asarray(sqnorms, float)
    qs = sround(sq * bounds.sqnorm_scale, rng)
    cnt = np.ones(len(xs), dtype=np.int64) if counts is None else np.asarray(counts)
    return (q.sum(axis=0) / bounds.scale, float(cnt.sum()),
            float(qs.sum()) / bounds.sqnorm_scale)


def honest_group(n: int, d: int, rng: np.random.Generator, bounds: SumBounds = BOUNDS):
    xs = np.stack([bound_update(rng.normal(size=d) * 5, bounds.clip_norm, bounds.clip_value)
                   for _ in range(n)])
    return xs, encode_decode_sum(xs, bounds, rng)


# ----------------------------------------------------------------------------- honest


@pytest.mark.parametrize("seed", range(5))
def test_honest_group_passes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    _, (total, count, sq) = honest_group(6, 50, rng)
    res = check_group_sum(total, count, sq, 6, BOUNDS)
    assert res.accepted, res.reasons
    assert res.reasons == () and res.failed == ()
    for key in ("norm", "norm_bound", "max_abs", "coord_bound", "count", "sqnorm_total",
                "sqnorm_bound", "cs_lhs", "cs_bound"):
        assert key in res.metrics
    assert res.metrics["count"] == 6.0


def test_worst_case_honest_passes() -> None:
    """Identical clients at norm exactly B, coordinates at c, coarse scales, rounding always
    up: every bound is as tight as it gets for honest clients (Cauchy-Schwarz is an equality
    before rounding), and still nothing fails."""
    bounds = SumBounds(clip_norm=2.0, clip_value=1.0, scale=3.001, sqnorm_scale=3.0)
    n, d = 5, 4
    xs = np.ones((n, d))  # ||x|| = 2 = B, |x_i| = 1 = c
    # x * scale = 3.001: rounding up to 4 is legal and errs by 0.999 / scale ~ delta.
    total = np.ceil(xs * bounds.scale).sum(axis=0) / bounds.scale
    eps = 1 / 3
    for sq_each in (4.0 - eps + 1e-9, 4.0, 4.0 + eps - 1e-9):  # s_u within eps of 4
        res = check_group_sum(total, float(n), n * sq_each, n, bounds)
        assert res.accepted, res.reasons


def test_all_zero_group_passes() -> None:
    res = check_group_sum(np.zeros(7), 3.0, 0.0, 3, BOUNDS)
    assert res.accepted and res.metrics["norm"] == 0.0


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 40),
    scale=st.sampled_from([1.0, 2.0, 7.5, 2.0**8, 2.0**20]),
    sqscale=st.sampled_from([1.0, 3.0, 2.0**12]),
    spread=st.sampled_from([0.01, 1.0, 100.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_honest_groups_always_pass(n, d, scale, sqscale, spread, seed) -> None:
    """No honest group may ever be rejected, even with absurdly coarse fixed point."""
    rng = np.random.default_rng(seed)
    bounds = SumBounds(clip_norm=3.0, clip_value=1.5, scale=scale, sqnorm_scale=sqscale)
    xs = np.stack([bound_update(rng.normal(size=d) * spread, 3.0, 1.5) for _ in range(n)])
    if rng.random() < 0.3:  # aligned clients: Cauchy-Schwarz tight
        xs = np.tile(xs[0], (n, 1))
    total, count, sq = encode_decode_sum(xs, bounds, rng)
    res = check_group_sum(total, count, sq, n, bounds)
    assert res.accepted, res.reasons


# ----------------------------------------------------------------------------- cheats


def test_scaled_update_fails_norm() -> None:
    rng = np.random.default_rng(1)
    xs, _ = honest_group(4, 30, rng)
    xs[0] = xs[0] / np.linalg.norm(xs[0]) * B * 10  # model-replacement boost
    total, count, sq = encode_decode_sum(xs, BOUNDS, rng)
    res = check_group_sum(total, count, sq, 4, BOUNDS)
    assert not res.accepted
    assert "norm" in res.failed
    (reason,) = [r for r in res.reasons if r.startswith("norm ")]
    assert "contributors 4 x B 10" in reason and "slack" in reason
    assert res.metrics["norm"] > res.metrics["norm_bound"]


def test_wrong_count_fails_count_only() -> None:
    rng = np.random.default_rng(2)
    _, (total, count, sq) = honest_group(5, 20, rng)
    res = check_group_sum(total, count + 1, sq, 5, BOUNDS)
    assert res.failed == ("count",)
    assert res.reasons[0].startswith("count 6 != contributors 5")


def test_fractional_count_fails() -> None:
    rng = np.random.default_rng(3)
    _, (total, count, sq) = honest_group(5, 20, rng)
    assert check_group_sum(total, count + 1e-6, sq, 5, BOUNDS).failed == ("count",)
    assert check_group_sum(total, count + 1e-12, sq, 5, BOUNDS).accepted


def test_lying_low_sqnorm_fails_cauchy_schwarz_only() -> None:
    """One client sends a big (3B) vector but claims ||x||^2 = 0; the others are small.
    The total stays inside n*B and the sqnorm total inside n*B^2, so only C-S catches it."""
    rng = np.random.default_rng(4)
    n, d = 4, 100
    xs = rng.normal(size=(n, d))
    xs = xs / np.linalg.norm(xs, axis=1, keepdims=True)  # honest: norm 1 (<< B)
    big = np.full(d, 3 * B / math.sqrt(d))  # norm 3B = 30, coordinates 3 < c
    assert np.max(np.abs(big)) < C
    xs[0] = big
    claimed = np.einsum("ij,ij->i", xs, xs)
    claimed[0] = 0.0
    total, count, sq = encode_decode_sum(xs, BOUNDS, rng, sqnorms=claimed)
    res = check_group_sum(total, count, sq, n, BOUNDS)
    # ||total||^2 ~ (30 + ...)^2 ~ 900 while n * S ~ 4 * 3 = 12.
    assert res.failed == ("cauchy-schwarz",), res.reasons
    assert "under-reported" in res.reasons[0]
    # Reporting the true squared norm (900 > B^2) instead is caught by the sqnorm bound.
    total2, count2, sq2 = encode_decode_sum(xs, BOUNDS, rng)
    assert check_group_sum(total2, count2, sq2, n, BOUNDS).failed == ("sqnorm",)


def test_coordinate_beyond_c_fails_range_only() -> None:
    """A spike of 2.5c in one coordinate: norm 10 = B is fine, the range is not."""
    n, d = 2, 10
    xs = np.zeros((n, d))
    xs[0, 3] = 2.5 * C  # 10 > n * (c + 1/scale) ~ 8
    total, count, sq = encode_decode_sum(xs, BOUNDS, np.random.default_rng(5))
    res = check_group_sum(total, count, sq, n, BOUNDS)
    assert res.failed == ("range",), res.reasons
    assert res.reasons[0].startswith("range max|total_i| 10 > bound 8")


def test_sqnorm_too_large_and_negative() -> None:
    total = np.zeros(4)
    res = check_group_sum(total, 3.0, 3 * B * B + 1.0, 3, BOUNDS)
    assert res.failed == ("sqnorm",)
    res = check_group_sum(total, 3.0, -1.0, 3, BOUNDS)
    assert res.failed == ("sqnorm",) and "negative" in res.reasons[0]


def test_several_failures_reported_together() -> None:
    rng = np.random.default_rng(6)
    xs, _ = honest_group(3, 16, rng)
    xs[1] = np.full(16, 50.0)  # norm 200, coordinates 50: norm and range
    claimed = np.einsum("ij,ij->i", xs, xs)
    claimed[1] = 1.0  # lies low: C-S
    total, count, sq = encode_decode_sum(xs, BOUNDS, rng, sqnorms=claimed)
    res = check_group_sum(total, count - 1, sq, 3, BOUNDS)
    assert not res.accepted
    assert res.failed == ("count", "range", "norm", "cauchy-schwarz")
    assert all(r.split(" ", 1)[0] in CHECKS for r in res.reasons)
    assert all("\n" not in r for r in res.reasons)


# ----------------------------------------------------------------------------- exact bounds


def test_bounds_are_the_documented_formulas() -> None:
    bounds = SumBounds(clip_norm=2.0, clip_value=1.0, scale=4.0, sqnorm_scale=8.0)
    n, d = 3, 9
    res = check_group_sum(np.zeros(d), 3.0, 5.0, n, bounds)
    m = res.metrics
    assert m["coord_bound"] == pytest.approx(3 * (1.0 + 0.25))
    assert m["norm_slack"] == pytest.approx(3 * 3 * 0.25)
    assert m["norm_bound"] == pytest.approx(3 * 2.0 + 2.25)
    assert m["sqnorm_bound"] == pytest.approx(3 * 4.0 + 3 / 8)
    assert m["sqnorm_lower"] == pytest.approx(-3 / 8)
    # C-S: (sqrt(n (S + n eps)) + n sqrt(d) delta)^2 = (sqrt(3 * 5.375) + 2.25)^2
    assert m["cs_bound"] == pytest.approx((math.sqrt(3 * 5.375) + 2.25) ** 2)
    assert m["cs_slack"] == pytest.approx(m["cs_bound"] - 15.0)


def test_norm_boundary_is_inclusive() -> None:
    """d = 1 so norm == |total_0|; c is huge so range never interferes."""
    bounds = SumBounds(clip_norm=2.0, clip_value=1e6, scale=4.0, sqnorm_scale=8.0)
    n = 3
    nb = n * 2.0 + n * 1 * 0.25
    sq = n * 4.0  # enough for C-S at this norm: (sqrt(3 * (12 + 3/8)) + .75)^2 > 6.75^2
    assert check_group_sum(np.array([nb]), 3.0, sq, n, bounds).accepted
    res = check_group_sum(np.array([nb * (1 + 1e-6)]), 3.0, sq, n, bounds)
    assert res.failed == ("norm",)


def test_range_boundary_is_inclusive() -> None:
    bounds = SumBounds(clip_norm=100.0, clip_value=1.0, scale=4.0, sqnorm_scale=8.0)
    total = np.array([0.0, -2 * 1.25])
    assert check_group_sum(total, 2.0, 50.0, 2, bounds).accepted
    total[1] *= 1 + 1e-6
    assert check_group_sum(total, 2.0, 50.0, 2, bounds).failed == ("range",)


def test_integer_total_accepted() -> None:
    assert check_group_sum(np.array([1, -2, 0]), 1.0, 5.0, 1, BOUNDS).accepted


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"contributors": 0}, "contributors must be >= 1"),
        ({"contributors": -2}, "contributors must be >= 1"),
        ({"contributors": 2.0}, "contributors must be an int"),
        ({"contributors": True}, "contributors must be an int"),
        ({"total": np.zeros((2, 3))}, "1-D"),
        ({"total": np.zeros(0)}, "1-D"),
        ({"total": np.array([1.0, np.nan])}, "NaN or inf"),
        ({"total": np.array([np.inf])}, "NaN or inf"),
        ({"total": np.array(["a"])}, "real numeric"),
        ({"count": float("nan")}, "count must be finite"),
        ({"sqnorm_total": float("inf")}, "sqnorm_total must be finite"),
        ({"count": "3"}, "count must be a real number"),
        ({"bounds": (1, 2, 3, 4)}, "SumBounds"),
    ],
)
def test_bad_arguments_raise(kwargs, match) -> None:
    args = {"total": np.zeros(3), "count": 2.0, "sqnorm_total": 1.0, "contributors": 2,
            "bounds": BOUNDS}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        check_group_sum(**args)


@pytest.mark.parametrize("field", ["clip_norm", "clip_value", "scale", "sqnorm_scale"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_bounds_raise(field, value) -> None:
    kw = {"clip_norm": 1.0, "clip_value": 1.0, "scale": 1.0, "sqnorm_scale": 1.0, field: value}
    with pytest.raises(ValueError, match=field):
        SumBounds(**kw)


def test_result_is_frozen() -> None:
    res = check_group_sum(np.zeros(3), 1.0, 0.0, 1, BOUNDS)
    assert isinstance(res, CheckResult)
    with pytest.raises(AttributeError):
        res.accepted = False  # type: ignore[misc]
