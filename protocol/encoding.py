"""From float updates to integers mod 2^k and back.

The client bounds its update (L2 to B, then each coordinate to [-c, c]), scales it to fixed
point with unbiased stochastic rounding and writes it in two's complement modulo 2^k.  Two
coordinates ride along at the end: a count (exactly 1) and the squared norm, so the server
can check each revealed sum.  k (32 or 64, the numpy word, so modular sums are free) is
chosen so that m * max|q| < 2^(k-1): a sum of m honest vectors never wraps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import prg

EXTRA_COORDS = 2  # count, squared norm


@dataclass(frozen=True)
class EncodingParams:
    """How updates become integers; the server sends these with the round configuration."""

    clip_norm: float = 10.0           # B
    clip_value: float | None = None   # c; None means c = B (coordinate clip is then a no-op)
    precision_bits: int = 16          # a coordinate at +-c encodes to +-2^precision_bits

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive finite number, got {self.clip_norm}")
        if self.clip_value is not None and not (math.isfinite(self.clip_value) and self.clip_value > 0):
            raise ValueError(f"clip_value must be a positive finite number, got {self.clip_value}")
        if not 1 <= self.precision_bits <= 52:
            raise ValueError("precision_bits must be in 1..52")

    @property
    def coord_bound(self) -> float:
        return self.clip_norm if self.clip_value is None else min(self.clip_value, self.clip_norm)

    @property
    def scale(self) -> float:
        """Fixed-point scale of ordinary coordinates: q = round(x * scale)."""
        return (1 << self.precision_bits) / self.coord_bound

    @property
    def sqnorm_scale(self) -> float:
        """Fixed-point scale of the squared-norm coordinate (at most B^2)."""
        return (1 << self.precision_bits) / (self.clip_norm**2)

    @property
    def max_abs_q(self) -> int:
        """Largest |integer| an honest client encodes in any coordinate (rounding may add 1)."""
        return (1 << self.precision_bits) + 1

    def modulus_bits(self, members: int) -> int:
        """Smallest numpy word k in {32, 64} with members * max|q| < 2^(k-1)."""
        need = members * self.max_abs_q
        for k in (32, 64):
            if need < 1 << (k - 1):
                return k
        raise ValueError(f"{members} members at {self.precision_bits} bits of precision overflow 64-bit sums; lower precision_bits")

    def dtype(self, members: int) -> np.dtype:
        return np.dtype(np.uint32 if self.modulus_bits(members) == 32 else np.uint64)


def bound(x: np.ndarray, clip_norm: float, clip_value: float | None = None) -> np.ndarray:
    """L2-clip to ``clip_norm`` then clip each coordinate to [-clip_value, clip_value]."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("update contains NaN or infinity; fix the training step before submitting")
    norm = float(np.linalg.norm(x))
    if norm > clip_norm:
        x = x * (clip_norm / norm)
    if clip_value is not None:
        x = np.clip(x, -clip_value, clip_value)
    return x


def stochastic_round(v: np.ndarray, seed: bytes) -> np.ndarray:
    """Unbiased rounding to integers: floor(v) + [u < frac(v)], u from the AES-CTR PRG."""
    lo = np.floor(v)
    return (lo + (prg.uniform(seed, v.size).reshape(v.shape) < (v - lo))).astype(np.int64)


def encode(x: np.ndarray, params: EncodingParams, members: int, *, rounding_seed: bytes) -> np.ndarray:
    """Bound, quantise and embed an update: returns d + 2 unsigned words mod 2^k."""
    xb = bound(x, params.clip_norm, params.clip_value)
    sq = min(float(np.dot(xb, xb)), params.clip_norm**2)
    v = np.empty(xb.size + EXTRA_COORDS, dtype=np.float64)
    v[: xb.size] = xb * params.scale
    v[-2] = 1.0
    v[-1] = sq * params.sqnorm_scale
    q = stochastic_round(v, rounding_seed)
    return embed(q, params.dtype(members))


def embed(q: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Two's complement of signed integers in the unsigned word ``dtype`` (wraps by design)."""
    signed = np.int32 if np.dtype(dtype) == np.uint32 else np.int64
    return q.astype(signed).view(np.dtype(dtype))


def to_signed(words: np.ndarray) -> np.ndarray:
    """Read unsigned words mod 2^k as two's complement signed integers."""
    signed = np.int32 if words.dtype == np.uint32 else np.int64
    return words.view(signed)


@dataclass(frozen=True)
class DecodedSum:
    """A revealed group sum in real units: what the aggregate checks look at."""

    total: np.ndarray     # float64, sum of the contributors' bounded updates
    count: float          # sum of the count coordinate (= contributors if honest)
    sqnorm_total: float   # sum of the claimed squared norms

    def mean(self, contributors: int) -> np.ndarray:
        return self.total / contributors


def decode(words: np.ndarray, params: EncodingParams) -> DecodedSum:
    signed = to_signed(words)
    total = signed[:-EXTRA_COORDS].astype(np.float64)   # the one float copy of a D-vector
    total /= params.scale
    return DecodedSum(total=total, count=float(signed[-2]), sqnorm_total=float(signed[-1]) / params.sqnorm_scale)
