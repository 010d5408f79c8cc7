"""Who masks with whom: the complete graph, or SecAgg+'s sparse k-regular Harary graph.

The SecAgg+ graph (Bell et al., CCS 2020) places the m members on a ring and links each to its
k/2 nearest on either side, so every member has k neighbours.  Privacy then holds per
neighbourhood, so the ring must be one the server cannot steer: each member's position is a
hash of the group configuration and of that member's own fresh contribution, committed to
before the configuration was fixed and opened only with its keys.  The server learns a
position only when it can no longer change the others; its one remaining choice is, per
member, whether that member's keys (and so its opened contribution) are forwarded, which
moves the member to a second, equally random position (the hash of its commitment).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from .messages import GroupConfig


def complete(m: int) -> dict[int, frozenset[int]]:
    everyone = frozenset(range(1, m + 1))
    return {u: everyone - {u} for u in everyone}


def commit_contribution(contribution: bytes) -> bytes:
    """SHA-256 commitment a client sends in its hello, before any seat or graph exists."""
    if len(contribution) != 32:
        raise ValueError("a contribution is 32 random bytes")
    return hashlib.sha256(b"secagg/v1|contribution|" + contribution).digest()


def commit_contribution_or_none(contribution: bytes) -> bytes | None:
    """The commitment, or None for a value that is not a contribution (the server's check)."""
    return commit_contribution(contribution) if len(contribution) == 32 else None


def ring_order(config: GroupConfig, opened: Mapping[int, bytes]) -> list[int]:
    """Members 1..m in ring order: by H(config digest | seat | opened contribution or commitment).

    ``opened`` maps a seat to its contribution (checked against its commitment by the caller);
    seats without one are placed by their commitment.
    """
    if len(config.commitments) != config.members:
        raise ValueError("a SecAgg+ ring needs every member's commitment")
    digest = config.digest

    def key(seat: int) -> bytes:
        value = opened.get(seat) or config.commitments[seat - 1]
        return hashlib.sha256(b"secagg/v1|ring|" + digest + seat.to_bytes(4, "big") + value).digest()

    return sorted(range(1, config.members + 1), key=key)


def harary(order: Sequence[int], k: int) -> dict[int, frozenset[int]]:
    """k-regular graph over the ring ``order``: links to the k/2 nearest members on each side.

    k must be even and >= 2; k >= len(order) - 1 gives the complete graph.
    """
    m = len(order)
    if k >= m - 1:
        return complete(m)
    if k < 2 or k % 2:
        raise ValueError(f"neighbour count k must be even and >= 2, got {k}")
    ring = np.asarray(order, dtype=np.int64)
    half = k // 2
    offsets = np.concatenate([np.arange(1, half + 1), -np.arange(1, half + 1)])
    links = ring[(np.arange(m)[:, None] + offsets[None, :]) % m]   # row p: neighbours of ring[p]
    return {int(u): frozenset(links[p].tolist()) for p, u in enumerate(ring)}


def neighbourhood(order: Sequence[int], k: int, u: int) -> frozenset[int]:
    """u's k neighbours on the ring, without building the whole graph (what a client needs)."""
    m = len(order)
    if k >= m - 1:
        return frozenset(range(1, m + 1)) - {u}
    p = list(order).index(u)
    half = k // 2
    return frozenset(int(order[(p + d) % m]) for d in (*range(1, half + 1), *range(-half, 0)))


def recommended_degree(m: int) -> int:
    """An even k = O(log m) that keeps the graph connected with high probability (Bell et al.)."""
    k = 2 * int(np.ceil(np.log2(max(m, 2)) * 1.5))
    return min(k, m - 1 if (m - 1) % 2 == 0 else m - 2) if m > 3 else m - 1


def for_group(config: GroupConfig, opened: Mapping[int, bytes] | None = None) -> dict[int, frozenset[int]]:
    """The group's graph: complete, or the SecAgg+ ring from the members' contributions."""
    if config.members < 2:
        raise ValueError("a group needs at least 2 members")
    if not config.sparse:
        return complete(config.members)
    return harary(ring_order(config, opened or {}), config.degree)
