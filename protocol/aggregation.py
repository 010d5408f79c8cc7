"""From revealed group sums to one model update: decode, check, robust rule.

Pure: both the gRPC server and the in-memory studies call ``combine_groups`` so a round gives
the same decision whichever way its sums were computed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .checks import SumBounds, check_group_sum
from .encoding import EncodingParams, decode
from .robust import aggregate


@dataclass(frozen=True)
class GroupVerdict:
    group: int
    contributors: int
    accepted: bool
    reasons: tuple[str, ...]
    metrics: dict[str, float] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        return {"group": self.group, "contributors": self.contributors, "accepted": self.accepted,
                "reasons": list(self.reasons), "metrics": self.metrics}


@dataclass(frozen=True)
class RoundDecision:
    verdicts: tuple[GroupVerdict, ...]
    update: np.ndarray | None          # None: nothing accepted, or the rule could not run
    rule: str
    selected_groups: tuple[int, ...]   # group numbers that influenced the update
    rule_info: dict[str, Any]
    failure: str = ""                  # why there is no update

    def as_record(self) -> dict[str, Any]:
        return {"rule": self.rule, "selected_groups": list(self.selected_groups), "info": self.rule_info,
                "accepted_groups": [v.group for v in self.verdicts if v.accepted], "failure": self.failure}


def bounds_of(params: EncodingParams) -> SumBounds:
    return SumBounds(clip_norm=params.clip_norm, clip_value=params.coord_bound, scale=params.scale, sqnorm_scale=params.sqnorm_scale)


def sums_digest(sums: Mapping[int, np.ndarray]) -> str:
    """SHA-256 over the raw group sums (little-endian words) in group order: the record's fingerprint."""
    h = hashlib.sha256()
    for g in sorted(sums):
        h.update(g.to_bytes(4, "big"))
        h.update(sums[g].astype(sums[g].dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def combine_groups(
    sums: Mapping[int, tuple[np.ndarray, int]],
    params: EncodingParams,
    *,
    rule: str = "mean",
    f: int | Callable[[list[int]], int] = 0,
    rule_params: Mapping[str, Any] | None = None,
) -> RoundDecision:
    """``sums`` maps group number -> (unmasked word sum, contributors).  Checks every group,
    then runs ``rule`` over the accepted group means (weighted by contributors where the rule
    uses weights).  ``f`` may depend on which groups were accepted (a simulator knows which
    hold attackers): pass a callable taking the accepted group numbers."""
    bounds = bounds_of(params)
    verdicts, means, weights, groups = [], [], [], []
    for g in sorted(sums):
        words, n = sums[g]
        dec = decode(words, params)
        res = check_group_sum(dec.total, dec.count, dec.sqnorm_total, n, bounds)
        verdicts.append(GroupVerdict(g, n, res.accepted, res.reasons, {k: float(v) for k, v in res.metrics.items()}))
        if res.accepted:
            mean = dec.total   # in place: the decoded sum is not used again (one float D-vector per group, not two)
            mean /= n
            means.append(mean)
            weights.append(n)
            groups.append(g)
        del dec
    if not means:
        return RoundDecision(tuple(verdicts), None, rule, (), {}, failure="no group passed the aggregate checks")
    f_value = f(groups) if callable(f) else f
    try:
        points = means[0][np.newaxis] if len(means) == 1 else np.stack(means)   # one group: a view, not a copy
        out = aggregate(rule, points, f=min(f_value, len(means) - 1), weights=np.asarray(weights, dtype=float), **dict(rule_params or {}))
    except ValueError as exc:
        return RoundDecision(tuple(verdicts), None, rule, (), {}, failure=f"rule {rule} cannot run on {len(means)} accepted groups: {exc}")
    info = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in out.info.items()}
    return RoundDecision(tuple(verdicts), out.vector, rule, tuple(groups[i] for i in out.selected), info)
