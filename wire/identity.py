"""Identity keys and the join handshake: a client proves it holds its registered Ed25519 key.

The server sends a fresh random nonce; the client signs it with its id, the SHA-256 of the
server certificate its TLS connection was served, and the commitment to its round
contribution.  A signature can be neither replayed on another stream, nor moved to another
identity, nor relayed by one server to another deployment (which has another certificate).
Reads (model downloads, status) are signed the same way, with a timestamp for freshness.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from secagg.protocol.keys import PROTOCOL_VERSION

CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")   # use fullmatch: "$" would accept a trailing newline
NONCE_BYTES = 32
BINDING_BYTES = 32
READ_WINDOW_SECONDS = 300.0   # a signed read older or newer than this is refused


def hello_message(nonce: bytes, client_id: str, server_binding: bytes, commitment: bytes) -> bytes:
    return b"|".join((PROTOCOL_VERSION, b"hello", nonce, client_id.encode(), server_binding, commitment))


def read_message(method: str, server_binding: bytes, client_id: str, timestamp_ms: int, argument: int = 0) -> bytes:
    """What a client signs to read a model or the status: method, server, identity, time, version."""
    return b"|".join((PROTOCOL_VERSION, b"read", method.encode(), server_binding, client_id.encode(),
                      timestamp_ms.to_bytes(8, "big"), argument.to_bytes(8, "big")))


def certificate_binding(certificate: bytes) -> bytes:
    """SHA-256 of a certificate's DER bytes; ``certificate`` is DER or PEM (the first one is used)."""
    from cryptography import x509

    if certificate.lstrip().startswith(b"-----"):
        try:
            certificate = x509.load_pem_x509_certificate(certificate).public_bytes(serialization.Encoding.DER)
        except ValueError:
            raise PKIError("not a PEM certificate") from None
    import hashlib

    return hashlib.sha256(certificate).digest()


class PKIError(Exception):
    """A certificate or key file problem the user can fix (missing, unreadable, wrong type)."""


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a key behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -- Ed25519 identity keys -------------------------------------------------------------------


def new_identity_key() -> bytes:
    """A fresh Ed25519 identity key as 32 raw private bytes."""
    return ed25519.Ed25519PrivateKey.generate().private_bytes_raw()


def _private(private_raw: bytes) -> ed25519.Ed25519PrivateKey:
    if len(private_raw) != 32:
        raise ValueError(f"an Ed25519 private key is 32 raw bytes, got {len(private_raw)}")
    return ed25519.Ed25519PrivateKey.from_private_bytes(bytes(private_raw))


def identity_public_key(private_raw: bytes) -> bytes:
    """The 32-byte raw public key that the server registers for this identity."""
    return _private(private_raw).public_key().public_bytes_raw()


def save_identity_key(path: str | os.PathLike[str], private_raw: bytes) -> None:
    """Save as unencrypted PKCS#8 PEM, mode 0600 (it is the client's vote)."""
    pem = _private(private_raw).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_file(Path(path), pem, 0o600)


def _read(path: Path, what: str, hint: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"no {what} at {path}; {hint}") from None
    except IsADirectoryError:
        raise PKIError(f"{path} is a directory, not a {what} file") from None
    except OSError as exc:
        raise PKIError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_identity_key(path: str | os.PathLike[str]) -> bytes:
    """Load a key written by ``save_identity_key``; the raw 32 private bytes."""
    p = Path(path)
    data = _read(p, "identity key", "create one with `secagg certs --out DIR --client NAME`")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PKIError(
            f"{p} is not an identity key: expected an unencrypted Ed25519 PKCS#8 PEM key "
            "as written by `secagg certs --client NAME`"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PKIError(f"{p} holds a {type(key).__name__}, not an Ed25519 identity key")
    return key.private_bytes_raw()


def load_identity_public_key(path: str | os.PathLike[str]) -> bytes:
    """Read an Ed25519 public key: 32 raw bytes, 64 hex characters or a PEM public key."""
    p = Path(path)
    data = _read(p, "public key", "pass the file holding the client's Ed25519 public key")
    if len(data) == 32 and not data.startswith(b"-----"):
        return data
    text = data.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if b"PRIVATE KEY-----" in text:
        raise PKIError(f"{p} is a private key; pass it with --key instead of --public-key-file")
    try:
        key = serialization.load_pem_public_key(text)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PKIError(
            f"{p} is not an Ed25519 public key: expected 32 raw bytes, 64 hex characters or "
            "a PEM public key"
        ) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise PKIError(f"{p} holds a {type(key).__name__}, not an Ed25519 public key")
    return key.public_bytes_raw()
