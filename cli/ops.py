"""``secagg status`` (ask a running server) and ``secagg events`` (the events table of a database).

``events`` reads the SQLite file directly, like ``secagg rounds``: it works beside a running
server (which holds the database's lock; readers do not need it). ``status`` asks the server
over gRPC with a signed ``GetStatus``, as a registered client would.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .jsonout import add_json_option, write_json
from .main import EXIT_CONNECTION, EXIT_REJECTED, CommandError, UsageError, int_at_least


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="ask a running server what it is doing",
                       description="Ask a running server for its status over gRPC (TLS): the model version, the "
                                   "round and phase in progress, the clients waiting and the update length. The "
                                   "request is signed with a registered client's identity key unless the server "
                                   "allows public reads.")
    p.add_argument("--server", required=True, help="host:port")
    p.add_argument("--ca", required=True, help="CA certificate (PEM) that signed the server's certificate")
    p.add_argument("--client-id", help="a registered client id to sign the request with (with --key)")
    p.add_argument("--key", help="that client's identity key file (NAME.identity from `secagg certs`)")
    p.add_argument("--cert", help="client certificate for mutual TLS")
    p.add_argument("--cert-key", help="client certificate key for mutual TLS")
    p.add_argument("--server-name", help="TLS name to expect (default: the host in --server)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server (default: 10)")
    add_json_option(p, "the status")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("events", help="list recorded rejections and drops",
                       description="List the events table: every rejected stream or message and every dropped "
                                   "client, with the gRPC status sent and the reason, oldest first. Works while "
                                   "a server runs.")
    p.add_argument("--db", required=True, metavar="PATH", help="the server's SQLite database")
    p.add_argument("--round", metavar="ROUND_ID", help="only this round's events")
    p.add_argument("--client", metavar="ID", help="only this client's events")
    p.add_argument("--kind", help="only this kind (rejected, dropped, suppressed, ...)")
    p.add_argument("--limit", type=_count, default=100, help="show the newest N matching events, 0 for all (default: 100)")
    add_json_option(p, "the events")
    p.set_defaults(func=cmd_events)


_count = int_at_least(0, "a whole number >= 0")


def cmd_status(args: argparse.Namespace) -> int:
    from secagg.client import Client, ClientError
    from secagg.client.errors import ConnectionFailed, Rejected
    from secagg.wire.identity import PKIError, new_identity_key

    if (args.client_id is None) != (args.key is None):
        raise UsageError("pass --client-id and --key together (a registered client signs the request), or neither "
                         "for a server with public reads")
    anonymous = args.key is None
    try:
        client = Client(args.server, ca_cert=args.ca, identity_key=new_identity_key() if anonymous else args.key,
                        client_id=args.client_id or "status", client_cert=args.cert, client_key=args.cert_key,
                        server_name=args.server_name, connect_timeout=args.timeout, retries=0)
        reply = client.status()
    except ConnectionFailed as exc:
        raise CommandError(str(exc), EXIT_CONNECTION) from None
    except Rejected as exc:
        hint = "; pass --client-id and --key of a registered client" if anonymous and exc.code == "UNAUTHENTICATED" else ""
        raise CommandError(f"{exc}{hint}", EXIT_REJECTED) from None
    except (ClientError, PKIError) as exc:
        raise UsageError(str(exc)) from None
    status: dict[str, Any] = {"server": args.server}
    for f in reply.DESCRIPTOR.fields:   # every field, numbers as numbers (not protobuf JSON's strings for 64-bit)
        value = getattr(reply, f.name)
        status[f.name] = value if isinstance(value, (str, int, float)) else value.hex() if isinstance(value, bytes) else str(value)
    if args.json:
        write_json(args.json, status)
        return 0
    width = max(len(k) for k in status)
    for key, value in status.items():
        print(f"{key.ljust(width)}  {'-' if value in ('', None) else value}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    import dataclasses

    from .admin import _open, _print_table, _short_time

    with _open(args.db) as store:
        events = store.events(args.round, client_id=args.client, kind=args.kind)
    total = len(events)
    if args.limit:
        events = events[-args.limit:]
    if args.json:
        write_json(args.json, [dataclasses.asdict(e) for e in events])
        return 0
    if not events:
        filters = [f"{name} {value}" for name, value in (("round", args.round), ("client", args.client), ("kind", args.kind)) if value]
        print(f"no events recorded in {args.db}{' for ' + ', '.join(filters) if filters else ''}")
        return 0
    _print_table(("ID", "AT", "ROUND", "CLIENT", "KIND", "STATUS", "REASON"),
                 [(str(e.id), _short_time(e.at), e.round_id or "-", e.client_id or "-", e.kind, e.status, e.reason)
                  for e in events])
    if len(events) < total:
        print(f"(the newest {len(events)} of {total} events; --limit 0 shows all)", file=sys.stderr)
    return 0
