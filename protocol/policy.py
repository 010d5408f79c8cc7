"""The client's own security policy: what a round configuration must satisfy before any key exists.

A hostile server chooses every field of a ``GroupConfig``; the only settings that protect a
client are the ones it enforces itself.  ``ClientPolicy.check`` refuses a configuration weaker
than the policy, naming the setting and both values, before the client generates a key, builds
a graph or allocates a vector.  The defaults are what an app gets without asking: active mode,
the active-mode threshold floor, SecAgg+ no sparser than the recommended degree, a privacy
floor of 5, and bounds on members and dimension.  Relaxing one is explicit::

    policy = ClientPolicy(min_group_size=3)            # one setting
    policy = ClientPolicy.semi_honest()                 # opt in to semi-honest rounds
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass

from . import graph, thresholds
from .errors import AbortError
from .messages import GroupConfig, Mode


class PolicyViolation(AbortError):
    """The server offered a configuration weaker than the client's policy."""

    def __init__(self, setting: str, offered: object, required: str) -> None:
        super().__init__(f"round refused by this client's policy: {setting} is {offered}, policy requires {required}")
        self.setting, self.offered, self.required = setting, offered, required


@dataclass(frozen=True)
class ClientPolicy:
    allow_semi_honest: bool = False      # semi-honest rounds are broken by any server deviation
    threshold_floor: Mode = Mode.ACTIVE  # t must be at least thresholds.minimum(holders, this mode)
    min_neighbors: int | None = None     # SecAgg+ degree floor; None: graph.recommended_degree(members)
    min_group_size: int = 5              # privacy floor: members, and survivors that hold our shares
    max_members: int = 10_000            # refuse (and allocate nothing for) larger groups
    max_dim: int = 1 << 25               # encoded words the client will mask
    min_chunk_words: int = 1024          # refuse a server that asks for tinier masked-input chunks (a message per word)
    allow_regrouping: bool = False       # accept reshuffled groups, or a group that changes inside an epoch
    max_passes: int = 10                 # multi-pass rounds: each pass reveals one more sum of our input

    def __post_init__(self) -> None:
        if self.min_group_size < 2:
            raise ValueError("min_group_size must be at least 2: a sum of one is the update itself")
        if self.min_neighbors is not None and self.min_neighbors < 2:
            raise ValueError("min_neighbors must be at least 2 (or None for the recommended degree)")
        if self.max_members < self.min_group_size or self.max_dim < 1 or self.min_chunk_words < 1:
            raise ValueError("max_members must be >= min_group_size, max_dim and min_chunk_words positive")
        if self.max_passes < 1:
            raise ValueError("max_passes must be at least 1")

    @classmethod
    def semi_honest(cls, **changes: object) -> ClientPolicy:
        """Opt in to semi-honest rounds (trusted server): their threshold floor is t > n/2."""
        return cls(allow_semi_honest=True, threshold_floor=Mode.SEMI_HONEST, **changes)  # type: ignore[arg-type]

    @classmethod
    def lenient(cls) -> ClientPolicy:
        """For simulations against an honest in-memory server only; never for apps."""
        return cls(allow_semi_honest=True, threshold_floor=Mode.SEMI_HONEST, min_neighbors=2, min_group_size=2, min_chunk_words=1,
                   allow_regrouping=True)

    def replace(self, **changes: object) -> ClientPolicy:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def degree_floor(self, members: int) -> int:
        return graph.recommended_degree(members) if self.min_neighbors is None else min(self.min_neighbors, members - 1)

    def check_chunking(self, chunk_words: int) -> None:
        """The transport's chunk size is the server's choice too; a tiny one costs a message per word."""
        if chunk_words < self.min_chunk_words:
            raise PolicyViolation("chunk_words", chunk_words, f"at least {self.min_chunk_words} (min_chunk_words)")

    def check_grouping(self, grouping: str, epoch: int, members: Collection[str], remembered: Collection[str] | None) -> None:
        """Groups fixed per epoch are what stop least squares over many rounds' group sums from
        recovering our update: refuse reshuffled groups, and a group whose members differ from the
        ones we had earlier in the same epoch (``remembered``), unless ``allow_regrouping``."""
        if self.allow_regrouping:
            return
        if grouping != "stable":
            raise PolicyViolation("grouping", grouping or "unstated",
                                  "stable groups per epoch (allow_regrouping=True accepts reshuffled groups)")
        if remembered is not None and set(members) != set(remembered):
            joined, left = sorted(set(members) - set(remembered)), sorted(set(remembered) - set(members))
            raise PolicyViolation("grouping", f"changed inside epoch {epoch} ({len(joined)} member(s) new, {len(left)} gone)",
                                  f"the members this client had earlier in epoch {epoch} (allow_regrouping=True accepts a change)")

    def check(self, config: GroupConfig, *, pinned: bool = False) -> None:
        """Raise PolicyViolation unless ``config`` is at least as strong as this policy."""
        m = config.members
        if m > self.max_members:
            raise PolicyViolation("members", m, f"at most {self.max_members} (max_members)")
        if config.dim > self.max_dim:
            raise PolicyViolation("dim", config.dim, f"at most {self.max_dim} words (max_dim)")
        if config.passes > self.max_passes:
            raise PolicyViolation("passes", config.passes, f"at most {self.max_passes} (max_passes): each pass reveals another sum")
        if config.mode is Mode.SEMI_HONEST:
            if pinned:
                raise PolicyViolation("mode", "semi-honest", "active: pinned identities are only checked in active mode")
            if not self.allow_semi_honest:
                raise PolicyViolation("mode", "semi-honest", "active (opt in with ClientPolicy.semi_honest())")
        if m < self.min_group_size:
            raise PolicyViolation("members", m, f"at least {self.min_group_size} (min_group_size)")
        if config.sparse and config.degree < self.degree_floor(m):
            raise PolicyViolation("neighbors", config.degree,
                                  f"at least {self.degree_floor(m)} for {m} members, or the complete graph (min_neighbors)")
        holders = config.degree + 1
        if holders < self.min_group_size:   # the floor counts survivors holding our shares: never reachable
            raise PolicyViolation("neighbors", config.degree, f"at least {self.min_group_size - 1}, so that "
                                  f"{self.min_group_size} members hold our shares (min_group_size)")
        floor_mode = Mode.ACTIVE if Mode.ACTIVE in (self.threshold_floor, config.mode) else Mode.SEMI_HONEST
        t_min = thresholds.minimum(holders, floor_mode)
        if not t_min <= config.threshold <= holders:
            raise PolicyViolation("threshold", config.threshold,
                                  f"{t_min}..{holders} for {holders} share holders ({floor_mode.value} floor)")
        if len(config.commitments) != m:
            raise PolicyViolation("commitments", len(config.commitments), f"one per member ({m}): no fresh contributions, no round")
