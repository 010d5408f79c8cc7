"""Entry point of the ``secagg`` console script.

Each sub-command lives in its own module exposing ``register(subparsers)``, which adds a
parser whose ``func`` default runs the command and returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# module name -> imported lazily so that `secagg bench` does not pay for matplotlib, etc.
_COMMANDS = ("bench", "serve", "client", "simulate", "study", "admin", "certs", "ops")


class UsageError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secagg",
        description="Secure aggregation for federated learning: the server learns only sums.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"secagg.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("secagg.cli."):
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"secagg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
