"""AES-256-CTR pseudo-random generator for masks.

A 32-byte seed is the AES key, the nonce is zero and the keystream is read as little-endian
unsigned integers of the modulus width.  Every seed must be used for one expansion only
(fcp/secagg's warning); seeds are derived per round, pair and purpose with HKDF.

``accumulate`` is the hot path: it writes the keystream into a per-thread scratch buffer
(``update_into``) and adds or subtracts it in place, so a mask costs one AES pass and one
numpy addition, with no fresh multi-megabyte allocation per peer.
"""

from __future__ import annotations

import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_ZERO_NONCE = bytes(16)
_BLOCK = 16
_scratch = threading.local()


def _encryptor(seed: bytes):  # type: ignore[no-untyped-def]
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()


def keystream(seed: bytes, nbytes: int) -> bytes:
    """``nbytes`` of AES-256-CTR keystream under ``seed`` (OpenSSL does the work)."""
    if nbytes < 0:
        raise ValueError("nbytes must be >= 0")
    enc = _encryptor(seed)
    return enc.update(bytes(nbytes)) + enc.finalize()


def _check_dtype(dtype: np.dtype | type) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind != "u" or dt.itemsize not in (4, 8):
        raise ValueError(f"PRG output dtype must be uint32 or uint64, got {dt}")
    return dt


def expand(seed: bytes, n: int, dtype: np.dtype | type = np.uint32) -> np.ndarray:
    """``n`` pseudo-random unsigned integers of ``dtype`` (uint32 or uint64), a fresh array."""
    dt = _check_dtype(dtype)
    return np.frombuffer(keystream(seed, n * dt.itemsize), dtype=dt.newbyteorder("<")).astype(dt)


def _buffers(nbytes: int) -> tuple[memoryview, bytearray]:
    zeros, out = getattr(_scratch, "zeros", b""), getattr(_scratch, "out", bytearray())
    if len(zeros) < nbytes:
        zeros, out = bytes(nbytes), bytearray(nbytes + _BLOCK)
        _scratch.zeros, _scratch.out = zeros, out
    return memoryview(zeros)[:nbytes], out


def accumulate(acc: np.ndarray, seed: bytes, *, subtract: bool = False) -> None:
    """acc += PRG(seed) (or -=) modulo 2^k, in place, for a contiguous uint32/uint64 ``acc``."""
    dt = _check_dtype(acc.dtype)
    nbytes = acc.size * dt.itemsize
    zeros, out = _buffers(nbytes)
    _encryptor(seed).update_into(zeros, out)
    stream = np.frombuffer(out, dtype=dt.newbyteorder("<"), count=acc.size)
    if subtract:
        acc -= stream
    else:
        acc += stream


def uniform(seed: bytes, n: int) -> np.ndarray:
    """``n`` floats uniform in [0, 1) with 53 random bits each (for stochastic rounding)."""
    return (expand(seed, n, np.uint64) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
