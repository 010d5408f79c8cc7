"""Certificates and identity keys, made with ``cryptography`` only.

TLS is always on (see docs/threat-model.md), so a developer, the simulator and the tests need a CA and
localhost certificates without reaching for openssl: ``write_dev_pki`` makes them. The
certificates follow RFC 5280 closely enough for OpenSSL's X509_STRICT checks (key usage,
subject/authority key identifiers, non-CA leaves), so they keep working as Python tightens
its defaults. Ed25519 identity keys (the sybil defence: no registration, no vote) live here too.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Identity keys live with the wire layer so that the client library can load them too.
from secagg.wire.identity import (
    PKIError,
    _write_file,
    identity_public_key,
    load_identity_key,
    load_identity_public_key,
    new_identity_key,
    save_identity_key,
)

__all__ = [
    "CertPair",
    "DevPKI",
    "PKIError",
    "check_key_pair",
    "check_name",
    "identity_public_key",
    "load_identity_key",
    "load_identity_public_key",
    "make_ca",
    "make_cert",
    "new_identity_key",
    "save_identity_key",
    "save_identity_public_key",
    "write_dev_pki",
]

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_RESERVED_NAMES = frozenset({"ca", "server"})
_BACKDATE = timedelta(minutes=5)  # tolerate small clock skew between hosts


@dataclass(frozen=True)
class CertPair:
    """Paths of one certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class DevPKI:
    """Paths written by ``write_dev_pki``."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, CertPair] = field(default_factory=dict)
    reused_ca: bool = False


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_days(days: int) -> None:
    if not isinstance(days, int) or days < 1:
        raise ValueError(f"certificate lifetime must be a positive number of days, got {days!r}")


def _name(common_name: str) -> x509.Name:
    if not common_name:
        raise ValueError("a certificate needs a non-empty common name")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str = "secagg dev CA", days: int = 365) -> tuple[bytes, bytes]:
    """A self-signed EC P-256 CA: (certificate PEM, private key PEM)."""
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _load_ca(ca_cert_pem: bytes, ca_key_pem: bytes) -> tuple[x509.Certificate, object]:
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    except ValueError as exc:
        raise PKIError(f"the CA certificate is not a PEM certificate: {exc}") from None
    try:
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"the CA key is not an unencrypted PEM private key: {exc}") from None
    public_pem = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if ca_key.public_key().public_bytes(*public_pem) != ca_cert.public_key().public_bytes(*public_pem):
        raise PKIError("the CA key does not belong to the CA certificate")
    try:
        is_ca = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PKIError("the CA certificate is not a CA (BasicConstraints ca=True is missing)")
    return ca_cert, ca_key


def make_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    *,
    dns_names: Iterable[str] = ("localhost",),
    ip_addresses: Iterable[str] = ("127.0.0.1",),
    days: int = 365,
    client: bool = False,
) -> tuple[bytes, bytes]:
    """A leaf EC P-256 certificate signed by the CA, for serverAuth (or clientAuth when
    ``client``): (certificate PEM, private key PEM). Its lifetime never outlasts the CA's."""
    _check_days(days)
    ca_cert, ca_key = _load_ca(ca_cert_pem, ca_key_pem)
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    for ip in ip_addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ValueError(f"{ip!r} is not an IP address") from None
    if not sans and not client:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())  # type: ignore[attr-defined]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(ca_key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()
    cert = builder.sign(ca_key, algorithm)  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def save_identity_public_key(path: str | os.PathLike[str], private_raw: bytes) -> bytes:
    """Write the public half of an identity key as a PEM public key (0644): what an operator
    passes to ``secagg register --public-key-file``. Returns the 32 raw public key bytes.
    Rewriting it is harmless: it is derived from the identity key each time."""
    public = identity_public_key(private_raw)
    pem = ed25519.Ed25519PublicKey.from_public_bytes(public).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_file(Path(path), pem, 0o644)
    return public


def check_key_pair(cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str], *,
                   cert_label: str = "tls_cert", key_label: str = "tls_key") -> None:
    """Refuse a certificate and private key that cannot serve together, naming the setting:
    unreadable, not PEM, or a key whose public half is not the certificate's (what gRPC would
    otherwise report only as "Failed to bind")."""
    def read(path: str | os.PathLike[str], label: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise PKIError(f"cannot read {label} {path}: {exc.strerror or exc}") from None

    cert_pem, key_pem = read(cert_path, cert_label), read(key_path, key_label)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        hint = " (it holds a private key: swap the two?)" if b"PRIVATE KEY-----" in cert_pem else ""
        raise PKIError(f"{cert_label} {cert_path} is not a PEM certificate{hint}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise PKIError(f"{key_label} {key_path} is encrypted: give the server an unencrypted PEM private key") from None
    except (ValueError, UnsupportedAlgorithm):
        hint = " (it holds a certificate: swap the two?)" if b"CERTIFICATE-----" in key_pem else ""
        raise PKIError(f"{key_label} {key_path} is not a PEM private key{hint}") from None
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise PKIError(f"{key_label} {key_path} does not belong to {cert_label} {cert_path} (their public keys "
                       "differ): pass the private key made with that certificate")


def check_name(name: str) -> str:
    """Client names become file names, so keep them to a safe alphabet."""
    if not _NAME_RE.fullmatch(name):
        raise PKIError(f"invalid client name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -")
    if name in _RESERVED_NAMES:
        raise PKIError(f"client name {name!r} is reserved for the {name} files; pick another name")
    return name


def write_dev_pki(
    directory: str | os.PathLike[str],
    *,
    client_names: Iterable[str] = (),
    server_dns_names: Iterable[str] = ("localhost",),
    server_ip_addresses: Iterable[str] = ("127.0.0.1",),
    days: int = 365,
) -> DevPKI:
    """Write a development PKI: ca.pem/ca.key, server.pem/server.key, NAME.pem/NAME.key per client.

    An existing ca.pem + ca.key pair is reused, so adding a client later keeps every issued
    certificate valid. Key files are 0600, certificates 0644.
    """
    names = list(dict.fromkeys(check_name(n) for n in client_names))
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PKIError(f"cannot create {out}: {exc.strerror}") from None
    ca_cert_path, ca_key_path = out / "ca.pem", out / "ca.key"
    reused = ca_cert_path.is_file() and ca_key_path.is_file()
    if reused:
        ca_cert, ca_key = ca_cert_path.read_bytes(), ca_key_path.read_bytes()
        _load_ca(ca_cert, ca_key)  # fail early and clearly if the pair is broken
    else:
        ca_cert, ca_key = make_ca(days=days)
        _write_file(ca_key_path, ca_key, 0o600)
        _write_file(ca_cert_path, ca_cert, 0o644)

    server_cert, server_key = make_cert(
        ca_cert,
        ca_key,
        "secagg server",
        dns_names=tuple(server_dns_names),
        ip_addresses=tuple(server_ip_addresses),
        days=days,
    )
    _write_file(out / "server.key", server_key, 0o600)
    _write_file(out / "server.pem", server_cert, 0o644)

    clients: dict[str, CertPair] = {}
    for name in names:
        cert, key = make_cert(
            ca_cert, ca_key, name, dns_names=(name,), ip_addresses=(), days=days, client=True
        )
        pair = CertPair(cert=out / f"{name}.pem", key=out / f"{name}.key")
        _write_file(pair.key, key, 0o600)
        _write_file(pair.cert, cert, 0o644)
        clients[name] = pair
    return DevPKI(
        directory=out,
        ca_cert=ca_cert_path,
        ca_key=ca_key_path,
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        clients=clients,
        reused_ca=reused,
    )
