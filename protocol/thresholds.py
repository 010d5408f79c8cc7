"""Safe thresholds: how many shares a secret needs so the server cannot cheat.

A secret of client u is shared among its holders: its neighbours and itself (n = degree + 1).
Semi-honest security needs t > n/2 (two disjoint sets of t could otherwise reveal both kinds of
share); against an active server Bonawitz et al. require t > 2n/3.
"""

from __future__ import annotations

from .messages import Mode


def minimum(holders: int, mode: Mode) -> int:
    """The smallest threshold an honest client accepts for ``holders`` share holders."""
    return (2 * holders) // 3 + 1 if mode is Mode.ACTIVE else holders // 2 + 1


def default(holders: int, mode: Mode) -> int:
    return min(minimum(holders, mode), holders)
