"""The server's certificate, read over a verified TLS connection of our own and then pinned.

gRPC does not expose the peer certificate to a client, so the library opens one verified TLS
connection (same CA, same name, same client certificate), reads the certificate it is served,
and then opens its gRPC channel trusting *only that certificate*.  Hellos and reads are signed
over its hash, and the channel they travel on is guaranteed to present it: a hostile front
that routed the probe to another deployment would fail the channel's handshake, so it can
never obtain a hello bound to someone else's certificate.
"""

from __future__ import annotations

import os
import socket
import ssl
import tempfile

from .errors import ConnectionFailed


def split_address(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``dns:///host:port`` -> (host, port)."""
    target = address.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConnectionFailed(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def fetch_server_certificate(address: str, ca_pem: bytes, server_name: str | None, client_cert: bytes | None,
                             client_key: bytes | None, timeout: float) -> bytes:
    """The DER certificate the server at ``address`` presents, verified against ``ca_pem``.

    Failures say their cause; ``ConnectionFailed.retryable`` is False where retrying cannot help
    (a certificate our CA does not verify, a name that does not resolve, a missing client certificate).
    """
    host, port = split_address(address)
    try:
        ctx = ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace"))
    except ssl.SSLError:
        raise ConnectionFailed("the CA certificate is not a PEM certificate; pass the CA that signed the server's certificate",
                               retryable=False) from None
    ctx.set_alpn_protocols(["h2"])
    if client_cert and client_key:
        with tempfile.TemporaryDirectory() as d:   # ssl loads a chain only from files
            cert_path, key_path = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
            for path, data in ((cert_path, client_cert), (key_path, client_key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            try:
                ctx.load_cert_chain(cert_path, key_path)
            except ssl.SSLError:
                raise ConnectionFailed("the client certificate and key do not load or do not match", retryable=False) from None
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=server_name or host) as tls:
            der = tls.getpeercert(binary_form=True)
            if _closed_after_handshake(tls, min(timeout, 1.0)):
                if client_cert:
                    raise ConnectionFailed(f"the server at {address} closed the connection after the TLS handshake: "
                                           "it does not accept our client certificate (signed by its client CA?)", retryable=False)
                raise ConnectionFailed(f"the server at {address} requires a client certificate (mutual TLS); "
                                       "pass client_cert and client_key", retryable=False)
    except ssl.SSLCertVerificationError as exc:
        raise ConnectionFailed(f"the server at {address} presents a certificate our CA does not verify "
                               f"({exc.verify_message}); check ca_cert and server_name", retryable=False) from None
    except socket.gaierror:
        raise ConnectionFailed(f"cannot resolve host {host!r}; check the address", retryable=False) from None
    except ConnectionRefusedError:
        raise ConnectionFailed(f"connection refused by {host}:{port}; is the server running on that port?") from None
    except TimeoutError:
        raise ConnectionFailed(f"no answer from {host}:{port} within {timeout:g} s") from None
    except ssl.SSLError as exc:
        if "CERTIFICATE_REQUIRED" in str(exc).upper() or "HANDSHAKE_FAILURE" in str(exc).upper():
            raise ConnectionFailed(f"the server at {address} requires a client certificate (mutual TLS); "
                                   "pass client_cert and client_key", retryable=False) from None
        raise ConnectionFailed(f"TLS with {address} failed: {exc.reason or exc}", retryable=False) from None
    except OSError as exc:
        raise ConnectionFailed(f"cannot connect to {address}: {exc.strerror or exc}") from None
    if not der:
        raise ConnectionFailed(f"the server at {address} presented no certificate", retryable=False)
    return der


def pem(der: bytes) -> bytes:
    """PEM of one DER certificate: the only trust anchor of the pinned gRPC channel."""
    return ssl.DER_cert_to_PEM_cert(der).encode("ascii")


def _closed_after_handshake(tls: ssl.SSLSocket, timeout: float) -> bool:
    """TLS 1.3 finishes the client's handshake before the server checks our certificate, so a
    refusal shows only on the first read: send the HTTP/2 preface and read once (a server that
    accepted us answers with its SETTINGS frame; one that refused us closes the connection)."""
    tls.settimeout(timeout)
    try:
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        return tls.recv(1) == b""
    except (TimeoutError, BlockingIOError):
        return False
    except (ssl.SSLError, ConnectionResetError):
        return True
