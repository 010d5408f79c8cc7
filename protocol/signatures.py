"""Ed25519 signatures for active mode: signed round keys and the consistency check.

Verification raises (pyca's rule: a result that must not be ignored is an exception).
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import DropReason, RemoteProtocolError
from .keys import PROTOCOL_VERSION


def public_key(private: bytes) -> bytes:
    sk = Ed25519PrivateKey.from_private_bytes(private)
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(private: bytes, message: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private).sign(message)


def verify(public: bytes, signature: bytes, message: bytes, *, index: int | None = None) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise RemoteProtocolError(
            f"signature of client {index} does not verify", index=index, reason=DropReason.BAD_SIGNATURE
        ) from None


@functools.lru_cache(maxsize=8)
def _indices(xs: frozenset[int] | tuple[int, ...]) -> bytes:
    """Sorted 4-byte big-endian indices; cached, since a client checks every neighbour's consistency
    signature over the same survivor set (O(members) each, O(members * k) per client without it)."""
    return np.fromiter(sorted(xs), dtype=">u4", count=len(xs)).tobytes()


def keys_message(binding: bytes, index: int, c_public: bytes, s_public: bytes) -> bytes:
    """What a client signs in active mode: its two round public keys, bound to the whole group
    configuration (``GroupConfig.digest``, which holds every member's fresh commitment) and its seat."""
    return b"|".join((PROTOCOL_VERSION, b"keys", binding, index.to_bytes(4, "big"), c_public, s_public))


def consistency_message(binding: bytes, index: int, c_public: bytes, s_public: bytes,
                        survivors: frozenset[int] | tuple[int, ...], advertised: frozenset[int] | tuple[int, ...],
                        pass_binding: bytes = b"") -> bytes:
    """What a client signs in the consistency check: the survivor set U3 it was told about and the
    set U1 whose keys it was shown, bound to the configuration and to the signer's own round keys,
    so a signature harvested in another round, group or view verifies nowhere else.  In a
    multi-pass round ``pass_binding`` (``messages.public_digest``: the pass index and its public
    value) is appended: a signature of one pass is void in another, and members shown different
    public values cannot complete the pass together."""
    parts = (PROTOCOL_VERSION, b"consistency", binding, index.to_bytes(4, "big"), c_public, s_public,
             _indices(survivors), b"u1", _indices(advertised))
    return b"|".join(parts + ((b"pass", pass_binding) if pass_binding else ()))


def self_mask_commitment(binding: bytes, index: int, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed: the server checks each reconstructed b_u against it,
    so one member's wrong share cannot silently corrupt the sum."""
    return hashlib.sha256(b"|".join((PROTOCOL_VERSION, b"self-mask", binding, index.to_bytes(4, "big"), seed))).digest()


def pass_seed_commitment(binding: bytes, index: int, pass_index: int, seed: bytes) -> bytes:
    """Multi-pass: commitment to pass p's self-mask seed, against which the server checks the
    seed a survivor reveals for that pass."""
    return hashlib.sha256(b"|".join((PROTOCOL_VERSION, b"pass-self-mask", binding, index.to_bytes(4, "big"),
                                     pass_index.to_bytes(4, "big"), seed))).digest()
