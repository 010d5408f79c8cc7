"""Property tests of the encoding (bound, quantise, embed mod 2^k) and of mask cancellation."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from secagg.protocol import prg, thresholds
from secagg.protocol.client import mask_vector
from secagg.protocol.driver import run_group
from secagg.protocol.encoding import (
    EXTRA_COORDS,
    EncodingParams,
    bound,
    decode,
    embed,
    encode,
    stochastic_round,
    to_signed,
)
from secagg.protocol.messages import GroupConfig, Mode, Phase

FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
vectors = hnp.arrays(np.float64, st.integers(1, 40), elements=finite)
seeds = st.binary(min_size=32, max_size=32)


@st.composite
def encoding_params(draw: st.DrawFn) -> EncodingParams:
    clip_norm = draw(st.floats(min_value=1e-2, max_value=1e3))
    clip_value = draw(st.none() | st.floats(min_value=1e-3, max_value=1e3))
    precision_bits = draw(st.integers(1, 30))
    return EncodingParams(clip_norm=clip_norm, clip_value=clip_value, precision_bits=precision_bits)


# ----------------------------------------------------------------------------- bound


@FAST
@given(x=vectors, params=encoding_params())
def test_bound_respects_norm_and_coordinate_bounds(x: np.ndarray, params: EncodingParams) -> None:
    b = bound(x, params.clip_norm, params.clip_value)
    assert b.shape == x.shape and b.dtype == np.float64
    assert np.linalg.norm(b) <= params.clip_norm * (1 + 1e-12)
    if params.clip_value is not None:
        assert np.all(np.abs(b) <= params.clip_value)
    assert np.all(np.abs(b) <= params.coord_bound * (1 + 1e-12))
    if np.linalg.norm(x) <= params.clip_norm and (params.clip_value is None or np.all(np.abs(x) <= params.clip_value)):
        assert np.array_equal(b, x)  # already in bounds: untouched


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_input_is_a_value_error(bad: float) -> None:
    x = np.array([1.0, bad, 2.0])
    with pytest.raises(ValueError, match="NaN or infinity"):
        bound(x, 1.0)
    with pytest.raises(ValueError, match="NaN or infinity"):
        encode(x, EncodingParams(), 3, rounding_seed=os.urandom(32))


def test_encoding_params_validation() -> None:
    for kwargs in ({"clip_norm": 0.0}, {"clip_norm": -1.0}, {"clip_norm": math.nan}, {"clip_norm": math.inf},
                   {"clip_value": 0.0}, {"clip_value": math.nan}, {"precision_bits": 0}, {"precision_bits": 53}):
        with pytest.raises(ValueError):
            EncodingParams(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- round trip


@FAST
@given(x=vectors, params=encoding_params(), seed=seeds, members=st.integers(1, 1000))
def test_encode_decode_round_trip(x: np.ndarray, params: EncodingParams, seed: bytes, members: int) -> None:
    words = encode(x, params, members, rounding_seed=seed)
    assert words.shape == (x.size + EXTRA_COORDS,)
    assert words.dtype == params.dtype(members)
    assert words.dtype == np.dtype(np.uint32 if params.modulus_bits(members) == 32 else np.uint64)
    xb = bound(x, params.clip_norm, params.clip_value)
    d = decode(words, params)
    assert d.count == 1.0
    # stochastic rounding lands on floor or ceil: error strictly below one quantum
    assert np.all(np.abs(d.total - xb) <= 1.0 / params.scale * (1 + 1e-9))
    sq = min(float(xb @ xb), params.clip_norm**2)
    assert abs(d.sqnorm_total - sq) <= 1.0 / params.sqnorm_scale * (1 + 1e-9)
    # every word is an honest one: |q| <= max_abs_q
    q = to_signed(words).astype(np.int64)
    assert np.all(np.abs(q) <= params.max_abs_q)
    assert np.array_equal(d.mean(1), d.total)


@FAST
@given(x=vectors, params=encoding_params(), seed=seeds)
def test_encode_is_deterministic_per_rounding_seed(x: np.ndarray, params: EncodingParams, seed: bytes) -> None:
    a = encode(x, params, 5, rounding_seed=seed)
    b = encode(x, params, 5, rounding_seed=seed)
    assert np.array_equal(a, b)


def test_embed_and_to_signed_are_twos_complement() -> None:
    q = np.array([0, 1, -1, 2**31 - 1, -(2**31)], dtype=np.int64)
    w = embed(q, np.dtype(np.uint32))
    assert w.dtype == np.uint32
    assert w.tolist() == [0, 1, 2**32 - 1, 2**31 - 1, 2**31]
    assert to_signed(w).tolist() == q.tolist()
    w64 = embed(q, np.dtype(np.uint64))
    assert w64.tolist() == [0, 1, 2**64 - 1, 2**31 - 1, 2**64 - 2**31]
    assert to_signed(w64).tolist() == q.tolist()


# ----------------------------------------------------------------------------- stochastic rounding


@settings(max_examples=30, deadline=None, database=None)
@given(v=st.floats(min_value=-1e4, max_value=1e4, allow_nan=False), seed=seeds)
def test_stochastic_rounding_lands_on_neighbours_and_is_unbiased(v: float, seed: bytes) -> None:
    n = 40_000
    r = stochastic_round(np.full(n, v), seed)
    assert r.dtype == np.int64
    lo = math.floor(v)
    assert set(np.unique(r).tolist()) <= {lo, lo + 1}
    frac = v - lo
    if frac == 0.0:
        assert np.all(r == lo)
    # mean is within 6 standard errors (sd <= 0.5/sqrt(n) = 0.0025) plus float slack
    assert abs(float(r.mean()) - v) <= 6 * 0.5 / math.sqrt(n) + 1e-9


def test_stochastic_rounding_unbiased_over_many_seeds() -> None:
    """The same value rounded under 3000 independent seeds averages to the value."""
    values = np.array([0.3, -0.3, 2.75, -7.125, 0.5, 1e-3, 123.999])
    rounds = np.stack([stochastic_round(values, os.urandom(32)) for _ in range(3000)])
    mean = rounds.mean(axis=0)
    sd = np.sqrt((values - np.floor(values)) * (1 - (values - np.floor(values)))) / math.sqrt(3000)
    assert np.all(np.abs(mean - values) <= 5 * sd + 0.005), (mean, values)


def test_stochastic_rounding_preserves_shape_and_integers() -> None:
    v = np.arange(-6.0, 6.0).reshape(3, 4)
    r = stochastic_round(v, os.urandom(32))
    assert r.shape == (3, 4)
    assert np.array_equal(r, v.astype(np.int64))


# ----------------------------------------------------------------------------- modulus sizing


def max_members(params: EncodingParams, bits: int) -> int:
    """Largest m with m * max|q| < 2^(bits-1)."""
    return ((1 << (bits - 1)) - 1) // params.max_abs_q


@pytest.mark.parametrize("precision_bits", [1, 8, 16, 20, 24, 30, 31, 40, 52])
def test_modulus_bits_switches_32_to_64_and_raises_beyond(precision_bits: int) -> None:
    p = EncodingParams(precision_bits=precision_bits)
    m32 = max_members(p, 32)
    if m32 >= 1:
        assert p.modulus_bits(m32) == 32
        assert p.dtype(m32) == np.uint32
    assert p.modulus_bits(m32 + 1) == 64
    assert p.dtype(m32 + 1) == np.uint64
    m64 = max_members(p, 64)
    assert p.modulus_bits(m64) == 64
    with pytest.raises(ValueError, match="overflow 64-bit"):
        p.modulus_bits(m64 + 1)
    # the sizing rule itself
    assert m32 * p.max_abs_q < 2**31 <= (m32 + 1) * p.max_abs_q
    assert m64 * p.max_abs_q < 2**63 <= (m64 + 1) * p.max_abs_q


def extreme_inputs(params: EncodingParams, d: int, sign: float, count: int) -> list[np.ndarray]:
    """``count`` encodings of the vector with every coordinate at sign * c and ||x|| = B."""
    c = params.coord_bound
    x = np.full(d, sign * c)
    return [encode(x, params, 1, rounding_seed=os.urandom(32)) for _ in range(count)]


@settings(max_examples=12, deadline=None, database=None)
@given(
    precision_bits=st.integers(20, 30) | st.integers(49, 52),
    d=st.integers(1, 6),
    sign=st.sampled_from([1.0, -1.0]),
    mixed=st.booleans(),
)
def test_sums_of_m_extreme_vectors_never_wrap(precision_bits: int, d: int, sign: float, mixed: bool) -> None:
    c = 3.0
    params = EncodingParams(clip_norm=c * math.sqrt(d), clip_value=c, precision_bits=precision_bits)
    bits = 32 if precision_bits <= 30 else 64
    m = max_members(params, bits)
    assume(m >= 1)
    assert params.modulus_bits(m) == bits
    dtype = params.dtype(m)
    # a handful of distinct extreme encodings (different rounding), repeated up to m clients
    pos = [encode(np.full(d, sign * c), params, m, rounding_seed=os.urandom(32)) for _ in range(4)]
    neg = [encode(np.full(d, -sign * c), params, m, rounding_seed=os.urandom(32)) for _ in range(4)]
    rows = [(neg if mixed and i % 3 == 0 else pos)[i % 4] for i in range(m)]
    stack = np.stack(rows)
    assert stack.dtype == dtype
    wrapped = stack.sum(axis=0, dtype=dtype)                      # modular sum in the word
    exact = [sum(int(v) for v in col) for col in to_signed(stack).T]  # true integer sum
    assert all(abs(e) < 2 ** (bits - 1) for e in exact)
    assert to_signed(wrapped).tolist() == exact                    # no wrap
    decoded = decode(wrapped, params)
    assert decoded.count == m
    n_pos = sum(1 for i in range(m) if not (mixed and i % 3 == 0))
    xb_pos = bound(np.full(d, sign * c), params.clip_norm, params.clip_value)   # ~ sign * c, maybe 1 ulp in
    expected = n_pos * xb_pos - (m - n_pos) * xb_pos
    assert np.all(np.abs(decoded.total - expected) <= m / params.scale * (1 + 1e-9))
    assert abs(decoded.sqnorm_total - m * d * c * c) <= m / params.sqnorm_scale * (1 + 1e-9) + 1e-9 * m * d * c * c


def test_extreme_coordinate_words_stay_within_max_abs_q() -> None:
    params = EncodingParams(clip_norm=2.0, clip_value=2.0, precision_bits=16)
    for _ in range(50):
        for w in extreme_inputs(params, 1, 1.0, 1) + extreme_inputs(params, 1, -1.0, 1):
            assert np.all(np.abs(to_signed(w).astype(np.int64)) <= params.max_abs_q)


# ----------------------------------------------------------------------------- mask cancellation


@st.composite
def group_shapes(draw: st.DrawFn) -> tuple[int, int, Mode, int | None, int]:
    m = draw(st.integers(3, 8))
    dim = draw(st.integers(1, 50))
    mode = draw(st.sampled_from(list(Mode)))
    ks = [k for k in range(2, m - 1, 2)]  # even k < m - 1: a genuinely sparse SecAgg+ graph
    neighbors = draw(st.none() | (st.sampled_from(ks) if ks else st.none()))
    bits = draw(st.sampled_from([32, 64]))
    return m, dim, mode, neighbors, bits


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=group_shapes(), seed=st.integers(0, 2**32 - 1))
def test_masks_cancel_without_dropouts(shape: tuple[int, int, Mode, int | None, int], seed: int) -> None:
    m, dim, mode, neighbors, bits = shape
    rng = np.random.default_rng(seed)
    holders = m if neighbors is None else neighbors + 1
    cfg = GroupConfig(
        session=rng.bytes(32), members=m, threshold=thresholds.default(holders, mode), dim=dim,
        modulus_bits=bits, mode=mode, neighbors=neighbors,
    )   # no commitments: run_group draws each member's fresh contribution (and so the SecAgg+ ring)
    dtype = cfg.dtype
    inputs = {i: rng.integers(0, np.iinfo(dtype).max, size=dim, dtype=dtype, endpoint=True) for i in range(1, m + 1)}
    ids = {i: rng.bytes(32) for i in range(1, m + 1)} if mode is Mode.ACTIVE else None
    run = run_group(cfg, inputs, identity_keys=ids)
    assert not run.aborted and not run.client_aborts
    assert run.result is not None
    assert run.result.survivors == frozenset(range(1, m + 1))
    expected = np.zeros(dim, dtype=dtype)
    for v in inputs.values():
        expected += v
    assert run.result.total.dtype == dtype
    assert np.array_equal(run.result.total, expected)


@settings(max_examples=40, deadline=None, database=None)
@given(m=st.integers(2, 9), dim=st.integers(1, 64), bits=st.sampled_from([32, 64]), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_mask_vector_pairwise_masks_cancel(m: int, dim: int, bits: int, seed: int, data: st.DataObject) -> None:
    """sum_u mask_vector(u) - sum_u PRG(b_u) == 0 mod 2^k for any symmetric neighbour relation."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(np.uint32 if bits == 32 else np.uint64)
    pairs = [(u, v) for u in range(1, m + 1) for v in range(u + 1, m + 1)]
    edges = data.draw(st.sets(st.sampled_from(pairs)) if pairs else st.just(set()))
    pair_seed = {e: rng.bytes(32) for e in edges}
    self_seed = {u: rng.bytes(32) for u in range(1, m + 1)}
    total = np.zeros(dim, dtype=dtype)
    for u in range(1, m + 1):
        mine = {v: pair_seed[(min(u, v), max(u, v))] for v in range(1, m + 1) if (min(u, v), max(u, v)) in pair_seed}
        mask = mask_vector(dim, dtype, self_seed[u], mine, u)
        assert mask.dtype == dtype and mask.shape == (dim,)
        total += mask
        prg.accumulate(total, self_seed[u], subtract=True)
    assert not total.any()


@st.composite
def dropout_plans(draw: st.DrawFn) -> tuple[int, Mode, dict[Phase, set[int]]]:
    m = draw(st.integers(4, 9))
    mode = draw(st.sampled_from(list(Mode)))
    t = thresholds.default(m, mode)
    gone = draw(st.sets(st.integers(1, m), max_size=m - t))
    phases = [p for p in Phase if mode is Mode.ACTIVE or p is not Phase.CONSISTENCY_CHECK]
    drops: dict[Phase, set[int]] = {}
    for i in sorted(gone):
        drops.setdefault(draw(st.sampled_from(phases)), set()).add(i)
    return m, mode, drops


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=dropout_plans(), dim=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_masks_cancel_with_any_dropouts_down_to_t(plan: tuple[int, Mode, dict[Phase, set[int]]], dim: int, seed: int) -> None:
    m, mode, drops = plan
    rng = np.random.default_rng(seed)
    cfg = GroupConfig(session=rng.bytes(32), members=m, threshold=thresholds.default(m, mode), dim=dim, mode=mode)
    inputs = {i: rng.integers(0, 2**32 - 1, size=dim, dtype=np.uint32, endpoint=True) for i in range(1, m + 1)}
    ids = {i: rng.bytes(32) for i in range(1, m + 1)} if mode is Mode.ACTIVE else None
    run = run_group(cfg, inputs, drops=drops, identity_keys=ids)
    assert not run.aborted, run.aborted
    assert run.result is not None
    lost = set().union(*(v for p, v in drops.items() if p <= Phase.MASKED_INPUT))
    assert run.result.survivors == frozenset(range(1, m + 1)) - lost
    expected = np.zeros(dim, dtype=np.uint32)
    for i in run.result.survivors:
        expected += inputs[i]
    assert np.array_equal(run.result.total, expected)
