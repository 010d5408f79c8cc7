"""Who masks with whom: the complete graph, or SecAgg+'s sparse k-regular Harary graph.

The SecAgg+ graph (Bell et al., CCS 2020) places the m members on a ring and links each to its
k/2 nearest on either side, so every member has k neighbours.  Privacy then holds per
neighbourhood, so the ring must be one the server cannot steer.  Every member commits to 32
fresh random bytes (its contribution) in its hello, before any configuration exists, and
opens them with its keys; the ring is a permutation drawn from a beacon, the hash of all
opened contributions, and the configuration digest.  Until the honest members open theirs,
nobody can predict any position; afterwards the server's only lever is which members' keys it
forwards (each choice it withholds is a recorded dropout and re-draws the whole ring), not
where anyone sits.  A member whose keys were not forwarded still has a position, so the graph
is over all m members as in the paper, and it counts as dropped.
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
    """Members 1..m in ring order, drawn from H(all opened contributions) and the config digest.

    ``opened`` maps a seat to its contribution (checked against its commitment by the caller);
    seats without one contribute 32 zero bytes to the beacon.
    """
    if len(config.commitments) != config.members:
        raise ValueError("a SecAgg+ ring needs every member's commitment")
    beacon = hashlib.sha256(b"secagg/v1|ring-beacon|" + config.digest)
    for seat in range(1, config.members + 1):
        beacon.update(opened.get(seat) or bytes(32))
    seed = beacon.digest()

    def key(seat: int) -> bytes:
        return hashlib.sha256(b"secagg/v1|ring|" + seed + seat.to_bytes(4, "big")).digest()

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
    if k < 2 or k % 2:
        raise ValueError(f"neighbour count k must be even and >= 2, got {k}")
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
