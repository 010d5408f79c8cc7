"""Checks on a revealed group sum.

The server never sees a single client's update, only the decoded sum over a group. These checks
bound what a group of honest, norm-bounded clients can possibly produce (including the known
fixed-point quantisation error), so a group whose sum falls outside is provably not all-honest
and is rejected with a reason. See docs/robust-rules.md for the formulas and their derivation.

Notation: n = contributors, d = len(total), B = clip_norm, c = clip_value,
delta = 1/scale (max stochastic-rounding error per coordinate), eps = 1/sqnorm_scale
(max stochastic-rounding error of the squared-norm coordinate).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CHECKS", "COUNT_TOL", "FP_RTOL", "CheckResult", "SumBounds", "check_group_sum"]

#: Names of the checks, in the order they are run; each failure reason starts with one of them.
CHECKS: tuple[str, ...] = ("count", "range", "norm", "sqnorm", "cauchy-schwarz")

#: The count coordinate is an exact integer per client, so its sum decodes exactly.
COUNT_TOL: float = 1e-9

#: Relative allowance for float64 rounding when comparing a computed value with a bound: the
#: bounds themselves are exact, but ||total|| and friends are computed in floating point.
FP_RTOL: float = 1e-9


def _positive_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"SumBounds.{name} must be a real number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"SumBounds.{name} must be finite and > 0, got {value!r}; "
                         "take it from the round configuration")


@dataclass(frozen=True)
class SumBounds:
    """What every honest client guarantees about its own update, plus how it was encoded."""

    clip_norm: float  # B: every honest client's update x has ||x||_2 <= B
    clip_value: float  # c: every honest coordinate |x_i| <= c
    scale: float  # coordinates were encoded as q_i = stochastic_round(x_i * scale)
    sqnorm_scale: float  # the squared-norm coordinate: stochastic_round(||x||^2 * sqnorm_scale)

    def __post_init__(self) -> None:
        for name in ("clip_norm", "clip_value", "scale", "sqnorm_scale"):
            _positive_finite(name, getattr(self, name))


@dataclass(frozen=True)
class CheckResult:
    """Verdict on one group sum; `reasons` lists every failed check, one line each."""

    accepted: bool
    reasons: tuple[str, ...]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> tuple[str, ...]:
        """Names (from CHECKS) of the failed checks, so callers need not parse reasons."""
        return tuple(r.split(" ", 1)[0] for r in self.reasons)


def _within(value: float, bound: float) -> bool:
    """value <= bound, allowing float64 rounding in how value was computed."""
    return value <= bound + FP_RTOL * abs(bound)


def _at_least(value: float, bound: float) -> bool:
    return value >= bound - FP_RTOL * abs(bound)


def _real_scalar(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out!r}; decode the group sum first")
    return out


def check_group_sum(
    total: np.ndarray,
    count: float,
    sqnorm_total: float,
    contributors: int,
    bounds: SumBounds,
) -> CheckResult:
    """Check a decoded group sum against what `contributors` honest clients could produce.

    All five checks always run so the round record names every violation, not just the first.
    Raises ValueError for malformed input (a caller bug), never for a merely bad sum.
    """
    if not isinstance(bounds, SumBounds):
        raise ValueError(f"bounds must be a SumBounds, got {type(bounds).__name__}")
    if isinstance(contributors, bool) or not isinstance(contributors, numbers.Integral):
        raise ValueError(f"contributors must be an int, got {contributors!r}")
    n = int(contributors)
    if n < 1:
        raise ValueError(f"contributors must be >= 1, got {n}; a group with no survivors "
                         "has no sum to check")
    arr = np.asarray(total)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"total must be a non-empty 1-D vector, got shape {arr.shape}")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer)
                                     or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"total must be a real numeric vector, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError("total contains NaN or inf; decode the group sum before checking it")
    cnt = _real_scalar("count", count)
    sq = _real_scalar("sqnorm_total", sqnorm_total)

    d = arr.size
    B, c = float(bounds.clip_norm), float(bounds.clip_value)
    delta = 1.0 / float(bounds.scale)  # per-coordinate rounding error is < delta
    eps = 1.0 / float(bounds.sqnorm_scale)  # squared-norm rounding error is < eps
    reasons: list[str] = []

    # 1. count: each honest client adds exactly the integer 1.
    nearest = round(cnt)
    if nearest != n or abs(cnt - nearest) > COUNT_TOL:
        reasons.append(f"count {cnt:.10g} != contributors {n}")

    # 2. range: |sum_u xq_ui| <= sum_u (|x_ui| + delta) < n (c + delta).
    max_abs = float(np.max(np.abs(arr)))
    coord_bound = n * (c + delta)
    if not _within(max_abs, coord_bound):
        reasons.append(f"range max|total_i| {max_abs:.6g} > bound {coord_bound:.6g} "
                       f"(contributors {n} x (c {c:.6g} + 1/scale {delta:.3g}))")

    # 3. norm: ||sum_u xq_u|| <= sum_u (||x_u|| + ||e_u||) < n B + n sqrt(d) delta.
    sqn = float(np.dot(arr, arr))
    norm = math.sqrt(sqn)
    norm_slack = n * math.sqrt(d) * delta
    norm_bound = n * B + norm_slack
    if not _within(norm, norm_bound):
        reasons.append(f"norm {norm:.6g} > bound {norm_bound:.6g} "
                       f"(contributors {n} x B {B:.6g} + slack {norm_slack:.3g})")

    # 4. squared norm: each s_u is within eps of ||x_u||^2 in [0, B^2].
    sq_hi = n * B * B + n * eps
    sq_lo = -n * eps
    if not _within(sq, sq_hi):
        reasons.append(f"sqnorm {sq:.6g} > bound {sq_hi:.6g} "
                       f"(contributors {n} x B^2 {B * B:.6g} + {n}/sqnorm_scale)")
    if not _at_least(sq, sq_lo):
        reasons.append(f"sqnorm {sq:.6g} < bound {sq_lo:.6g} (-{n}/sqnorm_scale); "
                       "a sum of squared norms cannot be negative")

    # 5. Cauchy-Schwarz. With x_u the bounded update and e_u its rounding error:
    #    ||sum x_u||^2 <= n sum ||x_u||^2 < n (S + n eps)          (S = sqnorm_total)
    #    ||total|| <= ||sum x_u|| + ||sum e_u|| < sqrt(n max(S + n eps, 0)) + n sqrt(d) delta
    # Squaring gives ||total||^2 <= n S + slack with
    #    slack = n^2 eps + 2 n sqrt(d) delta sqrt(n max(S + n eps, 0)) + n^2 d delta^2.
    # It is worst case (every rounding error at its maximum and aligned), so honest groups
    # always pass, while a client that reports a small squared norm for a big vector does not.
    root = math.sqrt(n * max(sq + n * eps, 0.0))
    cs_bound = (root + norm_slack) ** 2
    cs_slack = cs_bound - n * sq
    if not _within(sqn, cs_bound):
        reasons.append(f"cauchy-schwarz ||total||^2 {sqn:.6g} > contributors {n} x "
                       f"sqnorm {sq:.6g} + slack {cs_slack:.3g}; squared norms under-reported")

    metrics: dict[str, float] = {
        "contributors": float(n),
        "dim": float(d),
        "count": cnt,
        "max_abs": max_abs,
        "coord_bound": coord_bound,
        "norm": norm,
        "norm_bound": norm_bound,
        "norm_slack": norm_slack,
        "sqnorm_total": sq,
        "sqnorm_bound": sq_hi,
        "sqnorm_lower": sq_lo,
        "cs_lhs": sqn,
        "cs_bound": cs_bound,
        "cs_slack": cs_slack,
    }
    return CheckResult(accepted=not reasons, reasons=tuple(reasons), metrics=metrics)
