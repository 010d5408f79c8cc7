"""Shamir t-of-n secret sharing over GF(2^521 - 1), with batched reconstruction.

Secrets are 32-byte strings (X25519 private keys and self-mask seeds).  Share x-coordinates
are the holders' group indices (1..m).  ``lagrange_at_zero`` is computed once per responder
set and reused for every secret reconstructed from that set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32
_MASK521 = (1 << 521) - 1


@dataclass(frozen=True)
class Share:
    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(x: int, data: bytes) -> Share:
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ValueError("share value is not a field element")
    return Share(x, y)


def random_field_element(randbytes: Callable[[int], bytes]) -> int:
    """Uniform element of GF(p) by rejection sampling (no modulo bias)."""
    while True:
        v = int.from_bytes(randbytes(SHARE_BYTES), "big") & _MASK521
        if v < PRIME:
            return v


def split(secrets: Sequence[bytes], t: int, xs: Sequence[int], randbytes: Callable[[int], bytes]) -> dict[int, list[Share]]:
    """Share each secret t-of-len(xs); returns holder x -> one share per secret, in order.

    ``randbytes`` supplies the polynomial coefficients (os.urandom at the edge, fixed in tests).
    """
    if not 1 <= t <= len(xs):
        raise ValueError(f"threshold {t} must be in 1..{len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share x-coordinates must be distinct and non-zero")
    polys = []
    for s in secrets:
        if len(s) != SECRET_BYTES:
            raise ValueError(f"secrets are {SECRET_BYTES} bytes")
        polys.append([int.from_bytes(s, "big")] + [random_field_element(randbytes) for _ in range(t - 1)])
    out: dict[int, list[Share]] = {}
    for x in xs:
        row = []
        for coeffs in polys:
            acc = 0
            for c in reversed(coeffs):  # Horner
                acc = (acc * x + c) % PRIME
            row.append(Share(x, acc))
        out[x] = row
    return out


def lagrange_at_zero(xs: Sequence[int]) -> dict[int, int]:
    """Coefficients l_i with f(0) = sum l_i f(x_i) for any polynomial of degree < len(xs)."""
    if len(set(xs)) != len(xs):
        raise ValueError("duplicate x-coordinates")
    coeffs = {}
    for i in xs:
        num, den = 1, 1
        for j in xs:
            if j != i:
                num = num * (-j) % PRIME
                den = den * (i - j) % PRIME
        coeffs[i] = num * pow(den, -1, PRIME) % PRIME
    return coeffs


def combine(coeffs: Mapping[int, int], ys: Mapping[int, int]) -> bytes:
    """Reconstruct one 32-byte secret from shares ``ys`` (x -> y) with precomputed coefficients."""
    v = sum(coeffs[x] * ys[x] for x in coeffs) % PRIME
    if v >= 1 << (8 * SECRET_BYTES):
        raise ValueError("reconstructed value is not a 32-byte secret: inconsistent shares")
    return v.to_bytes(SECRET_BYTES, "big")


def reconstruct(shares: Sequence[Share], t: int) -> bytes:
    """Reconstruct from any t of ``shares`` (convenience for one secret)."""
    if len(shares) < t:
        raise ValueError(f"need {t} shares, got {len(shares)}")
    chosen = sorted(shares, key=lambda s: s.x)[:t]
    coeffs = lagrange_at_zero([s.x for s in chosen])
    return combine(coeffs, {s.x: s.y for s in chosen})
