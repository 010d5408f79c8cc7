"""X25519 key agreement and HKDF derivation of per-round, per-pair, per-purpose keys.

``derive`` binds the X25519 secret to the session (HKDF salt), the purpose, the protocol
version and both indices in order, so a key made for one use is never valid for another.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL_VERSION = b"secagg/v1"
KEY_BYTES = 32


class Purpose(Enum):
    MASK_SEED = b"pairwise-mask-seed"
    SHARE_ENCRYPTION = b"share-encryption-key"
    SELF_MASK = b"self-mask-seed"
    ROUNDING = b"stochastic-rounding"


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw bytes (the private half never leaves its owner)."""

    private: bytes
    public: bytes

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        sk = X25519PrivateKey.from_private_bytes(private)
        pk = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(private=private, public=pk)


def generate_keypair(randomness: bytes) -> KeyPair:
    """Deterministic twin of key generation: ``randomness`` (32 bytes) comes from os.urandom at the edge."""
    if len(randomness) != KEY_BYTES:
        raise ValueError("X25519 private key needs 32 bytes of randomness")
    return KeyPair.from_private(randomness)


def agree(private: bytes, peer_public: bytes) -> bytes:
    """Raw X25519 shared secret; rejects the all-zero output of a small-order peer key."""
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
    except ValueError as exc:
        raise ValueError(f"invalid X25519 public key: {exc}") from None
    return X25519PrivateKey.from_private_bytes(private).exchange(peer)


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """RFC 5869 HKDF with SHA-256 (tested against the RFC's vectors)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def derive(shared: bytes, *, session: bytes, purpose: Purpose, first: int, second: int) -> bytes:
    """HKDF-SHA256(shared, salt=session, info=version|purpose|first|second) -> 32 bytes."""
    info = b"|".join((PROTOCOL_VERSION, purpose.value, first.to_bytes(4, "big"), second.to_bytes(4, "big")))
    return hkdf_sha256(shared, salt=session, info=info)


def pair_keys(private: bytes, peers: dict[int, bytes], *, session: bytes, purpose: Purpose, u: int) -> dict[int, bytes]:
    """The key u and each peer v both compute for ``purpose`` (indices ordered so both agree)."""
    sk = X25519PrivateKey.from_private_bytes(private)
    out = {}
    for v, public in peers.items():
        try:
            shared = sk.exchange(X25519PublicKey.from_public_bytes(public))
        except ValueError as exc:
            raise ValueError(f"invalid X25519 public key of client {v}: {exc}") from None
        lo, hi = (u, v) if u < v else (v, u)
        out[v] = derive(shared, session=session, purpose=purpose, first=lo, second=hi)
    return out
