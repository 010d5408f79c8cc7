"""Robust aggregation rules across accepted group means.

Secure aggregation hides individual clients, so robustness works one level up: each group
mean is one input, and a Byzantine-robust rule combines the g group means so that up to f
bad groups cannot drag the result arbitrarily far. Exact semantics are in each docstring and
in docs/robust-rules.md.

Weights (e.g. contributor counts) are used by `mean` and `geometric_median` only; the other
rules ignore them, because their robustness argument counts inputs, and weighting by a number
the adversary influences (how many clients it puts in a group) would hand it leverage.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "RULES",
    "RuleResult",
    "aggregate",
    "assumed_f",
    "bucket_means",
    "bucket_seed",
    "centered_clipping",
    "coordinate_median",
    "f_cap",
    "geometric_median",
    "krum",
    "krum_scores",
    "mean",
    "multi_krum",
    "pairwise_sq_distances",
    "trimmed_mean",
]

RULES: tuple[str, ...] = (
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "geometric_median",
    "centered_clipping",
)


@dataclass(frozen=True)
class RuleResult:
    """The aggregate, which inputs influenced it, and a small summary for the round record."""

    vector: np.ndarray
    selected: tuple[int, ...]
    info: dict[str, float | int | str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- validation


def _points(points: np.ndarray) -> np.ndarray:
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"points must have shape (groups, dim) with both >= 1, got {arr.shape}")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer)
                                     or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"points must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError("points contain NaN or inf; reject such groups with the checks first")
    return arr


def _int(name: str, value: Any, lo: int, hi: int | None = None, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {v}{why}")
    return v


def _weights(weights: np.ndarray | None, g: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights)
    if w.shape != (g,):
        raise ValueError(f"weights must have shape ({g},), one per group, got {w.shape}")
    if w.dtype == np.bool_ or not (np.issubdtype(w.dtype, np.integer)
                                   or np.issubdtype(w.dtype, np.floating)):
        raise ValueError(f"weights must be real numbers, got dtype {w.dtype}")
    w = w.astype(np.float64, copy=False)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError("weights must be finite, >= 0 and not all 0 (e.g. contributor counts)")
    return w


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be finite and {'>=' if allow_zero else '>'} 0, got {v!r}")
    return v


def _all(g: int) -> tuple[int, ...]:
    return tuple(range(g))


# ----------------------------------------------------------------------------- distances


def pairwise_sq_distances(points: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between rows, via the Gram matrix (one matmul).

    Rows are first centred on the coordinate-wise median: distances are translation invariant
    and centring where the honest points are keeps ||a||^2 + ||b||^2 - 2<a,b> from cancelling
    catastrophically when the cluster sits far from the origin or far outliers are present.
    """
    x = _points(points)
    x = x - np.median(x, axis=0)
    sq = np.einsum("ij,ij->i", x, x)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    d2 = 0.5 * (d2 + d2.T)  # BLAS need not return an exactly symmetric Gram matrix
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


# ----------------------------------------------------------------------------- rules


def mean(points: np.ndarray, *, weights: np.ndarray | None = None) -> RuleResult:
    """(Weighted) arithmetic mean: sum_i w_i x_i / sum_i w_i. Not robust: the baseline."""
    x = _points(points)
    w = _weights(weights, x.shape[0])
    v = np.average(x, axis=0, weights=w)
    return RuleResult(np.asarray(v, dtype=np.float64), _all(x.shape[0]),
                      {"rule": "mean", "weighted": int(w is not None)})


def coordinate_median(points: np.ndarray) -> RuleResult:
    """Coordinate-wise median (numpy: an even count averages the two middle values)."""
    x = _points(points)
    return RuleResult(np.median(x, axis=0), _all(x.shape[0]), {"rule": "median"})


def trimmed_mean(points: np.ndarray, *, trim: int) -> RuleResult:
    """Per coordinate: sort, drop the `trim` largest and `trim` smallest, average the rest.

    Needs 2 * trim < g so something is left; every input may contribute to some coordinate,
    so `selected` is all of them.
    """
    x = _points(points)
    g = x.shape[0]
    b = _int("trim", trim, 0, (g - 1) // 2,
             f"; trimming needs 2*trim < groups ({g}), so use more groups or a smaller trim")
    s = np.sort(x, axis=0)
    v = s[b:g - b].mean(axis=0)
    return RuleResult(v, _all(g), {"rule": "trimmed_mean", "trim": b, "kept": g - 2 * b})


def _krum_neighbours(g: int, f: int) -> int:
    _int("f", f, 0)
    k = g - f - 2
    if k < 1:
        raise ValueError(f"Krum with f={f} needs at least f + 3 = {f + 3} groups, got {g}; "
                         "use more groups or a smaller f")
    return k


def krum_scores(points: np.ndarray, f: int) -> np.ndarray:
    """Krum score of each point: sum of squared distances to its g - f - 2 nearest others."""
    x = _points(points)
    g = x.shape[0]
    k = _krum_neighbours(g, f)
    d2 = pairwise_sq_distances(x)
    np.fill_diagonal(d2, np.inf)  # a point is not its own neighbour
    nearest = np.partition(d2, k - 1, axis=1)[:, :k]
    return nearest.sum(axis=1)


def _score_info(scores: np.ndarray) -> dict[str, float | int | str]:
    return {
        "score_min": float(scores.min()),
        "score_median": float(np.median(scores)),
        "score_max": float(scores.max()),
    }


def krum(points: np.ndarray, *, f: int) -> RuleResult:
    """Krum (Blanchard et al. 2017): the single input with the lowest Krum score.

    score(i) = sum of squared Euclidean distances from x_i to its g - f - 2 nearest other
    inputs; ties go to the lowest index. Needs g >= f + 3.
    """
    x = _points(points)
    scores = krum_scores(x, f)
    i = int(np.argmin(scores))  # argmin returns the first minimum: ties -> lowest index
    info = {"rule": "krum", "f": int(f), "neighbours": x.shape[0] - int(f) - 2,
            "chosen": i, **_score_info(scores)}
    return RuleResult(x[i].copy(), (i,), info)


def multi_krum(points: np.ndarray, *, f: int, m: int | None = None) -> RuleResult:
    """Multi-Krum: average of the m inputs with the lowest Krum scores (default m = g - f).

    Scores are computed once on the full set (the common one-shot variant, as in Blanchard et
    al.'s experiments), not recomputed after each pick as in the iterative variant used by
    Bulyan. Ties go to the lower index. `selected` is in increasing index order.
    """
    x = _points(points)
    g = x.shape[0]
    scores = krum_scores(x, f)
    mm = g - int(f) if m is None else _int("m", m, 1, g, f"; choose 1 <= m <= groups ({g})")
    order = np.argsort(scores, kind="stable")[:mm]  # stable: equal scores keep index order
    chosen = np.sort(order)
    v = x[chosen].mean(axis=0)
    info = {"rule": "multi_krum", "f": int(f), "m": mm, "neighbours": g - int(f) - 2,
            **_score_info(scores), "chosen_score_max": float(scores[order].max())}
    return RuleResult(v, tuple(int(i) for i in chosen), info)


def geometric_median(
    points: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    eps: float = 1e-8,
    tol: float = 1e-7,
    max_iter: int = 200,
) -> RuleResult:
    """(Weighted) geometric median argmin_v sum_i w_i ||x_i - v||, by smoothed Weiszfeld.

    Starts at the (weighted) mean and iterates
        v <- sum_i b_i x_i / sum_i b_i,   b_i = w_i / max(||x_i - v||, eps)
    (the max with eps, as in Pillutla et al.'s RFA, avoids dividing by zero when v lands on
    an input) until ||v_new - v|| <= tol * (sum_i w_i ||x_i - v|| / sum_i w_i), i.e. the step
    is tiny relative to the spread of the inputs around v, or max_iter iterations. Then, since
    Weiszfeld converges only slowly to a median that is itself an input, the input x_j nearest
    to v is tested with Kuhn's condition ||sum_{i: x_i != x_j} w_i (x_i - x_j)/||x_i - x_j|| ||
    <= sum_{i: x_i = x_j} w_i, and returned exactly when it holds. Breakdown point 1/2.
    """
    x = _points(points)
    g = x.shape[0]
    w = _weights(weights, g)
    w = np.ones(g) if w is None else w
    e = _positive("eps", eps)
    t = _positive("tol", tol)
    iters = _int("max_iter", max_iter, 1)
    v = np.average(x, axis=0, weights=w)
    wsum = float(w.sum())
    converged = False
    it = 0
    while it < iters:
        it += 1
        dist = np.sqrt(np.einsum("ij,ij->i", x - v, x - v))
        b = w / np.maximum(dist, e)
        v_new = (b @ x) / b.sum()
        step = float(np.linalg.norm(v_new - v))
        v = v_new
        # "Relative" to the mean distance from v to the inputs, not to ||v||: that keeps the
        # stopping rule (and so the result) translation invariant, and 0 == 0 still stops.
        if step <= t * float(w @ dist) / wsum:
            converged = True
            break
    # Weiszfeld crawls (sublinearly) when the median is one of the inputs, so test the input
    # nearest to v with Kuhn's exact optimality condition for a vertex and snap to it.
    j = int(np.argmin(np.einsum("ij,ij->i", x - v, x - v)))
    z = x - x[j]
    dj = np.sqrt(np.einsum("ij,ij->i", z, z))
    away = dj > 0
    pull = (w[away] / dj[away]) @ z[away]  # (minus) the gradient of the others at x_j
    vertex = bool(np.linalg.norm(pull) <= w[~away].sum())
    if vertex:
        v = x[j].copy()
        converged = True
    objective = float(w @ np.linalg.norm(x - v, axis=1))
    info = {"rule": "geometric_median", "iterations": it, "converged": int(converged),
            "vertex": int(vertex), "objective": objective, "weighted": int(weights is not None)}
    return RuleResult(v, _all(g), info)


def centered_clipping(
    points: np.ndarray,
    *,
    tau: float | None = None,
    iters: int = 3,
    center: np.ndarray | None = None,
) -> RuleResult:
    """Centered clipping (Karimireddy, He, Jaggi 2021).

    Repeats `iters` times:  v <- v + (1/g) sum_i clip(x_i - v, tau),
    clip(z, tau) = z * min(1, tau / ||z||) (and 0 stays 0). v starts at `center` (e.g. the
    previous round's aggregate, which is what the paper uses) or else at the coordinate-wise
    median; tau defaults to the median of ||x_i - v0|| and is fixed for all iterations.
    """
    x = _points(points)
    g, d = x.shape
    n_iter = _int("iters", iters, 1)
    if center is None:
        v = np.median(x, axis=0)
        start = "median"
    else:
        c = np.asarray(center)
        if c.shape != (d,):
            raise ValueError(f"center must have shape ({d},), got {c.shape}")
        if c.dtype == np.bool_ or not (np.issubdtype(c.dtype, np.integer)
                                       or np.issubdtype(c.dtype, np.floating)):
            raise ValueError(f"center must be real numbers, got dtype {c.dtype}")
        v = c.astype(np.float64)  # a copy: the caller's array is never modified
        if not np.all(np.isfinite(v)):
            raise ValueError("center contains NaN or inf; pass the previous aggregate or None")
        start = "given"
    if tau is None:
        t = float(np.median(np.linalg.norm(x - v, axis=1)))
    else:
        t = _positive("tau", tau, allow_zero=True)
    clipped = 0
    for _ in range(n_iter):
        z = x - v
        norms = np.sqrt(np.einsum("ij,ij->i", z, z))
        over = norms > t
        factor = np.ones(g)
        factor[over] = t / norms[over]
        clipped = int(over.sum())
        v = v + (factor @ z) / g
    info = {"rule": "centered_clipping", "tau": t, "iters": n_iter, "center": start,
            "clipped_last_iter": clipped}
    return RuleResult(v, _all(g), info)


# ----------------------------------------------------------------------------- f and bucketing


def assumed_f(fraction: float, clients: int, inputs: int) -> int:
    """f for a rule from the Byzantine fraction the operator ASSUMES, never from who is bad.

    ``fraction`` of ``clients`` may be Byzantine: ceil(fraction * clients) attackers can spoil
    at most that many of the ``inputs`` group means (one each), so f = min(that, inputs - 1).
    A rule that needs fewer (Krum: inputs - 3) is capped by the caller (``rule_f_cap``).
    """
    fr = _positive("fraction", fraction, allow_zero=True)
    if fr >= 1.0:
        raise ValueError(f"assumed Byzantine fraction must be in [0, 1), got {fr}")
    n = _int("clients", clients, 1)
    g = _int("inputs", inputs, 1)
    bad = math.ceil(fr * n - 1e-9)  # 0.2 * 25 is 5, not 6, despite float rounding
    return min(bad, g - 1)


def bucket_means(
    points: np.ndarray, s: int, *, seed: bytes | None = None, weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Bucketing (Karimireddy, He, Jaggi, ICLR 2022): shuffle the g inputs, average buckets of s.

    Returns (bucket means of shape (ceil(g/s), d), bucket weights or None, the permutation).
    The last bucket is short when s does not divide g. The shuffle comes from the AES-CTR PRG
    under ``seed`` (32 bytes; fresh ``os.urandom`` when None): an attacker that could predict it
    could place its inputs in the same bucket. With weights, each bucket mean is weighted and
    the bucket's weight is the sum of its members'. s = 1 leaves the points as they are.
    """
    from .prg import uniform  # lazy: the rules need the PRG only for bucketing

    x = _points(points)
    g = x.shape[0]
    size = _int("bucket size s", s, 1)
    w = _weights(weights, g)
    if size == 1:
        return x, w, np.arange(g)
    key = os.urandom(32) if seed is None else seed
    if not isinstance(key, bytes) or len(key) != 32:
        raise ValueError("bucket seed must be 32 bytes (or None for a fresh one)")
    perm = np.argsort(uniform(key, g), kind="stable")
    starts = np.arange(0, g, size)
    xs = x[perm]
    if w is None:
        sums = np.add.reduceat(xs, starts, axis=0)
        counts = np.diff(np.append(starts, g)).astype(np.float64)
        return sums / counts[:, None], None, perm
    ws = w[perm]
    bw = np.add.reduceat(ws, starts)
    bsum = np.add.reduceat(xs * ws[:, None], starts, axis=0)
    safe = np.where(bw > 0, bw, 1.0)
    return bsum / safe[:, None], bw, perm


def f_cap(rule: str, inputs: int) -> int:
    """The largest f `rule` can run with over `inputs` points (trimmed mean 2f < g, Krum g >= f + 3)."""
    if inputs <= 1:
        return 0
    if rule == "trimmed_mean":
        return (inputs - 1) // 2
    if rule in ("krum", "multi_krum"):
        return max(inputs - 3, 0)
    return inputs - 1


def bucket_seed(*parts: object) -> bytes:
    """A reproducible 32-byte bucketing seed from labels (for simulations; servers use os.urandom)."""
    return hashlib.sha256("/".join(["secagg-bucketing", *map(str, parts)]).encode()).digest()


# ----------------------------------------------------------------------------- dispatch

_PARAMS: dict[str, tuple[str, ...]] = {
    "mean": (),
    "median": (),
    "trimmed_mean": ("trim",),
    "krum": (),
    "multi_krum": ("m",),
    "geometric_median": ("eps", "tol", "max_iter"),
    "centered_clipping": ("tau", "iters", "center"),
}


def aggregate(
    rule: str,
    points: np.ndarray,
    *,
    f: int = 0,
    weights: np.ndarray | None = None,
    bucket: int = 1,
    bucket_seed: bytes | None = None,
    **params: Any,
) -> RuleResult:
    """Run `rule` (one of RULES) over the g accepted group means, tolerating f bad ones.

    `weights` reach mean and geometric_median only; other rules ignore them. trimmed_mean's
    trim defaults to f. With `bucket` s > 1 the inputs are first shuffled and averaged in
    buckets of s (`bucket_means`) and the rule runs over the ceil(g/s) bucket means with
    f capped to buckets - 1 (f bad inputs spoil at most f buckets); `selected` then names
    buckets and `info` carries the permutation's bucket count. An unknown parameter is an
    error rather than silently ignored, so a misspelt setting cannot weaken the rule unnoticed.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    x = _points(points)
    g = x.shape[0]
    ff = _int("f", f, 0, g - 1, f"; f counts bad inputs among the {g} groups, "
              "so at least one must be honest")
    w = _weights(weights, g)
    s = _int("bucket", bucket, 1, None, "; the bucket size s is how many inputs each bucket averages")
    if s > 1:
        x, w, _ = bucket_means(x, s, seed=bucket_seed, weights=w)
        g = x.shape[0]
        ff = min(ff, f_cap(rule, g))
    unknown = sorted(set(params) - set(_PARAMS[rule]))
    if unknown:
        allowed = ", ".join(_PARAMS[rule]) or "none"
        raise ValueError(f"rule {rule!r} got unknown parameter(s) {', '.join(unknown)}; "
                         f"it accepts: {allowed}")
    dispatch: dict[str, Callable[[], RuleResult]] = {
        "mean": lambda: mean(x, weights=w),
        "median": lambda: coordinate_median(x),
        "trimmed_mean": lambda: trimmed_mean(x, trim=params.get("trim", ff)),
        "krum": lambda: krum(x, f=ff),
        "multi_krum": lambda: multi_krum(x, f=ff, m=params.get("m")),
        "geometric_median": lambda: geometric_median(x, weights=w, **params),
        "centered_clipping": lambda: centered_clipping(x, **params),
    }
    out = dispatch[rule]()
    if s > 1:
        out = RuleResult(out.vector, out.selected, {**out.info, "bucket": s, "buckets": g, "f": ff})
    return out
