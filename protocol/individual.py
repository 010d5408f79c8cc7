"""Robust rules over individual clients while the server sees only sums (multi-pass rounds).

Each pass is one secure sum of the same cohort (one key agreement, fresh masks per pass). The
server sends every survivor the pass's public value v; each client computes its own input from
its bounded update x and v, bounded again by this module, and masks it:

- ``rfa_secure`` (Pillutla, Kakade, Harchaoui, IEEE TSP 2022, smoothed Weiszfeld): pass 1
  sends (x, 1), giving the mean; pass p > 1 sends (w x, w) with w = nu / max(nu, ||x - v||)
  in (0, 1] (the paper's beta = 1/max(nu, ||x - v||) scaled by nu, which cancels in
  v <- sum(w x) / sum(w)), so both the vector (norm <= B) and the weight (<= 1) are bounded.
- ``cclip_secure`` (Karimireddy, He, Jaggi ICML 2021, centered clipping): pass p sends
  clip_tau(x - v), and v <- v + sum / count; v starts at the round's centre (e.g. the previous
  aggregate).

A pass input is d + 3 words: the vector, the weight, the count (1) and the squared norm, so
every revealed group sum of every pass is checked like a single-pass sum, plus 0 <= weight <= n.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .aggregation import bounds_of
from .checks import CheckResult, check_group_sum
from .encoding import EncodingParams, bound, embed, stochastic_round, to_signed
from .errors import AbortError

__all__ = ["INDIVIDUAL_RULES", "PASS_EXTRA", "IndividualRule", "PassOutcome", "PassSum", "combine_pass",
           "decode_pass", "encode_pass", "pass_words"]

INDIVIDUAL_RULES: tuple[str, ...] = ("rfa_secure", "cclip_secure")
PASS_EXTRA = 3          # weight, count, squared norm
PUBLIC_NORM_FACTOR = 2  # a client refuses a public value longer than this many B


@dataclass(frozen=True)
class IndividualRule:
    """Which individual-level rule a round runs, with how many passes and its constants."""

    name: str
    passes: int
    nu: float = 1e-3     # RFA smoothing, in the update's units
    tau: float = 1.0     # centered-clipping radius, in the update's units

    def __post_init__(self) -> None:
        if self.name not in INDIVIDUAL_RULES:
            raise ValueError(f"unknown individual-level rule {self.name!r}; choose one of {', '.join(INDIVIDUAL_RULES)}")
        if isinstance(self.passes, bool) or not isinstance(self.passes, int) or self.passes < 1:
            raise ValueError(f"passes must be an integer >= 1, got {self.passes!r}")
        if self.name == "rfa_secure" and self.passes < 2:
            raise ValueError("rfa_secure needs at least 2 passes (the mean, then one Weiszfeld step)")
        for name in ("nu", "tau"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")

    def input_bound(self, params: EncodingParams) -> float:
        """The L2 bound of one pass input: B for RFA (w <= 1), min(tau, 3B) for centered clipping
        (||x - v|| <= B + 2B with the public value refused beyond 2B)."""
        return params.clip_norm if self.name == "rfa_secure" else min(self.tau, (1 + PUBLIC_NORM_FACTOR) * params.clip_norm)

    def pass_params(self, params: EncodingParams) -> EncodingParams:
        """How pass inputs are encoded: the round's precision, the input bound as the norm bound."""
        return EncodingParams(clip_norm=self.input_bound(params), clip_value=None, precision_bits=params.precision_bits)

    def first_public(self, dim: int, center: np.ndarray | None = None) -> np.ndarray:
        """Pass 1's public value: nothing for RFA (pass 1 is the mean), the centre for clipping."""
        if self.name == "rfa_secure":
            return np.zeros(0)
        return np.zeros(dim) if center is None else np.asarray(center, dtype=np.float64).copy()

    def client_input(self, x: np.ndarray, public: np.ndarray) -> tuple[np.ndarray, float]:
        """(vector, weight) a client sends for a pass, from its bounded update x and the public v."""
        if self.name == "rfa_secure":
            if public.size == 0:
                return x, 1.0
            w = self.nu / max(self.nu, float(np.linalg.norm(x - public)))
            return x * w, w
        z = x - public
        n = float(np.linalg.norm(z))
        return (z * (self.tau / n) if n > self.tau else z), 1.0

    def step(self, public: np.ndarray, total: np.ndarray, weight: float, count: float) -> np.ndarray:
        """The next estimate from one pass's sums over all accepted groups."""
        if self.name == "rfa_secure":
            return total / weight
        return public + total / count


def pass_words(rule: IndividualRule, update: np.ndarray, public: np.ndarray, params: EncodingParams, members: int,
               *, rounding_seed: bytes) -> np.ndarray:
    """What the client library masks for a pass: bound the update, check the public value, compute
    the rule's input and encode it.  Raises AbortError for a public value no honest server sends."""
    x = bound(update, params.clip_norm, params.clip_value)
    v = np.asarray(public, dtype=np.float64)
    if v.size not in (0, x.size) or v.ndim != 1:
        raise AbortError(f"the pass's public value has {v.size} values; the update has {x.size}")
    if not np.all(np.isfinite(v)) or float(np.linalg.norm(v)) > PUBLIC_NORM_FACTOR * params.clip_norm:
        raise AbortError(f"the pass's public value is not finite or longer than {PUBLIC_NORM_FACTOR} x clip_norm; refusing")
    vector, weight = rule.client_input(x, v)
    return encode_pass(vector, weight, rule.pass_params(params), members, rounding_seed=rounding_seed)


def encode_pass(vector: np.ndarray, weight: float, params: EncodingParams, members: int, *, rounding_seed: bytes) -> np.ndarray:
    """d + 3 words: the vector (L2-bounded by ``params.clip_norm``), the weight in [0, 1] at
    2^precision_bits, the count 1 and the squared norm, each stochastically rounded."""
    xb = bound(vector, params.clip_norm)
    w = min(max(float(weight), 0.0), 1.0)
    v = np.empty(xb.size + PASS_EXTRA, dtype=np.float64)
    v[: xb.size] = xb * params.scale
    v[-3] = w * (1 << params.precision_bits)
    v[-2] = 1.0
    v[-1] = min(float(np.dot(xb, xb)), params.clip_norm**2) * params.sqnorm_scale
    return embed(stochastic_round(v, rounding_seed), params.dtype(members))


@dataclass(frozen=True)
class PassSum:
    """One group's revealed pass sum in real units."""

    total: np.ndarray
    weight: float
    count: float
    sqnorm_total: float


def decode_pass(words: np.ndarray, params: EncodingParams) -> PassSum:
    signed = to_signed(words)
    total = signed[:-PASS_EXTRA].astype(np.float64) / params.scale
    return PassSum(total, float(signed[-3]) / (1 << params.precision_bits), float(signed[-2]), float(signed[-1]) / params.sqnorm_scale)


def check_pass_sum(s: PassSum, contributors: int, params: EncodingParams) -> CheckResult:
    """The single-pass checks on the vector, count and squared norm, plus 0 <= weight <= n (each
    weight is in [0, 1], within one rounding step)."""
    res = check_group_sum(s.total, s.count, s.sqnorm_total, contributors, bounds_of(params))
    slack = contributors / (1 << params.precision_bits)
    if -slack <= s.weight <= contributors + slack:
        return res
    reason = f"weight total {s.weight:.6g} outside [0, contributors {contributors}]"
    return CheckResult(False, res.reasons + (reason,), res.metrics | {"weight_total": s.weight})


@dataclass(frozen=True)
class PassOutcome:
    """What one pass revealed and decided, for the round record."""

    pass_index: int
    public: np.ndarray            # the value the pass was computed against
    estimate: np.ndarray          # the estimate after it
    accepted: tuple[int, ...]     # groups whose pass sum passed the checks
    rejected: dict[int, tuple[str, ...]]
    weight_total: float
    count_total: float
    total: np.ndarray             # sum over accepted groups of the pass inputs

    def as_record(self) -> dict[str, object]:
        return {"pass": self.pass_index, "accepted_groups": list(self.accepted),
                "rejected": {str(g): list(r) for g, r in self.rejected.items()},
                "weight_total": self.weight_total, "count_total": self.count_total,
                "sum_norm": float(np.linalg.norm(self.total)), "estimate_norm": float(np.linalg.norm(self.estimate))}


def combine_pass(rule: IndividualRule, pass_index: int, public: np.ndarray, sums: Mapping[int, tuple[np.ndarray, int]],
                 params: EncodingParams) -> PassOutcome:
    """Decode and check each group's pass sum; the accepted ones give the next estimate.  Raises
    ValueError when no group passed (the round has no update)."""
    pp = rule.pass_params(params)
    accepted, rejected = [], {}
    total, weight, count = None, 0.0, 0.0
    for g in sorted(sums):
        words, n = sums[g]
        s = decode_pass(words, pp)
        res = check_pass_sum(s, n, pp)
        if not res.accepted:
            rejected[g] = res.reasons
            continue
        accepted.append(g)
        total = s.total.copy() if total is None else total + s.total
        weight += s.weight
        count += s.count
    if total is None:
        raise ValueError(f"pass {pass_index}: no group's sum passed the checks")
    if rule.name == "rfa_secure" and weight <= 0:
        raise ValueError(f"pass {pass_index}: the accepted weights sum to {weight}; no estimate")
    estimate = rule.step(public, total, weight, count)
    return PassOutcome(pass_index, public, estimate, tuple(accepted), rejected, weight, count, total)
