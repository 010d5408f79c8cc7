"""Logging for the commands: rich's handler (log lines print above progress bars instead of
breaking them) on a terminal when rich is installed, plain lines otherwise (pipes, log files,
the base install), or one JSON object per line.

``secagg serve --log-level info --log-format json`` gives lines such as
``{"time": "2026-12-02T16:01:02.345+00:00", "level": "INFO", "logger": "secagg.server.rounds",
"message": "..."}``: what a log collector ingests without parsing.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")

#: attributes every LogRecord has; anything else was passed with ``extra=`` and goes into the JSON
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", fmt: str = "text", *, console: Any = None) -> logging.Handler:
    """Route the root logger through one handler on stderr (or ``console``, a rich Console that
    also draws progress bars). Replaces handlers an earlier call installed; returns the handler."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif console is None and not sys.stderr.isatty():   # a pipe or a log file: whole lines, no wrapping
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        try:
            from rich.console import Console
            from rich.logging import RichHandler
        except ImportError:  # the base install has no rich: plain lines
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        else:
            handler = RichHandler(console=console or Console(stderr=True), show_path=False, markup=False,
                                  rich_tracebacks=False, log_time_format="%Y-%m-%d %H:%M:%S")
    handler._secagg = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_secagg", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    return handler
