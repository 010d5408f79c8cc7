"""Entry point of the ``secagg`` console script.

Each sub-command lives in its own module exposing ``register(subparsers)``, which adds a
parser whose ``func`` default runs the command and returns the process exit code.

Exit codes (the same for every command; README.md lists them):

====  =======================================================================================
0     success
1     a check failed (``verify``: the ledger does not verify; ``simulate``/``bench``: an
      aggregate differs from the plaintext sum) or an internal error (a bug: traceback shown)
2     usage: a bad flag, setting or file; the message says which and what is allowed
3     connection: the server could not be reached (refused, certificate, name, timeout)
4     rejected: the server refused us, or our group's sum was rejected by its checks
5     round aborted or failed: no new model came out of the round
130   interrupted (Ctrl-C)
====  =======================================================================================
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable, Sequence

# module name -> imported lazily so that `secagg bench` does not pay for matplotlib, etc.
_COMMANDS = ("bench", "serve", "client", "simulate", "study", "admin", "certs", "ops")

EXIT_OK = 0
EXIT_FAILED = 1        # a check failed, or an internal error
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_REJECTED = 4
EXIT_ABORTED = 5
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


class CommandError(Exception):
    """A failure with its own exit code (connection 3, rejected 4, aborted 5); printed as one line."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _no_default(action: argparse.Action) -> bool:
    return action.default is None or action.default is False or action.default == argparse.SUPPRESS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: X)`` after each option's help, unless the help already says its default
    or there is no default to show (None, False, a required option)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_ = action.help or ""
        if "default" in help_.lower() or _no_default(action) or action.required:
            return help_
        if not action.option_strings:
            return help_
        return f"{help_} (default: %(default)s)" if help_ else "default: %(default)s"


def int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low``, refused with ``expected WHAT, got ...``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


def neighbors_arg(text: str) -> int:
    """``--neighbors``: an even SecAgg+ degree k >= 2, or 0 for the complete graph (``full`` is
    accepted as a synonym of 0). One spelling for every command."""
    value = text.strip().lower()
    if value in ("0", "full"):
        return 0
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an even number >= 2, or 0 for the complete graph; got {text!r}") from None
    if k < 2 or k % 2:
        raise argparse.ArgumentTypeError(f"expected an even number >= 2, or 0 for the complete graph; got {k}")
    return k


NEIGHBORS_HELP = "SecAgg+ neighbour count k (even); 0 = the complete graph"


def version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("secagg")
    except PackageNotFoundError:  # pragma: no cover - running from a checkout without installing
        return "unknown (not installed)"


#: module -> what it is for, of the optional ``sim`` extra
_SIM_MODULES = {"rich": "progress and tables", "sklearn": "the digits task", "matplotlib": "the study's plot"}


def require_sim_extra(command: str, modules: Sequence[str] = ("rich", "sklearn", "matplotlib")) -> None:
    """Refuse to start ``command`` when a module of the ``sim`` extra is missing, naming the extra."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(f"{name} ({_SIM_MODULES.get(name, 'needed')})")
    if missing:
        raise UsageError(f"`secagg {command}` needs the 'sim' extra, which is not installed (missing: "
                         f"{', '.join(missing)}); install it with `python -m pip install '.[sim]'` "
                         "in the secagg checkout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secagg",
        description="Secure aggregation for federated learning: the server learns only sums.",
        epilog="exit codes: 0 ok, 1 check failed or internal error, 2 usage, 3 connection, 4 rejected, "
               "5 round aborted, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"secagg {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"secagg.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("secagg.cli."):
                continue  # command not built yet
            raise
        module.register(sub)
    for p in sub.choices.values():
        if p.formatter_class is argparse.HelpFormatter:
            p.formatter_class = HelpFormatter
        for action in p._actions:  # an option without help would hide its default
            if action.help is None and action.option_strings and not _no_default(action):
                action.help = "default: %(default)s"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"secagg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"secagg {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: show it, but with the documented exit code
        traceback.print_exc()
        print(f"secagg {args.command}: internal error: {type(exc).__name__}: {exc} (please report it)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
