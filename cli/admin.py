"""Operator commands over the store: ``secagg rounds``, ``rollback``, ``verify``, ``register``, ``models``.

They work on the SQLite file directly (WAL lets them run beside a live server), so an operator
can inspect rounds, register clients or roll the model back without an admin RPC. The store is
imported lazily so that other sub-commands do not pay for numpy at parse time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secagg.cli.jsonout import add_json_option, write_json
from secagg.cli.main import UsageError, int_at_least

if TYPE_CHECKING:
    from secagg.server.store import RoundRecord, Store


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the rounds, rollback, verify, register and models sub-commands."""
    p = subparsers.add_parser(
        "rounds",
        help="list round records, or show one in full",
        description="List recent round records (newest first), or show one with --show.",
    )
    _add_db(p)
    p.add_argument("--limit", type=_positive_int, default=50, help="how many rounds (default 50)")
    p.add_argument("--show", metavar="ROUND_ID", help="show this round's full record")
    add_json_option(p, "the records")
    p.set_defaults(func=cmd_rounds)

    p = subparsers.add_parser(
        "rollback",
        help="append a model version restoring an older one",
        description="Append a new model version whose parameters are a copy of version V. "
        "History is never rewritten.",
    )
    _add_db(p)
    p.add_argument("--to", type=_positive_int, required=True, metavar="V", help="version to restore")
    p.add_argument("--reason", required=True, help="why (kept in the record)")
    _add_key(p, "the server's ledger key (PEM private key); the new version is signed into the ledger")
    p.set_defaults(func=cmd_rollback)

    p = subparsers.add_parser(
        "verify",
        help="check the tamper-evident ledger of model versions and rounds",
        description="Verify the signed hash chain over model versions and finished rounds with the "
        "ledger key file (private or public PEM; never read from the database). Exit 0 when it "
        "verifies, 1 naming the first bad entry.",
    )
    _add_db(p)
    _add_key(p, "the ledger key: the server's private key file or its public key (PEM)")
    p.add_argument(
        "--expect-head",
        metavar="HEX",
        help="an entry hash recorded earlier (a previous run's head): it must still be in the chain, "
        "which is how a deleted tail is noticed",
    )
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser(
        "register",
        help="register a client's Ed25519 identity key",
        description="Register a client identity: no registration, no vote. Creates the "
        "database if it does not exist yet.",
    )
    _add_db(p)
    p.add_argument("--client-id", required=True, metavar="ID", help="1-64 of A-Z a-z 0-9 . _ -")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--public-key-file",
        metavar="PATH",
        help="Ed25519 public key: 32 raw bytes, 64 hex characters or PEM",
    )
    source.add_argument(
        "--key", metavar="PATH", help="the client's identity key file (NAME.identity from `secagg certs`)"
    )
    p.add_argument(
        "--replace", action="store_true", help="replace a different key, or reinstate a revoked id"
    )
    p.set_defaults(func=cmd_register)

    p = subparsers.add_parser(
        "models", help="list model versions", description="List model versions, oldest first."
    )
    _add_db(p)
    add_json_option(p, "the records")
    p.set_defaults(func=cmd_models)


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, metavar="PATH", help="the server's SQLite database")


def _add_key(parser: argparse.ArgumentParser, help_: str) -> None:
    parser.add_argument("--key", metavar="PATH", help=f"{help_} (default: DB.ledger-key)")


def _key_path(args: argparse.Namespace) -> str:
    from secagg.server.ledger import default_key_path

    return args.key or default_key_path(args.db)


_positive_int = int_at_least(1, "a positive integer")


def _open(db: str, *, must_exist: bool = True, ledger_key: str | None = None) -> Store:
    """Open the store, turning a missing file or a store failure into a one-line usage error.

    ``ledger_key``: path of the signing key, for commands whose writes are chained into the ledger.
    """
    from secagg.server.ledger import LedgerKeyError, load_private_key
    from secagg.server.store import Store, StoreError

    if must_exist and not Path(db).is_file():
        raise UsageError(f"no database at {db}; start a server with `secagg serve --db {db}` first")
    key = None
    if ledger_key is not None:
        try:
            key = load_private_key(ledger_key)
        except LedgerKeyError as exc:
            raise UsageError(f"{exc}; pass --key with the server's ledger_key file") from None
    try:
        return Store(db, ledger_key=key)
    except StoreError as exc:
        raise UsageError(str(exc)) from None


def _short_time(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso


def _dash(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """An aligned table: rich on a terminal when installed, plain text otherwise (pipes, lean installs)."""
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(*headers)
            for row in rows:
                table.add_row(*row)
            Console().print(table)
            return
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for line in (headers, *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip())


def _survivors_summary(record: RoundRecord) -> str:
    """Survivors of the last recorded phase over the cohort size, e.g. ``8/10``."""
    if not record.survivors:
        return f"-/{len(record.cohort)}"
    last_phase = list(record.survivors.values())[-1]
    count = sum(len(ids) for ids in last_phase.values())
    return f"{count}/{len(record.cohort)}"


def cmd_rounds(args: argparse.Namespace) -> int:
    """List rounds, or show one."""
    from secagg.server.store import StoreError

    with _open(args.db) as store:
        try:
            if args.show is not None:
                record = store.round(args.show)
                if args.json:
                    write_json(args.json, record.to_dict())
                else:
                    _print_record(record.to_dict())
                return 0
            records = store.rounds(limit=args.limit)
        except StoreError as exc:
            raise UsageError(f"{exc}; `secagg rounds --db {args.db}` lists the rounds") from None
    if args.json:
        write_json(args.json, [r.to_dict() for r in records])
        return 0
    if not records:
        print(f"no rounds recorded in {args.db} yet")
        return 0
    _print_table(
        ("ROUND", "STARTED", "OUTCOME", "GROUPS", "SURVIVORS", "MODEL", "PLAN", "EPSILON"),
        [
            (
                r.round_id,
                _short_time(r.started_at),
                r.outcome,
                str(len(r.groups)),
                _survivors_summary(r),
                _dash(r.model_version),
                _plan_summary(r.settings.get("plan")),
                _privacy_summary(r.settings.get("privacy")),
            )
            for r in records
        ],
    )
    return 0


def _plan_summary(plan: Any) -> str:
    """'4/e0/stable/q=0.5/1out': round number, epoch, grouping, sampling, groups that sat out; '-' without a plan."""
    if not isinstance(plan, dict):
        return "-"
    parts = [str(plan.get("round_number")), f"e{plan.get('epoch')}", str(plan.get("grouping"))]
    if plan.get("sampling") == "poisson":
        parts.append(f"q={plan.get('sample_rate'):g}")
    elif plan.get("sampling") == "fixed":
        parts.append(f"n={plan.get('sample_size')}")
    if plan.get("sat_out"):
        parts.append(f"{len(plan['sat_out'])}out")
    return "/".join(parts)


def _privacy_summary(privacy: Any) -> str:
    """'2.3(+1.6)@1e-06': the cumulative epsilon against the server, this round's, the delta; '-' without DP."""
    if not isinstance(privacy, dict):
        return "-"
    this = f"(+{privacy['epsilon_round']:.3g})" if "epsilon_round" in privacy else ""
    return f"{privacy['epsilon']:.3g}{this}@{privacy['delta']:g}"


def _print_record(fields: dict[str, Any]) -> None:
    """``name  value`` lines; containers as one-line JSON when short, indented JSON when long."""
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        if isinstance(value, (dict, list)) and value:
            compact = json.dumps(value)
            if len(compact) <= 80:
                print(f"{name.ljust(width)}  {compact}")
                continue
            print(f"{name}:")
            for line in json.dumps(value, indent=2).splitlines():
                print(f"  {line}")
        elif isinstance(value, (dict, list)):
            print(f"{name.ljust(width)}  -")
        else:
            print(f"{name.ljust(width)}  {_dash(value)}")


def cmd_rollback(args: argparse.Namespace) -> int:
    """Append a version restoring --to."""
    from secagg.server.store import StoreError

    with _open(args.db, ledger_key=_key_path(args)) as store:
        try:
            version = store.rollback(args.to, args.reason)
            digest = store.models()[-1].digest
        except StoreError as exc:
            raise UsageError(str(exc)) from None
    print(f"appended model version {version} (restores version {args.to}, digest {digest[:12]})")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """Register a client identity from a public key file or a private identity key file."""
    from secagg.server.store import StoreError
    from secagg.server.tls import PKIError, identity_public_key, load_identity_key, load_identity_public_key

    try:
        if args.key is not None:
            public_key = identity_public_key(load_identity_key(args.key))
        else:
            public_key = load_identity_public_key(args.public_key_file)
    except PKIError as exc:
        raise UsageError(str(exc)) from None
    with _open(args.db, must_exist=False) as store:
        try:
            store.register_identity(args.client_id, public_key, replace=args.replace)
        except StoreError as exc:
            raise UsageError(str(exc)) from None
    print(f"registered {args.client_id} (Ed25519 public key {public_key.hex()}) in {args.db}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List model versions."""
    with _open(args.db) as store:
        infos = store.models()
    if args.json:
        import dataclasses

        write_json(args.json, [dataclasses.asdict(info) for info in infos])
        return 0
    if not infos:
        print(f"no model versions in {args.db} yet")
        return 0
    _print_table(
        ("VERSION", "CREATED", "DIGEST", "SHAPE", "RESTORES", "ROUND", "REASON"),
        [
            (
                str(i.version),
                _short_time(i.created_at),
                i.digest[:12],
                f"{i.dtype}{list(i.shape)}",
                _dash(i.restores),
                _dash(i.round_id),
                i.reason,
            )
            for i in infos
        ],
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify the ledger: exit 0 with counts and the head hash, or 1 with the first bad entry."""
    from secagg.server.ledger import LedgerError, LedgerKeyError, load_public_key, verify_ledger
    from secagg.server.store import StoreError

    key_path = _key_path(args)
    try:
        public_key = load_public_key(key_path)
    except LedgerKeyError as exc:
        raise UsageError(f"{exc}; pass --key with the server's ledger_key file (or its public key)") from None
    if args.expect_head is not None and not _is_hash(args.expect_head):
        raise UsageError(f"--expect-head must be 64 hex characters (an entry hash), got {args.expect_head!r}")
    with _open(args.db) as store:
        try:
            summary = verify_ledger(store, public_key, expect_head=args.expect_head)
        except StoreError as exc:
            raise UsageError(str(exc)) from None
        except LedgerError as exc:
            print(f"secagg verify: error: {exc}", file=sys.stderr)   # one line, like every CLI error
            return 1
    adopted = f", {summary.adoptions} adoption" if summary.adoptions else ""
    print(f"ledger OK: {summary.entries} entries ({summary.models} models, {summary.rounds} rounds{adopted}), "
          f"head {summary.head}")
    return 0


def _is_hash(text: str) -> bool:
    try:
        return len(text.strip()) == 64 and len(bytes.fromhex(text.strip())) == 32
    except ValueError:
        return False
