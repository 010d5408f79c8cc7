"""Dev PKI and identity keys: real certificates, real TLS handshakes over loopback."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from secagg.server.tls import (
    DevPKI,
    PKIError,
    identity_public_key,
    load_identity_key,
    load_identity_public_key,
    make_ca,
    make_cert,
    new_identity_key,
    save_identity_key,
    write_dev_pki,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return write_dev_pki(tmp_path_factory.mktemp("pki"), client_names=["alice", "bob"])


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_signs_leaf_and_extensions_are_right() -> None:
    ca_pem, ca_key_pem = make_ca("test CA", days=10)
    cert_pem, key_pem = make_cert(ca_pem, ca_key_pem, "srv", dns_names=("localhost", "example.test"))
    ca = x509.load_pem_x509_certificate(ca_pem)
    leaf = x509.load_pem_x509_certificate(cert_pem)

    # signature, checked by hand with the CA public key and by cryptography's helper
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    public.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
    leaf.verify_directly_issued_by(ca)
    assert leaf.issuer == ca.subject

    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "example.test"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc  # never outlives the CA
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")

    client_pem, _ = make_cert(ca_pem, ca_key_pem, "alice", dns_names=(), ip_addresses=(), client=True)
    client = x509.load_pem_x509_certificate(client_pem)
    client.verify_directly_issued_by(ca)
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]


def test_make_cert_rejects_bad_input() -> None:
    ca_pem, ca_key_pem = make_ca()
    other_pem, other_key = make_ca()
    with pytest.raises(PKIError, match="does not belong"):
        make_cert(ca_pem, other_key, "x")
    with pytest.raises(ValueError, match="not an IP address"):
        make_cert(ca_pem, ca_key_pem, "x", ip_addresses=("localhost",))
    with pytest.raises(ValueError, match="at least one DNS name"):
        make_cert(ca_pem, ca_key_pem, "x", dns_names=(), ip_addresses=())
    with pytest.raises(ValueError, match="positive number of days"):
        make_ca(days=0)
    leaf_pem, leaf_key = make_cert(ca_pem, ca_key_pem, "leaf")
    with pytest.raises(PKIError, match="not a CA"):
        make_cert(leaf_pem, leaf_key, "x")


def test_write_dev_pki_files_and_modes(pki: DevPKI) -> None:
    names = sorted(p.name for p in pki.directory.iterdir())
    assert names == sorted(
        ["ca.pem", "ca.key", "server.pem", "server.key", "alice.pem", "alice.key", "bob.pem", "bob.key"]
    )
    for key in (pki.ca_key, pki.server_key, pki.clients["alice"].key, pki.clients["bob"].key):
        assert _mode(key) == 0o600
    assert _mode(pki.ca_cert) == 0o644
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    for cert in (pki.server_cert, pki.clients["alice"].cert):
        x509.load_pem_x509_certificate(cert.read_bytes()).verify_directly_issued_by(ca)
    assert not pki.reused_ca


def test_write_dev_pki_reuses_existing_ca(tmp_path: Path) -> None:
    first = write_dev_pki(tmp_path)
    ca_before = first.ca_cert.read_bytes()
    second = write_dev_pki(tmp_path, client_names=["carol"])
    assert second.reused_ca and second.ca_cert.read_bytes() == ca_before
    ca = x509.load_pem_x509_certificate(ca_before)
    x509.load_pem_x509_certificate(second.clients["carol"].cert.read_bytes()).verify_directly_issued_by(ca)
    with pytest.raises(PKIError, match="reserved"):
        write_dev_pki(tmp_path, client_names=["server"])
    with pytest.raises(PKIError, match="invalid client name"):
        write_dev_pki(tmp_path, client_names=["../evil"])


def _server_context(pki: DevPKI, *, require_client: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki.ca_cert)
    return ctx


def _client_context(ca_file: Path, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + hostname check by default
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(ca_file)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> tuple[bytes, str | None]:
    """Serve one TLS echo on a loopback port; return what came back and the peer CN seen."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert()
                seen["peer"] = peer
                tls.sendall(tls.recv(100))
        except (ssl.SSLError, OSError) as exc:
            seen["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                tls.sendall(b"hello secagg")
                data = tls.recv(100)
    finally:
        thread.join(5)
        listener.close()
    peer = seen.get("peer")
    cn = None
    if peer:
        cn = dict(x[0] for x in peer["subject"])["commonName"]  # type: ignore[index]
    return data, cn


def test_tls_handshake_with_mutual_auth(pki: DevPKI) -> None:
    alice = pki.clients["alice"]
    data, cn = _handshake(
        _server_context(pki, require_client=True),
        _client_context(pki.ca_cert, (alice.cert, alice.key)),
        "localhost",
    )
    assert data == b"hello secagg" and cn == "alice"


def test_tls_handshake_by_ip_address(pki: DevPKI) -> None:
    data, _ = _handshake(_server_context(pki, require_client=False), _client_context(pki.ca_cert), "127.0.0.1")
    assert data == b"hello secagg"


def test_tls_refuses_wrong_ca_and_wrong_host(pki: DevPKI, tmp_path: Path) -> None:
    other = write_dev_pki(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(_server_context(pki, require_client=False), _client_context(other.ca_cert), "localhost")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(_server_context(pki, require_client=False), _client_context(pki.ca_cert), "example.com")


def test_identity_keys_round_trip(tmp_path: Path) -> None:
    private = new_identity_key()
    assert len(private) == 32
    public = identity_public_key(private)
    assert len(public) == 32
    ed25519.Ed25519PublicKey.from_public_bytes(public).verify(
        ed25519.Ed25519PrivateKey.from_private_bytes(private).sign(b"m"), b"m"
    )
    path = tmp_path / "alice.identity"
    save_identity_key(path, private)
    assert _mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert load_identity_key(path) == private
    assert new_identity_key() != private


def test_identity_key_errors(tmp_path: Path, pki: DevPKI) -> None:
    with pytest.raises(PKIError, match="no identity key at .*secagg certs"):
        load_identity_key(tmp_path / "missing.identity")
    junk = tmp_path / "junk"
    junk.write_text("not a key")
    with pytest.raises(PKIError, match="not an identity key"):
        load_identity_key(junk)
    with pytest.raises(PKIError, match="not an Ed25519 identity key"):
        load_identity_key(pki.server_key)  # an EC TLS key is not an identity key
    with pytest.raises(ValueError, match="32 raw bytes"):
        identity_public_key(b"short")


def test_load_identity_public_key_formats(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    private = new_identity_key()
    public = identity_public_key(private)
    raw = tmp_path / "raw.pub"
    raw.write_bytes(public)
    hexed = tmp_path / "hex.pub"
    hexed.write_text(public.hex() + "\n")
    pem = tmp_path / "pem.pub"
    pem.write_bytes(
        ed25519.Ed25519PublicKey.from_public_bytes(public).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for path in (raw, hexed, pem):
        assert load_identity_public_key(path) == public
    priv = tmp_path / "a.identity"
    save_identity_key(priv, private)
    with pytest.raises(PKIError, match="private key; pass it with --key"):
        load_identity_public_key(priv)
    with pytest.raises(PKIError, match="no public key at"):
        load_identity_public_key(tmp_path / "none")
