"""``--ray [ADDRESS]``, one option for ``secagg study`` and ``secagg simulate``: a local Ray, or a cluster.

Ray is the optional extra ``secagg[ray]``: without it the option stops the command before any
work with a one-line usage error (exit 2) naming the extra; an unreachable cluster is a
connection error (exit 3).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from .main import EXIT_CONNECTION, CommandError, UsageError

LOCAL = "local"


def add_ray_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
                   help=f"{what} on Ray: alone (or 'local'), a Ray started on this machine for this command; with ADDRESS, "
                        "the running cluster there (HOST:6379 as printed by `ray start --head`, auto, or ray://HOST:10001). "
                        "Needs the extra secagg[ray]")


def ray_address(value: str) -> str | None:
    """The ``--ray`` value as ``ray_session`` takes it: None for a local Ray."""
    return None if value == LOCAL else value


def where(value: str, cpus: int) -> str:
    return f"a local Ray ({cpus} CPUs)" if ray_address(value) is None else f"the Ray cluster at {value}"


def check_ray() -> None:
    """Fail fast, before any work, when Ray is missing or too old."""
    from secagg.simulation.ray_backend import RayUnavailable, require_ray

    try:
        require_ray()
    except RayUnavailable as exc:
        raise UsageError(str(exc)) from None


@contextmanager
def ray_for(value: str, *, num_cpus: int) -> Iterator[ModuleType]:
    """Ray for the length of the block (``ray_session``), its failures mapped to the CLI's exit codes."""
    from secagg.simulation.ray_backend import RayUnavailable, RayUnreachable, ray_session

    try:
        with ray_session(ray_address(value), num_cpus=num_cpus) as ray:
            yield ray
    except RayUnreachable as exc:
        raise CommandError(str(exc), EXIT_CONNECTION) from None
    except RayUnavailable as exc:
        raise UsageError(str(exc)) from None
