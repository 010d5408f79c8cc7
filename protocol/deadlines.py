"""Phase deadlines that grow with a round's work.

One fixed deadline cannot fit both a 10-client round of 1,000 words and a 1,000-client round of
10^6 words: 4 GB of masked input does not reach a server in 30 s below 1 Gbit/s.  A phase may
take ``base_seconds`` (meant for a small round) plus its work at floor rates the operator
sets: a per-member cost (one message in, its checks, one message out), a per-member-and-
neighbour cost (key agreements, shares, signatures), and for the masked input every member's
vector at a minimum ingest rate.  Pure arithmetic; the caller owns the clock (``ServerMachine``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .messages import GroupConfig, Phase


@dataclass(frozen=True)
class PhaseBudget:
    base_seconds: float = 30.0
    member_seconds: float = 0.01          # per member and phase
    pair_seconds: float = 0.001           # per member and neighbour, in the phases with pairwise work
    ingest_bytes_per_second: float = 16 << 20   # the slowest rate masked inputs are assumed to arrive at, all members together

    def __post_init__(self) -> None:
        if not self.base_seconds > 0:
            raise ValueError(f"base_seconds must be > 0, got {self.base_seconds}")
        if self.member_seconds < 0 or self.pair_seconds < 0 or self.ingest_bytes_per_second < 0:
            raise ValueError("member_seconds, pair_seconds and ingest_bytes_per_second must be >= 0")

    @classmethod
    def fixed(cls, seconds: float) -> PhaseBudget:
        """Every phase gets ``seconds``, whatever the round's size."""
        return cls(seconds, 0.0, 0.0, 0.0)

    def seconds(self, phase: Phase, *, members: int, degree: int, dim: int, word_bytes: int) -> float:
        """How long ``phase`` may take for a group of ``members`` with ``degree`` neighbours each
        and vectors of ``dim`` words of ``word_bytes``."""
        work = members * self.member_seconds
        if phase in (Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.CONSISTENCY_CHECK, Phase.UNMASKING):
            work += members * degree * self.pair_seconds
        if phase is Phase.MASKED_INPUT and self.ingest_bytes_per_second:
            work += members * dim * word_bytes / self.ingest_bytes_per_second
        return self.base_seconds + work

    def for_group(self, phase: Phase, config: GroupConfig) -> float:
        return self.seconds(phase, members=config.members, degree=config.degree, dim=config.dim,
                            word_bytes=config.dtype.itemsize)

    def longest(self, config: GroupConfig) -> float:
        """The longest phase of this group: what a client should be ready to wait for."""
        return max(self.for_group(p, config) for p in Phase)
