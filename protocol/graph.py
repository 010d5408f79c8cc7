"""Who masks with whom: the complete graph, or SecAgg+'s sparse k-regular Harary graph.

The SecAgg+ graph (Bell et al., CCS 2020) places the m members on a ring in an order drawn
from the round's graph seed and links each to its k/2 nearest on either side, so every
member has k neighbours and the server cannot choose the graph after seeing keys.
"""

from __future__ import annotations

import numpy as np

from . import prg


def complete(m: int) -> dict[int, frozenset[int]]:
    everyone = frozenset(range(1, m + 1))
    return {u: everyone - {u} for u in everyone}


def harary(m: int, k: int, seed: bytes) -> dict[int, frozenset[int]]:
    """k-regular graph on 1..m: a seed-permuted ring with links to k/2 neighbours each side.

    k must be even and < m; k >= m - 1 gives the complete graph.
    """
    if k >= m - 1:
        return complete(m)
    if k < 2 or k % 2:
        raise ValueError(f"neighbour count k must be even and >= 2, got {k}")
    order = np.argsort(prg.expand(seed, m, np.uint64), kind="stable") + 1  # a random ring order
    pos = np.empty(m + 1, dtype=np.int64)
    pos[order] = np.arange(m)
    half = k // 2
    out = {}
    for u in range(1, m + 1):
        p = pos[u]
        offsets = np.concatenate([np.arange(1, half + 1), -np.arange(1, half + 1)])
        out[u] = frozenset(int(v) for v in order[(p + offsets) % m])
    return out


def recommended_degree(m: int) -> int:
    """An even k = O(log m) that keeps the graph connected with high probability (Bell et al.)."""
    k = 2 * int(np.ceil(np.log2(max(m, 2)) * 1.5))
    return min(k, m - 1 if (m - 1) % 2 == 0 else m - 2) if m > 3 else m - 1


def build(m: int, neighbors: int | None, seed: bytes) -> dict[int, frozenset[int]]:
    """``neighbors`` None means the complete graph."""
    if m < 2:
        raise ValueError("a group needs at least 2 members")
    return complete(m) if neighbors is None else harary(m, neighbors, seed)
