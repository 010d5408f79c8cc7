"""The server's certificate as our own TLS connection sees it, for binding hellos and reads.

gRPC does not expose the peer certificate to a client, so the library opens one verified TLS
connection of its own (same CA, same name, same client certificate) and hashes the
certificate it is served.  A server that relays our hello to another deployment cannot make
that hash match the other deployment's certificate.
"""

from __future__ import annotations

import os
import socket
import ssl
import tempfile

from secagg.wire.identity import certificate_binding

from .errors import ConnectionFailed


def split_address(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``dns:///host:port`` -> (host, port)."""
    target = address.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConnectionFailed(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def fetch_server_binding(address: str, ca_pem: bytes, server_name: str | None, client_cert: bytes | None,
                         client_key: bytes | None, timeout: float) -> bytes:
    """SHA-256 of the DER certificate the server at ``address`` presents, verified against ``ca_pem``."""
    host, port = split_address(address)
    ctx = ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace"))
    ctx.set_alpn_protocols(["h2"])
    if client_cert and client_key:
        with tempfile.TemporaryDirectory() as d:   # ssl loads a chain only from files
            cert_path, key_path = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
            for path, data in ((cert_path, client_cert), (key_path, client_key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            ctx.load_cert_chain(cert_path, key_path)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=server_name or host) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        raise ConnectionFailed(f"the server at {address} presents a certificate our CA does not verify: {exc.verify_message}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionFailed(f"cannot open a TLS connection to {address}: {exc}") from None
    if not der:
        raise ConnectionFailed(f"the server at {address} presented no certificate")
    return certificate_binding(der)
