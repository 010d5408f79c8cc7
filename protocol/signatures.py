"""Ed25519 signatures for active mode: signed round keys and the consistency check.

Verification raises (pyca's rule: a result that must not be ignored is an exception).
"""

from __future__ import annotations

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


def keys_message(session: bytes, index: int, c_public: bytes, s_public: bytes) -> bytes:
    """What a client signs in active mode: its two round public keys, bound to session and index."""
    return b"|".join((PROTOCOL_VERSION, b"keys", session, index.to_bytes(4, "big"), c_public, s_public))


def consistency_message(session: bytes, survivors: frozenset[int] | tuple[int, ...]) -> bytes:
    """What a client signs in the consistency check: the survivor set U3 it was told about."""
    body = b"".join(i.to_bytes(4, "big") for i in sorted(survivors))
    return b"|".join((PROTOCOL_VERSION, b"consistency", session, body))


def self_mask_commitment(session: bytes, index: int, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed: the server checks each reconstructed b_u against it,
    so one member's wrong share cannot silently corrupt the sum."""
    import hashlib

    return hashlib.sha256(b"|".join((PROTOCOL_VERSION, b"self-mask", session, index.to_bytes(4, "big"), seed))).digest()
