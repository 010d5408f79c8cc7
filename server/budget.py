"""The server's privacy account: what each round charges, the running epsilon, the budget.

Epsilon is never tracked by hand: at start the accountant is rebuilt from the releases recorded
in the round records (``settings["privacy"]["release"]``), and each new round's release is
charged and recorded in its record before the round starts.  Two totals are kept:

* ``epsilon`` - against the server itself, which knows every round's cohort: sampling does not
  amplify anything for it, so each round is charged as if every client took part.  The budget
  (``epsilon_budget``) applies to this one.
* ``epsilon_released`` - for the released models seen by anyone who does not know the cohorts:
  charged with the plan's sampling rate (amplification by Poisson sampling).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

from secagg.protocol.accounting import Accountant, RoundRelease
from secagg.protocol.messages import GroupConfig
from secagg.protocol.plan import RoundPlan

from .config import ServerConfig
from .store import Store

log = logging.getLogger("secagg.server")


class Privacy:
    """The accountant over this server's recorded rounds (only when DP noise is configured)."""

    def __init__(self, cfg: ServerConfig, store: Store) -> None:
        self.cfg = cfg
        self.server = Accountant()      # against the server: unamplified
        self.released = Accountant()    # against observers of the released models: amplified by sampling
        self.rounds = 0
        for rec in reversed(store.rounds(limit=1_000_000)):
            charged = (rec.settings.get("privacy") or {}).get("release")
            if charged and rec.cohort:   # a round that started (refused or empty rounds released nothing)
                self._charge(RoundRelease.from_dict(charged))
        if self.rounds:
            log.info("privacy account rebuilt from %d recorded rounds: epsilon %.4g (released models %.4g) at delta %g",
                     self.rounds, self.epsilon, self.epsilon_released, cfg.delta)

    @property
    def epsilon(self) -> float:
        return self.server.epsilon(self.cfg.delta)

    @property
    def epsilon_released(self) -> float:
        return self.released.epsilon(self.cfg.delta)

    def release(self, plan: RoundPlan, honest_clients: int) -> RoundRelease:
        """What the round releases: the configured mechanism and noise, the plan's sampling rate,
        one client's L2 sensitivity in integer units (B * scale plus the rounding's sqrt(d) slack)."""
        cfg, enc = self.cfg, self.cfg.encoding
        return RoundRelease(mechanism=cfg.dp_mechanism, noise_multiplier=cfg.noise_multiplier, sampling_rate=plan.accounting_rate,
                            l2_sensitivity=cfg.clip_norm * enc.scale + math.sqrt(cfg.dim), honest_clients=max(1, honest_clients),
                            dim=cfg.dim)

    def refusal(self, plan: RoundPlan, honest_clients: int) -> str | None:
        """Why the round must not start (its charge would exceed the budget), or None."""
        budget = self.cfg.epsilon_budget
        if not budget or not plan.groups:
            return None
        unamplified = dataclasses.replace(self.release(plan, honest_clients), sampling_rate=1.0)
        if not self.server.would_exceed(unamplified.event(), budget, self.cfg.delta):
            return None
        after = Accountant([*self.server.events, unamplified.event()]).epsilon(self.cfg.delta)
        return (f"privacy budget exhausted: round {plan.round_number} would take epsilon from {self.epsilon:.4g} to {after:.4g}, "
                f"over the budget of {budget:g} at delta {self.cfg.delta:g}; no more rounds on this database "
                "(raise --epsilon-budget only if the privacy policy allows it)")

    def _charge(self, release: RoundRelease) -> None:
        self.server.charge(dataclasses.replace(release, sampling_rate=1.0).event())
        self.released.charge(release.event())
        self.rounds += 1

    def charge(self, plan: RoundPlan, configs: Sequence[GroupConfig]) -> dict[str, Any]:
        """Charge the round and return what its record stores."""
        release = self.release(plan, min(c.threshold for c in configs))
        alone = dataclasses.replace(release, sampling_rate=1.0)
        self._charge(release)
        return {**self.summary(), "release": release.as_dict(), "mechanism": release.mechanism,
                "noise_multiplier": release.noise_multiplier, "clip_norm": self.cfg.clip_norm, "bits": [c.modulus_bits for c in configs],
                "sampling_rate": release.sampling_rate, "honest_clients": release.honest_clients, "assumed_colluders": 0,
                "epsilon_round": Accountant([alone.event()]).epsilon(self.cfg.delta),
                "epsilon_round_released": Accountant([release.event()]).epsilon(self.cfg.delta)}

    def summary(self) -> dict[str, Any]:
        """The running totals (every record carries them, refused rounds included)."""
        return {"epsilon": self.epsilon, "epsilon_released": self.epsilon_released, "delta": self.cfg.delta,
                "epsilon_budget": self.cfg.epsilon_budget or None, "rounds_charged": self.rounds}
