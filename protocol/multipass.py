"""An in-memory multi-pass round over several groups: one key agreement per group, then P passes.

Pass p opens in every group with the same public value (the estimate after pass p - 1, computed
from every group's pass sum), so the passes of all groups proceed in lockstep, as over gRPC.
The studies and the tests run individual-level rules through this; ``secagg bench --passes``
measures it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import thresholds
from .driver import GroupDriver
from .encoding import EncodingParams
from .errors import AbortError
from .individual import PASS_EXTRA, IndividualRule, PassOutcome, combine_pass, pass_words
from .messages import GroupConfig, Mode, PassStart, Phase

__all__ = ["MultiPassRun", "multipass_config", "run_multipass"]


def multipass_config(members: int, dim: int, passes: int, params: EncodingParams, *, mode: Mode = Mode.SEMI_HONEST,
                     threshold: int | None = None, session: bytes | None = None) -> GroupConfig:
    """A group's configuration for a multi-pass round over updates of ``dim`` values."""
    t = thresholds.default(members, mode) if threshold is None else threshold
    return GroupConfig(session=os.urandom(16) if session is None else session, members=members, threshold=t,
                       dim=dim + PASS_EXTRA, modulus_bits=params.modulus_bits(members), mode=mode, passes=passes)


@dataclass
class MultiPassRun:
    outcomes: list[PassOutcome]                      # one per completed pass
    estimate: np.ndarray | None                      # the final aggregate (None: no pass completed)
    drivers: dict[int, GroupDriver]
    aborted: dict[int, str] = field(default_factory=dict)   # group -> why it stopped
    failure: str = ""                                 # why the round has no aggregate


Drops = Mapping[int, Mapping[int, Mapping[Phase, frozenset[int]]]]   # group -> pass -> phase -> who vanish


def run_multipass(
    rule: IndividualRule,
    updates: Sequence[Mapping[int, np.ndarray]],
    params: EncodingParams,
    *,
    mode: Mode = Mode.SEMI_HONEST,
    center: np.ndarray | None = None,
    drops: Drops | None = None,
    left: Mapping[int, Mapping[int, frozenset[int]]] | None = None,
    key_drops: Mapping[int, Mapping[Phase, frozenset[int]]] | None = None,
    input_for: Callable[[int, int, PassStart, int], np.ndarray] | None = None,
    identity_keys: Mapping[int, Mapping[int, bytes]] | None = None,
    randbytes: Callable[[int], bytes] = os.urandom,
) -> MultiPassRun:
    """Run ``rule`` over ``updates[g][index]`` (group g's members 1..m).  ``left[g][p]`` close
    their streams before pass p opens, ``drops[g][p][phase]`` vanish before that message,
    ``key_drops[g][phase]`` during the key agreement.  ``input_for(g, index, start, members)``
    replaces a client's honest input (an attacker bypassing the library); by default every
    client runs ``pass_words``.  A group that aborts or whose pass sum fails the checks takes no
    further part."""
    dim = next(iter(updates[0].values())).size
    drivers: dict[int, GroupDriver] = {}
    run = MultiPassRun([], None, drivers)
    for g, members in enumerate(updates):
        cfg = multipass_config(len(members), dim, rule.passes, params, mode=mode)
        keys = None
        if mode is Mode.ACTIVE:
            keys = (identity_keys or {}).get(g) or {i: randbytes(32) for i in members}
        drivers[g] = GroupDriver(cfg, identity_keys=keys, randbytes=randbytes)
        try:
            drivers[g].keys((key_drops or {}).get(g, {}))
        except AbortError as exc:
            run.aborted[g] = str(exc)

    def honest(g: int, i: int, start: PassStart) -> np.ndarray:
        m = drivers[g].config.members
        if input_for is not None:
            return input_for(g, i, start, m)
        return pass_words(rule, updates[g][i], start.public, params, m, rounding_seed=randbytes(32))

    public = rule.first_public(dim, center)
    for p in range(1, rule.passes + 1):
        sums = {}
        for g, d in drivers.items():
            if g in run.aborted:
                continue
            try:
                res = d.run_pass(public, lambda i, start, g=g: honest(g, i, start),
                                 left=frozenset((left or {}).get(g, {}).get(p, frozenset())),
                                 drops=(drops or {}).get(g, {}).get(p, {}))
            except AbortError as exc:
                run.aborted[g] = str(exc)
                continue
            sums[g] = (res.total, len(res.survivors))
        if not sums:
            run.failure = f"pass {p}: every group aborted"
            return run
        try:
            outcome = combine_pass(rule, p, public, sums, params)
        except ValueError as exc:
            run.failure = str(exc)
            return run
        for g, reasons in outcome.rejected.items():
            run.aborted[g] = f"pass {p} sum rejected: {'; '.join(reasons)}"
        run.outcomes.append(outcome)
        public = outcome.estimate
    run.estimate = public
    return run
