"""``secagg client``: take part in one round from the command line with a .npy update."""

from __future__ import annotations

import argparse
from pathlib import Path

from .main import EXIT_ABORTED, EXIT_CONNECTION, EXIT_REJECTED, CommandError, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="take part in one round with an update vector",
                       description="Connect to a secagg server, take part in the next round with the update "
                                   "from --update (a .npy file) and print the outcome.")
    p.add_argument("--server", required=True, help="host:port")
    p.add_argument("--ca", required=True, help="CA certificate (PEM) that signed the server's certificate")
    p.add_argument("--client-id", required=True)
    p.add_argument("--key", required=True, help="identity key file (from `secagg certs --client NAME`)")
    p.add_argument("--update", type=Path, required=True,
                   help=".npy vector to submit; its length must be the server's dim (`secagg status` or the serve line)")
    p.add_argument("--cert", help="client certificate for mutual TLS")
    p.add_argument("--cert-key", help="client certificate key for mutual TLS")
    p.add_argument("--server-name", help="TLS name to expect (default: the host in --server)")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for a round (default: 300)")
    p.add_argument("--save-model", type=Path, help="write the new model to this .npy file")
    g = p.add_argument_group("security policy (defaults refuse anything weaker; relax one setting at a time)")
    g.add_argument("--allow-semi-honest", action="store_true", help="take part in semi-honest rounds (trusted server only)")
    g.add_argument("--min-group-size", type=int, help="privacy floor: fewest members / share-holding survivors (default 5)")
    g.add_argument("--min-neighbors", type=int, help="SecAgg+ degree floor (default: the recommended degree for the group size)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from secagg.client import Client, ClientError, ClientPolicy
    from secagg.client.errors import ConnectionFailed, CredentialsError, Rejected, RoundAborted, RoundFailed
    from secagg.wire.identity import PKIError

    try:
        policy = ClientPolicy.semi_honest() if args.allow_semi_honest else ClientPolicy()
        changes = {k: v for k, v in (("min_group_size", args.min_group_size), ("min_neighbors", args.min_neighbors)) if v is not None}
        try:
            policy = policy.replace(**changes)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        client = Client(args.server, ca_cert=args.ca, identity_key=args.key, client_id=args.client_id, policy=policy,
                        client_cert=args.cert, client_key=args.cert_key, server_name=args.server_name, wait_seconds=args.wait)
        try:
            update = np.load(args.update, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot load --update {args.update}: {exc}") from None
        out = client.participate(update, fetch_model=args.save_model is not None)
    except ConnectionFailed as exc:
        raise CommandError(str(exc), EXIT_CONNECTION) from None
    except Rejected as exc:
        raise CommandError(str(exc), EXIT_REJECTED) from None
    except (RoundAborted, RoundFailed) as exc:
        raise CommandError(str(exc), EXIT_ABORTED) from None
    except (CredentialsError, PKIError) as exc:
        raise UsageError(str(exc)) from None
    except ClientError as exc:   # anything else the library refused locally (a wrong-length update...)
        raise UsageError(str(exc)) from None
    print(f"{out.round_id}: {out.outcome}{' (' + out.reason + ')' if out.reason else ''}; model v{out.model_version}; "
          f"group {'accepted' if out.group_accepted else 'rejected'}; aggregate {out.aggregate_digest[:16]}")
    if args.save_model is not None and out.model is not None:
        np.save(args.save_model, out.model)
    if out.outcome == "completed":
        return 0 if out.group_accepted else EXIT_REJECTED   # the round went on without our group's sum
    return EXIT_REJECTED if out.outcome == "failed" and not out.group_accepted else EXIT_ABORTED
