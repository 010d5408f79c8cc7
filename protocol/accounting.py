"""Privacy accounting: what each round released, as a ``dp_accounting`` event, and the running total.

Epsilon is always computed from the recorded releases, never tracked by hand.  A round is
described by a ``RoundRelease`` (plain numbers a round record can store and reload); its
``event()`` is the ``dp_accounting.DpEvent`` it charges; an ``Accountant`` composes them::

    rel = RoundRelease(mechanism="gaussian", noise_multiplier=1.1, sampling_rate=0.1,
                       l2_sensitivity=4100.0, honest_clients=8, dim=2**20 + 3)
    acc = Accountant()
    if acc.would_exceed(rel.event(), budget=8.0, delta=1e-6): refuse the round
    acc.charge(rel.event()); acc.epsilon(1e-6)       # cumulative epsilon so far

API
    ``MECHANISMS``                      "gaussian" (distributed discrete Gaussian, the encoding's
                                        default), "skellam", "continuous-gaussian" (the ideal
                                        central Gaussian, for comparison and for non-encoded use)
    ``RoundRelease(...)``               mechanism, noise_multiplier, sampling_rate, l2_sensitivity
                                        (integer units), honest_clients (t - c), dim (noised words);
                                        ``event()``, ``as_dict()``, ``from_dict(d)``
    ``round_event(...)``                the same as ``RoundRelease(...).event()``
    ``ddg_epsilon_zcdp(...)``           KLS21 Thm 1: the sum of n discrete Gaussians is
                                        (eps^2 / 2)-zCDP with this eps
    ``skellam_zcdp(...)``               Agarwal-Kairouz-Liu 2021: Skellam RDP as (xi, rho)-zCDP
    ``Accountant(events=(), kind="rdp")``  ``charge(event)``, ``epsilon(delta)``,
                                        ``would_exceed(event, budget, delta)``, ``events``
    ``epsilon_of(events, delta)``       cumulative epsilon of a list of events

How each mechanism is charged
    * continuous-gaussian: ``GaussianDpEvent(z)``.
    * gaussian (distributed discrete Gaussian): each of the n = t - c honest survivors adds
      N_Z(0, s^2) with s = z * Delta / sqrt(n); KLS21 Theorem 1 bounds the sum by eps^2/2-zCDP with
      eps = min(sqrt(Delta^2/(n s^2) + tau d / 2), Delta/(sqrt(n) s) + tau sqrt(d)),
      tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k/(k+1)).  Unsampled: ``ZCDpEvent(eps^2/2)``, exact.
    * skellam: the sum of the survivors' Skellam noise is Skellam with variance V = (z Delta)^2;
      its RDP is alpha Delta^2/(2V) + min(((2 alpha - 1) Delta^2 + 6 Delta_1)/(4 V^2), 3 Delta_1/(2V))
      (Delta_1 <= min(Delta^2, sqrt(d) Delta) for integer vectors); we charge the branch with the
      smaller RDP at order 8 as ``ZCDpEvent(rho, xi)``: either branch is a valid bound.
    * Sampled rounds (clients Poisson-sampled with rate q < 1): dp_accounting amplifies only the
      Gaussian, so a discrete mechanism is charged as ``PoissonSampledDpEvent(q, GaussianDpEvent(z'))``
      with z' = 1/sqrt(2 rho) (the continuous Gaussian with the same zCDP rho), plus an unamplified
      ``ZCDpEvent(0, xi)`` for Skellam's xi.  This is an approximation (the discrete mechanism's
      privacy-loss distribution is not the Gaussian's), stated as such in docs/privacy.md.

``dp_accounting`` is imported inside the functions, so the client library never needs it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MECHANISMS: tuple[str, ...] = ("gaussian", "skellam", "continuous-gaussian")
_SKELLAM_REF_ORDER = 8.0


def ddg_epsilon_zcdp(l2_sensitivity: float, sigma: float, clients: int, dim: int) -> float:
    """KLS21 Thm 1: the sum of ``clients`` independent N_Z(0, sigma^2)^dim vectors is (eps^2/2)-zCDP."""
    if sigma <= 0 or clients < 1 or dim < 1 or l2_sensitivity < 0:
        raise ValueError("ddg_epsilon_zcdp needs sigma > 0, clients >= 1, dim >= 1, l2_sensitivity >= 0")
    tau = 10.0 * sum(math.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, clients))
    var = clients * sigma**2
    return min(math.sqrt(l2_sensitivity**2 / var + 0.5 * tau * dim),
               l2_sensitivity / math.sqrt(var) + tau * math.sqrt(dim))


def skellam_zcdp(l2_sensitivity: float, variance: float, dim: int) -> tuple[float, float]:
    """(rho, xi) of the Skellam sum with total ``variance`` (Agarwal, Kairouz, Liu 2021)."""
    if variance <= 0 or dim < 1 or l2_sensitivity < 0:
        raise ValueError("skellam_zcdp needs variance > 0, dim >= 1, l2_sensitivity >= 0")
    l2 = l2_sensitivity
    l1 = min(l2 * l2, math.sqrt(dim) * l2)
    base = l2 * l2 / (2 * variance)
    a = (base + l2 * l2 / (2 * variance**2), max(0.0, (6 * l1 - l2 * l2) / (4 * variance**2)))
    b = (base, 3 * l1 / (2 * variance))
    return min(a, b, key=lambda rx: rx[0] * _SKELLAM_REF_ORDER + rx[1])


@dataclass(frozen=True)
class RoundRelease:
    """What one round released, in the numbers a round record stores (JSON-able)."""

    mechanism: str
    noise_multiplier: float
    sampling_rate: float = 1.0
    l2_sensitivity: float = 1.0   # of one client's noised vector, integer units (after rounding)
    honest_clients: int = 1       # t - c: the fewest honest survivors whose noise is in the sum
    dim: int = 1                  # noised coordinates
    extra: dict[str, Any] = field(default_factory=dict)   # free-form notes for the record

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {', '.join(MECHANISMS)}, got {self.mechanism!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be > 0 to account a release, got {self.noise_multiplier}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if not (math.isfinite(self.l2_sensitivity) and self.l2_sensitivity > 0):
            raise ValueError(f"l2_sensitivity must be > 0, got {self.l2_sensitivity}")
        if self.honest_clients < 1 or self.dim < 1:
            raise ValueError(f"honest_clients and dim must be >= 1, got {self.honest_clients}, {self.dim}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundRelease:
        return cls(**d)

    def zcdp(self) -> tuple[float, float]:
        """(rho, xi) of the unsampled release."""
        z, delta = self.noise_multiplier, self.l2_sensitivity
        if self.mechanism == "continuous-gaussian":
            return 1.0 / (2 * z * z), 0.0
        if self.mechanism == "gaussian":
            sigma = z * delta / math.sqrt(self.honest_clients)
            eps = ddg_epsilon_zcdp(delta, sigma, self.honest_clients, self.dim)
            return eps * eps / 2, 0.0
        return skellam_zcdp(delta, (z * delta) ** 2, self.dim)

    def event(self) -> Any:
        """The ``dp_accounting.DpEvent`` this round charges (see the module docstring)."""
        import dp_accounting

        if self.mechanism == "continuous-gaussian":
            inner = dp_accounting.GaussianDpEvent(self.noise_multiplier)
            return inner if self.sampling_rate == 1 else dp_accounting.PoissonSampledDpEvent(self.sampling_rate, inner)
        rho, xi = self.zcdp()
        if self.sampling_rate == 1:
            return dp_accounting.ZCDpEvent(rho=rho, xi=xi)
        sampled = dp_accounting.PoissonSampledDpEvent(self.sampling_rate, dp_accounting.GaussianDpEvent(1.0 / math.sqrt(2 * rho)))
        return sampled if xi == 0 else dp_accounting.ComposedDpEvent([sampled, dp_accounting.ZCDpEvent(rho=0.0, xi=xi)])


def round_event(mechanism: str, noise_multiplier: float, **kw: Any) -> Any:
    """``RoundRelease(mechanism, noise_multiplier, **kw).event()``."""
    return RoundRelease(mechanism, noise_multiplier, **kw).event()


def _new_accountant(kind: str) -> Any:
    import dp_accounting

    if kind == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    if kind == "pld":
        return dp_accounting.pld.PLDAccountant()
    raise ValueError(f"accountant kind must be 'rdp' or 'pld', got {kind!r}")


class Accountant:
    """Cumulative (epsilon, delta) over the charged events; ``kind`` "rdp" (default) or "pld".

    Equal events are composed as one ``SelfComposedDpEvent`` when epsilon is asked for (the
    accountants' sampled-Gaussian computation is the slow part, so it runs once per distinct
    release, not once per round).  PLD handles Gaussian and sampled-Gaussian events only; zCDP
    events (the discrete mechanisms) need "rdp".
    """

    def __init__(self, events: Iterable[Any] = (), *, kind: str = "rdp") -> None:
        _new_accountant(kind)
        self.kind = kind
        self._events: list[Any] = []
        for e in events:
            self.charge(e)

    @property
    def events(self) -> tuple[Any, ...]:
        return tuple(self._events)

    def charge(self, event: Any) -> None:
        if not _new_accountant(self.kind).supports(event):
            raise ValueError(f"the {self.kind} accountant cannot charge {event!r}; use kind='rdp'")
        self._events.append(event)

    def epsilon(self, delta: float) -> float:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self._events:
            return 0.0
        acc = _new_accountant(self.kind)
        for event, count in Counter(self._events).items():
            acc.compose(event, count)
        return float(acc.get_epsilon(delta))

    def would_exceed(self, event: Any, budget: float, delta: float) -> bool:
        """Would charging ``event`` take the cumulative epsilon above ``budget``?"""
        trial = Accountant(self._events, kind=self.kind)
        trial.charge(event)
        return trial.epsilon(delta) > budget


def epsilon_of(events: Sequence[Any], delta: float, *, kind: str = "rdp") -> float:
    return Accountant(events, kind=kind).epsilon(delta)
