"""One meaning of ``--json`` across commands: ``--json PATH`` writes the JSON there, ``--json -``
(or a bare ``--json``) prints it on standard output, in place of the human-readable output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .main import UsageError


def add_json_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help=f"write {what} as JSON to PATH ('-' or no PATH: standard output, instead of the table)")


def to_stdout(target: str | None) -> bool:
    return target == "-"


def write_json(target: str, value: Any) -> None:
    text = json.dumps(value, indent=2, default=str)
    if target == "-":
        print(text)
        return
    try:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write --json {target}: {exc.strerror}") from None
