"""``secagg certs``: a development PKI and client identity keys in one command.

TLS is always on, so trying secagg locally needs a CA, a localhost server certificate and,
per client, a client certificate plus an Ed25519 identity key to register. Identity keys are
never overwritten: replacing one would silently invalidate the client's registration.
"""

from __future__ import annotations

import argparse
import os

from secagg.cli.main import UsageError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the certs sub-command."""
    p = subparsers.add_parser(
        "certs",
        help="write a development CA, server certificate and client keys",
        description="Write a development PKI into DIR: ca.pem/ca.key, server.pem/server.key "
        "(localhost, 127.0.0.1) and, per --client NAME, NAME.pem/NAME.key (TLS client "
        "certificate), NAME.identity (Ed25519 identity key, stays with the client) and NAME.pub "
        "(its public key, for `secagg register --public-key-file`). An existing CA in DIR is "
        "reused; existing identity keys are kept.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    p.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="also make a client certificate and identity key (repeatable)",
    )
    p.add_argument("--days", type=int, default=365, help="certificate lifetime (default 365)")
    p.set_defaults(func=cmd_certs)


def cmd_certs(args: argparse.Namespace) -> int:
    """Write the PKI and identity keys, then say what was written."""
    from secagg.server.tls import (
        PKIError,
        check_name,
        identity_public_key,
        load_identity_key,
        new_identity_key,
        save_identity_key,
        save_identity_public_key,
        write_dev_pki,
    )

    if args.days < 1:
        raise UsageError(f"--days must be at least 1, got {args.days}")
    try:
        names = [check_name(name) for name in args.client]
        pki = write_dev_pki(args.out, client_names=names, days=args.days)
    except PKIError as exc:
        raise UsageError(str(exc)) from None

    lines: list[tuple[str, str, str]] = []
    if pki.reused_ca:
        lines.append(("kept", str(pki.ca_cert), "existing CA certificate"))
        lines.append(("kept", str(pki.ca_key), "existing CA private key"))
    else:
        lines.append(("wrote", str(pki.ca_cert), "CA certificate: trust it on clients"))
        lines.append(("wrote", str(pki.ca_key), "CA private key (0600)"))
    lines.append(("wrote", str(pki.server_cert), "server certificate for localhost, 127.0.0.1"))
    lines.append(("wrote", str(pki.server_key), "server private key (0600)"))

    registrations: list[str] = []
    for name, pair in pki.clients.items():
        lines.append(("wrote", str(pair.cert), f"TLS client certificate for {name}"))
        lines.append(("wrote", str(pair.key), f"TLS client key for {name} (0600)"))
        identity_path = os.path.join(pki.directory, f"{name}.identity")
        try:
            if os.path.exists(identity_path):
                private = load_identity_key(identity_path)
                lines.append(("kept", identity_path, f"existing identity key for {name}"))
            else:
                private = new_identity_key()
                save_identity_key(identity_path, private)
                lines.append(("wrote", identity_path, f"identity key for {name} (0600)"))
        except PKIError as exc:
            raise UsageError(f"{exc}; move it away to make a new one") from None
        public_path = os.path.join(pki.directory, f"{name}.pub")
        try:
            save_identity_public_key(public_path, private)
        except OSError as exc:
            raise UsageError(f"cannot write {public_path}: {exc.strerror or exc}") from None
        lines.append(("wrote", public_path, f"identity public key for {name}: give it to the operator"))
        registrations.append(
            f"  secagg register --db DB --client-id {name} --public-key-file {public_path}"
            f"    # public key {identity_public_key(private).hex()}"
        )

    width = max(len(path) for _, path, _ in lines)
    for verb, path, what in lines:
        print(f"{verb:<5}  {path.ljust(width)}  {what}")
    if registrations:
        print("register the identities with the server's database:")
        for line in registrations:
            print(line)
    return 0
