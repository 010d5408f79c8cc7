"""Byzantine clients' model-poisoning attacks on update vectors, for the simulator's studies.

A Byzantine client trains (or not) like everyone else and then replaces its update by
``craft_update(...)``.  Omniscient attacks (ALIE, IPM, sybil) may look at the honest updates of
the round, which is the strongest threat model the robust rules are meant to withstand.  The
result goes through the normal client path afterwards (norm bounding, encoding, masking): an
attacker that respects the bounds is exactly one that cannot bypass that path.

Randomness comes from an explicit ``np.random.Generator``: it is simulation, not cryptography.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = [
    "ATTACKS",
    "DATA_POISONING",
    "NEEDS_BENIGN",
    "AttackConfig",
    "alie_z_max",
    "craft_update",
    "is_data_poisoning",
    "needs_benign",
    "normalize_attack_name",
]

ATTACKS = ("none", "scaling", "sign_flip", "gaussian", "alie", "ipm", "backdoor", "label_flip", "sybil")
DATA_POISONING = frozenset({"backdoor", "label_flip"})  # the harm is done in local training
NEEDS_BENIGN = frozenset({"alie", "ipm", "sybil"})      # omniscient: read the honest updates
MIN_BENIGN = 2  # a coordinate-wise std (ALIE) needs two samples; same floor for all omniscient attacks


def normalize_attack_name(name: str) -> str:
    """``sign-flip``, ``Sign_Flip`` and ``sign_flip`` name the same attack: the canonical form
    uses underscores and lower case (as in ATTACKS)."""
    return name.strip().lower().replace("-", "_") if isinstance(name, str) else name


def _check_name(name: str) -> str:
    name = normalize_attack_name(name)
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    return name


@dataclass(frozen=True)
class AttackConfig:
    """Which attack a Byzantine client runs and its knobs (unused knobs are ignored)."""

    name: str = "none"
    scale: float = 10.0          # scaling (model replacement) and sybil: boost factor
    noise_std: float = 1.0       # gaussian
    alie_z: float | None = None  # ALIE: if None, z_max from n and f as in Baruch et al. 2019
    ipm_epsilon: float = 0.5     # IPM: -epsilon * mean of benign updates (Xie et al. 2020)
    backdoor_target: int = 0
    backdoor_fraction: float = 0.5
    boost: float = 1.0           # multiplies the update of data-poisoning attacks

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", _check_name(self.name))  # frozen: store the canonical spelling
        for field in ("scale", "noise_std", "ipm_epsilon", "backdoor_fraction", "boost"):
            if not math.isfinite(getattr(self, field)):
                raise ValueError(f"AttackConfig.{field} must be finite, got {getattr(self, field)}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if self.ipm_epsilon <= 0:
            raise ValueError(f"ipm_epsilon must be > 0 (the attack sends -epsilon * benign mean), got {self.ipm_epsilon}")
        if self.alie_z is not None and not math.isfinite(self.alie_z):
            raise ValueError(f"alie_z must be finite or None (to derive it from n and f), got {self.alie_z}")
        if not 0.0 <= self.backdoor_fraction <= 1.0:
            raise ValueError(f"backdoor_fraction must be in [0, 1], got {self.backdoor_fraction}")
        if int(self.backdoor_target) != self.backdoor_target or self.backdoor_target < 0:
            raise ValueError(f"backdoor_target must be a non-negative class label, got {self.backdoor_target!r}")


def is_data_poisoning(name: str) -> bool:
    """True when the attack changes local data (backdoor, label_flip): train on it, then craft."""
    return _check_name(name) in DATA_POISONING


def needs_benign(name: str) -> bool:
    """True when the attack reads the honest updates (ALIE, IPM, sybil)."""
    return _check_name(name) in NEEDS_BENIGN


def alie_z_max(n: int, f: int) -> float:
    """Baruch et al. 2019 ("A Little Is Enough"): s = floor(n/2 + 1) - f, z = Phi^-1((n - s) / n).

    s is how many honest inputs the attacker must win over for a majority; z is then the largest
    shift (in benign standard deviations) that still looks closer to the crowd than they are.
    """
    if not (isinstance(n, (int, np.integer)) and isinstance(f, (int, np.integer))):
        raise ValueError(f"n and f must be integers, got {n!r}, {f!r}")
    if n < 1 or not 0 <= f <= n:
        raise ValueError(f"need n >= 1 and 0 <= f <= n, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0.0 < p < 1.0:
        raise ValueError(
            f"ALIE's z_max is undefined for n={n}, f={f} (Phi^-1 of {p}); "
            "use n >= 3 with f < floor(n/2) + 1, or set AttackConfig.alie_z explicitly"
        )
    return NormalDist().inv_cdf(p)


def craft_update(
    cfg: AttackConfig,
    own_update: np.ndarray,
    benign_updates: np.ndarray,
    rng: np.random.Generator,
    *,
    n_total: int,
    n_byzantine: int,
) -> np.ndarray:
    """The vector a Byzantine client submits in place of ``own_update``; float64, shape (d,).

    ``own_update`` is what the client got from local training (on poisoned data for the
    data-poisoning attacks); ``benign_updates`` (k, d) are the honest updates it may observe
    (k may be 0 for attacks that do not read them); ``n_total`` and ``n_byzantine`` are the n
    and f of the aggregation being attacked (ALIE derives its z from them).

    - none:       own_update unchanged.
    - scaling:    scale * own_update (model replacement, Bagdasaryan et al. 2020).
    - sign_flip:  -own_update, not boosted (combine with a robust rule's view, not with scale).
    - gaussian:   a fresh N(0, noise_std^2) vector, independent of training.
    - alie:       mean(benign) - z * std(benign) per coordinate (population std, ddof=0).
    - ipm:        -ipm_epsilon * mean(benign) (inner-product manipulation, Xie et al. 2020).
    - backdoor, label_flip: boost * own_update; the attack itself is in the training data.
    - sybil:      -scale * mean(benign).  Every identity the attacker controls sends this same
                  vector: it depends only on what they all share (the benign observation and
                  the config), never on own_update or rng, so the sybils collude exactly and
                  form the tight cluster that fools distance-based rules such as Krum.
    """
    _check_name(cfg.name)
    own = np.asarray(own_update, dtype=np.float64)
    if own.ndim != 1:
        raise ValueError(f"own_update must be a 1-D vector, got shape {own.shape}")
    d = own.shape[0]
    benign = np.asarray(benign_updates, dtype=np.float64)
    if benign.size == 0:
        benign = benign.reshape(0, d)
    if benign.ndim != 2 or benign.shape[1] != d:
        raise ValueError(f"benign_updates must have shape (k, {d}) like own_update, got {benign.shape}")
    if not isinstance(n_total, (int, np.integer)) or not isinstance(n_byzantine, (int, np.integer)):
        raise ValueError(f"n_total and n_byzantine must be integers, got {n_total!r}, {n_byzantine!r}")
    if n_total < 1 or not 0 <= n_byzantine <= n_total:
        raise ValueError(f"need n_total >= 1 and 0 <= n_byzantine <= n_total, got {n_total}, {n_byzantine}")
    if cfg.name in NEEDS_BENIGN and benign.shape[0] < MIN_BENIGN:
        raise ValueError(
            f"attack {cfg.name!r} needs at least {MIN_BENIGN} benign updates to observe, got {benign.shape[0]}; "
            "pass the round's honest updates"
        )

    name = cfg.name
    if name == "none":
        return own.copy()
    if name == "scaling":
        return cfg.scale * own
    if name == "sign_flip":
        return -own
    if name == "gaussian":
        return rng.normal(0.0, cfg.noise_std, size=d)
    if name in DATA_POISONING:
        return cfg.boost * own
    mean = benign.mean(axis=0)
    if name == "alie":
        z = alie_z_max(int(n_total), int(n_byzantine)) if cfg.alie_z is None else float(cfg.alie_z)
        return mean - z * benign.std(axis=0)
    if name == "ipm":
        return -cfg.ipm_epsilon * mean
    if name == "sybil":
        return -cfg.scale * mean
    raise AssertionError(f"unhandled attack {name!r}")  # pragma: no cover - ATTACKS covers all
