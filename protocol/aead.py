"""AES-256-GCM encryption of Shamir shares sent through the server.

The associated data binds protocol version, session, sender and receiver: the server can
neither replay a ciphertext into another round nor re-route it to another client.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import RemoteProtocolError
from .keys import PROTOCOL_VERSION

NONCE_BYTES = 12


def associated_data(session: bytes, sender: int, receiver: int) -> bytes:
    return b"|".join((PROTOCOL_VERSION, b"share", session, sender.to_bytes(4, "big"), receiver.to_bytes(4, "big")))


def seal(key: bytes, plaintext: bytes, *, session: bytes, sender: int, receiver: int, nonce: bytes) -> bytes:
    """nonce || AES-GCM(plaintext); ``nonce`` is injected (os.urandom at the edge)."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError("AES-GCM nonce must be 12 bytes")
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data(session, sender, receiver))


def open_(key: bytes, ciphertext: bytes, *, session: bytes, sender: int, receiver: int) -> bytes:
    """Decrypt and authenticate; raises RemoteProtocolError naming the sender on any tampering."""
    if len(ciphertext) < NONCE_BYTES + 16:
        raise RemoteProtocolError(f"share ciphertext from client {sender} is too short", index=sender)
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, associated_data(session, sender, receiver))
    except InvalidTag:
        raise RemoteProtocolError(
            f"share ciphertext from client {sender} to {receiver} failed authentication "
            "(tampered, replayed or re-routed)",
            index=sender,
        ) from None
