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


def _pass_info(pass_tag: int) -> tuple[bytes, ...]:
    """Tag 0 is the single-pass round (no pass in the info, as before multi-pass rounds existed)."""
    if pass_tag < 0:
        raise ValueError(f"pass tag must be >= 0, got {pass_tag}")
    return (b"pass", pass_tag.to_bytes(4, "big")) if pass_tag else ()


def derive(shared: bytes, *, session: bytes, purpose: Purpose, first: int, second: int, pass_tag: int = 0) -> bytes:
    """HKDF-SHA256(shared, salt=session, info=version|purpose|first|second[|pass|p]) -> 32 bytes.

    ``pass_tag`` p >= 1 names pass p of a multi-pass round: each pass gets its own seed, and
    one pass's seed says nothing about another's (HKDF-Expand is a PRF in its info)."""
    info = b"|".join((PROTOCOL_VERSION, purpose.value, first.to_bytes(4, "big"), second.to_bytes(4, "big"), *_pass_info(pass_tag)))
    return hkdf_sha256(shared, salt=session, info=info)


def pair_secrets(private: bytes, peers: dict[int, bytes]) -> dict[int, bytes]:
    """Raw X25519 secret with each peer (kept by a multi-pass client to derive every pass's seeds)."""
    sk = X25519PrivateKey.from_private_bytes(private)
    out = {}
    for v, public in peers.items():
        try:
            out[v] = sk.exchange(X25519PublicKey.from_public_bytes(public))
        except ValueError as exc:
            raise ValueError(f"invalid X25519 public key of client {v}: {exc}") from None
    return out


def pair_seed(shared: bytes, *, session: bytes, purpose: Purpose, u: int, v: int, pass_tag: int = 0) -> bytes:
    """The key u and v both compute from their X25519 secret (indices ordered so both agree)."""
    lo, hi = (u, v) if u < v else (v, u)
    return derive(shared, session=session, purpose=purpose, first=lo, second=hi, pass_tag=pass_tag)


def pair_keys(private: bytes, peers: dict[int, bytes], *, session: bytes, purpose: Purpose, u: int, pass_tag: int = 0) -> dict[int, bytes]:
    """The key u and each peer v both compute for ``purpose`` (and pass, in a multi-pass round)."""
    return {v: pair_seed(shared, session=session, purpose=purpose, u=u, v=v, pass_tag=pass_tag)
            for v, shared in pair_secrets(private, peers).items()}


def pass_self_seed(root: bytes, *, session: bytes, index: int, pass_tag: int) -> bytes:
    """Client ``index``'s self-mask seed for a pass: the per-round secret itself in a single-pass
    round (tag 0), else HKDF(root, info=version|self-mask-seed|index|pass|p).  Revealing pass p's
    seed reveals neither the root nor any other pass's seed."""
    if not pass_tag:
        return root
    info = b"|".join((PROTOCOL_VERSION, Purpose.SELF_MASK.value, index.to_bytes(4, "big"), *_pass_info(pass_tag)))
    return hkdf_sha256(root, salt=session, info=info)
