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
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = [
    "ATTACKS",
    "DATA_POISONING",
    "GROUP_LEVEL",
    "NEEDS_BENIGN",
    "AttackConfig",
    "alie_z_max",
    "alie_vector",
    "craft_update",
    "fang_krum_lambda_bound",
    "fang_krum_vectors",
    "fang_trim_vectors",
    "group_targets",
    "min_max_vector",
    "min_sum_vector",
    "is_data_poisoning",
    "needs_benign",
    "normalize_attack_name",
]

ATTACKS = ("none", "scaling", "sign_flip", "gaussian", "alie", "ipm", "backdoor", "label_flip", "sybil",
           "model_replacement", "takeover", "fang_krum", "fang_trim", "min_max", "min_sum")
DATA_POISONING = frozenset({"backdoor", "label_flip", "model_replacement"})  # the harm is done in local training
#: Computed over the inputs the robust rule sees (group means), with the group count, by
#: ``group_targets``; the in-memory driver realises each bad group's target (see fl.py).
GROUP_LEVEL = frozenset({"alie", "ipm", "takeover", "fang_krum", "fang_trim", "min_max", "min_sum"})
NEEDS_BENIGN = frozenset({"alie", "ipm", "sybil", "takeover", "fang_krum", "fang_trim", "min_max", "min_sum"})  # omniscient
DEVIATIONS = ("std", "unit_vec", "sign")
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
    fang_b: float = 2.0          # Fang et al.'s b > 1: how far beyond the benign extremes (trim/median)
    deviation: str = "std"       # min_max / min_sum perturbation: "std", "unit_vec" or "sign"

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
        if not (math.isfinite(self.fang_b) and self.fang_b > 1.0):
            raise ValueError(f"fang_b must be > 1 (Fang et al. sample up to b times past the benign extremes), got {self.fang_b}")
        if self.deviation not in DEVIATIONS:
            raise ValueError(f"deviation must be one of {', '.join(DEVIATIONS)}, got {self.deviation!r}")
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
    server_lr: float = 1.0,
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
    - model_replacement: (n_total / server_lr) * own_update, own_update trained on backdoored
                  data (Bagdasaryan et al. 2020, gamma = n / eta): it cancels the other n - 1
                  contributions to a FedAvg mean so the backdoored model replaces the global one.
    - group-level attacks (GROUP_LEVEL): here the client-level reading over benign_updates
                  (the gRPC simulator's per-client path); the in-memory driver uses
                  ``group_targets`` over the group means instead.
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
    if name == "model_replacement":
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be > 0 for model replacement's gamma = n / eta, got {server_lr}")
        return (n_total / server_lr) * own
    if name in DATA_POISONING:
        return cfg.boost * own
    if name == "sybil":
        return -cfg.scale * benign.mean(axis=0)
    reach = cfg.scale * float(np.linalg.norm(benign.mean(axis=0)))  # takeover without a known B: like sybil
    return group_targets(cfg, benign, n_inputs=int(n_total), n_bad=1, rule_f=int(n_byzantine),
                         clip_norm=reach, rng=rng, alie_f=int(n_byzantine))[0]


# ------------------------------------------------------------------ attacks on the rule's inputs


def _alie_z(n: int, f: int) -> float:
    """alie_z_max, with s clamped to [1, n - 1] when f is so large that the formula leaves (0, 1)."""
    s = min(max(math.floor(n / 2 + 1) - f, 1), n - 1)
    return NormalDist().inv_cdf((n - s) / n)


def alie_vector(benign: np.ndarray, n: int, f: int, z: float | None = None) -> np.ndarray:
    """ALIE (Baruch et al. 2019) over the rule's inputs: mean - z * std (ddof 0), z from (n, f)."""
    zz = _alie_z(n, f) if z is None else float(z)
    return benign.mean(axis=0) - zz * benign.std(axis=0)


def fang_trim_vectors(benign: np.ndarray, c: int, rng: np.random.Generator, b: float = 2.0) -> np.ndarray:
    """Fang et al. (USENIX Security 2020), full knowledge, against trimmed mean and median.

    s_j = sign of the benign mean (the direction the model would move). Where s_j = +1 every
    crafted value lies below the benign minimum: uniform in [w_min/b, w_min] if w_min > 0,
    else [b*w_min, w_min]; where s_j = -1 above the maximum: [w_max, b*w_max] if w_max > 0,
    else [w_max, w_max/b]. Returns (c, d), one independent sample per crafted input.
    """
    s = np.sign(benign.mean(axis=0))
    lo_max, hi_min = benign.max(axis=0), benign.min(axis=0)
    # interval below the minimum (s = +1) and above the maximum (s = -1)
    below = np.where(hi_min > 0, hi_min / b, b * hi_min), hi_min
    above = lo_max, np.where(lo_max > 0, b * lo_max, lo_max / b)
    lo = np.where(s > 0, below[0], above[0])
    hi = np.where(s > 0, below[1], above[1])
    u = rng.random((c, benign.shape[1]))
    return lo + u * (hi - lo)


def fang_krum_lambda_bound(benign: np.ndarray, n: int, c: int) -> float:
    """Fang et al.'s upper bound on lambda (updates are differences from the global model,
    so w_Re is the origin): 1/((n - 2c - 1) sqrt d) * min_i sum of distances from benign i to
    its n - c - 2 nearest benign neighbours + max_i ||w_i|| / sqrt d."""
    m, d = benign.shape
    dist = np.sqrt(np.maximum(((benign[:, None, :] - benign[None, :, :]) ** 2).sum(-1), 0.0))
    np.fill_diagonal(dist, np.inf)
    k = min(max(n - c - 2, 0), m - 1)
    near = np.sort(dist, axis=1)[:, :k].sum(axis=1) if k else np.zeros(m)
    denom = max(n - 2 * c - 1, 1)
    return float(near.min() / (denom * math.sqrt(d)) + np.linalg.norm(benign, axis=1).max() / math.sqrt(d))


def fang_krum_vectors(benign: np.ndarray, c: int, rule_f: int, threshold: float = 1e-5) -> np.ndarray:
    """Fang et al., full knowledge, against Krum: c copies of -lambda * s, s = sign(benign mean).

    lambda starts at ``fang_krum_lambda_bound`` and is halved until Krum (with the server's f)
    over [crafted x c, benign] selects a crafted input, or lambda < threshold. Returns (c, d).
    """
    from secagg.protocol.robust import krum

    s = np.sign(benign.mean(axis=0))
    n = c + benign.shape[0]
    lam = fang_krum_lambda_bound(benign, n, c)
    f = min(rule_f, max(n - 3, 0))
    while lam >= threshold:
        crafted = np.tile(-lam * s, (c, 1))
        if krum(np.vstack([crafted, benign]), f=f).selected[0] < c:
            return crafted
        lam /= 2.0
    return np.tile(-lam * s, (c, 1))


def _deviation(benign: np.ndarray, kind: str) -> np.ndarray:
    mean = benign.mean(axis=0)
    if kind == "unit_vec":
        return mean / max(float(np.linalg.norm(mean)), 1e-12)
    if kind == "sign":
        return np.sign(mean)
    return benign.std(axis=0)


def _gamma_search(ok: Callable[[float], bool], init: float = 10.0, tol: float = 1e-5) -> float:
    """Shejwalkar & Houmansadr's search for the largest gamma with ok(gamma): step up by
    half the last step on success, down on failure, halving the step, until it settles."""
    gamma, step, succ = init, init, 0.0
    while abs(succ - gamma) > tol:
        if ok(gamma):
            succ = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return succ


def min_max_vector(benign: np.ndarray, deviation: str = "std", init: float = 10.0) -> np.ndarray:
    """Min-max (Shejwalkar & Houmansadr, NDSS 2021): mean - gamma * p with the largest gamma
    such that max_i ||m - x_i|| <= max_{i,j} ||x_i - x_j|| (no farther from any benign input
    than two benign inputs are from each other)."""
    mean, p = benign.mean(axis=0), _deviation(benign, deviation)
    d2 = ((benign[:, None, :] - benign[None, :, :]) ** 2).sum(-1)
    limit = float(d2.max())
    gamma = _gamma_search(lambda g: float(((mean - g * p - benign) ** 2).sum(-1).max()) <= limit, init)
    return mean - gamma * p


def min_sum_vector(benign: np.ndarray, deviation: str = "std", init: float = 10.0) -> np.ndarray:
    """Min-sum (Shejwalkar & Houmansadr): the largest gamma with sum_i ||m - x_i||^2 <=
    max_i sum_j ||x_i - x_j||^2."""
    mean, p = benign.mean(axis=0), _deviation(benign, deviation)
    d2 = ((benign[:, None, :] - benign[None, :, :]) ** 2).sum(-1)
    limit = float(d2.sum(axis=1).max())
    gamma = _gamma_search(lambda g: float(((mean - g * p - benign) ** 2).sum()) <= limit, init)
    return mean - gamma * p


def group_targets(
    cfg: AttackConfig,
    benign: np.ndarray,
    *,
    n_inputs: int,
    n_bad: int,
    rule_f: int,
    clip_norm: float,
    rng: np.random.Generator,
    alie_f: int | None = None,
) -> np.ndarray:
    """What each of the ``n_bad`` attacker-held rule inputs should be, shape (n_bad, d).

    ``benign`` (k >= 2, d) are the honest inputs the rule will see (group means), ``n_inputs``
    how many inputs it sees in all, ``rule_f`` the f the server runs the rule with (full
    knowledge: Fang's Krum attack simulates it). ALIE's z uses (n_inputs, alie_f or n_bad).
    takeover: -clip_norm * the unit honest-mean direction (the far side of the B-ball).
    """
    name = _check_name(cfg.name)
    benign = np.asarray(benign, dtype=np.float64)
    if benign.ndim != 2 or benign.shape[0] < MIN_BENIGN:
        raise ValueError(f"attack {name!r} needs at least {MIN_BENIGN} benign inputs to observe, got {benign.shape}")
    if n_bad < 1:
        return np.empty((0, benign.shape[1]))
    if name == "alie":
        v = alie_vector(benign, n_inputs, n_bad if alie_f is None else alie_f, cfg.alie_z)
    elif name == "ipm":
        v = -cfg.ipm_epsilon * benign.mean(axis=0)
    elif name == "takeover":
        mean = benign.mean(axis=0)
        v = -clip_norm * mean / max(float(np.linalg.norm(mean)), 1e-12)
    elif name == "min_max":
        v = min_max_vector(benign, cfg.deviation)
    elif name == "min_sum":
        v = min_sum_vector(benign, cfg.deviation)
    elif name == "fang_trim":
        return fang_trim_vectors(benign, n_bad, rng, cfg.fang_b)
    elif name == "fang_krum":
        return fang_krum_vectors(benign, n_bad, rule_f)
    else:
        raise ValueError(f"attack {name!r} is not computed over the rule's inputs; use craft_update")
    return np.tile(v, (n_bad, 1))
