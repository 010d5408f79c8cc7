"""AES-256-CTR pseudo-random generator for masks.

A 32-byte seed is the AES key, the nonce is zero and the keystream is read as little-endian
unsigned integers of the modulus width.  Every seed must be used for one expansion only
(fcp/secagg's warning); seeds are derived per round, pair and purpose with HKDF.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_ZERO_NONCE = bytes(16)


def keystream(seed: bytes, nbytes: int) -> bytes:
    """``nbytes`` of AES-256-CTR keystream under ``seed`` (OpenSSL does the work)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if nbytes < 0:
        raise ValueError("nbytes must be >= 0")
    enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    return enc.update(bytes(nbytes)) + enc.finalize()


def expand(seed: bytes, n: int, dtype: np.dtype | type = np.uint32) -> np.ndarray:
    """``n`` pseudo-random unsigned integers of ``dtype`` (uint32 or uint64), little-endian."""
    dt = np.dtype(dtype).newbyteorder("<")
    if dt.kind != "u":
        raise ValueError(f"PRG output dtype must be unsigned, got {dt}")
    out = np.frombuffer(keystream(seed, n * dt.itemsize), dtype=dt)
    return out.astype(np.dtype(dtype), copy=False)


def uniform(seed: bytes, n: int) -> np.ndarray:
    """``n`` floats uniform in [0, 1) with 53 random bits each (for stochastic rounding)."""
    return (expand(seed, n, np.uint64) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
