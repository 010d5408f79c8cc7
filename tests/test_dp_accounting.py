"""The accountant against dp_accounting called directly, and against the papers' formulas."""

from __future__ import annotations

import math

import dp_accounting
import pytest

from secagg.protocol.accounting import Accountant, RoundRelease, ddg_epsilon_zcdp, epsilon_of, round_event, skellam_zcdp

DELTA = 1e-5


def test_continuous_gaussian_matches_rdp_and_pld_accountants():
    rel = RoundRelease("continuous-gaussian", 1.1, sampling_rate=0.05)
    acc = Accountant()
    for _ in range(40):
        acc.charge(rel.event())
    ref = dp_accounting.rdp.RdpAccountant()
    ref.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 40))
    assert acc.epsilon(DELTA) == pytest.approx(ref.get_epsilon(DELTA), rel=1e-9)
    pld = Accountant([rel.event()] * 40, kind="pld")
    ref_pld = dp_accounting.pld.PLDAccountant()
    ref_pld.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 40)
    assert pld.epsilon(DELTA) == pytest.approx(ref_pld.get_epsilon(DELTA), rel=1e-6)
    assert pld.epsilon(DELTA) <= acc.epsilon(DELTA) * 1.01   # PLD is the tighter accountant


def test_unsampled_discrete_gaussian_is_the_kls21_bound_composed():
    z, delta2, n, d, rounds = 0.8, 2000.0, 8, 1 << 16, 20
    rel = RoundRelease("gaussian", z, l2_sensitivity=delta2, honest_clients=n, dim=d)
    # Independent evaluation of KLS21 Theorem 1: tau is negligible at this per-client sigma, so
    # the sum behaves like the continuous Gaussian with multiplier z (rho = 1/(2 z^2)).
    sigma = z * delta2 / math.sqrt(n)
    tau = 10 * sum(math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, n))
    eps_zcdp = min(math.sqrt(delta2**2 / (n * sigma**2) + tau * d / 2), delta2 / (math.sqrt(n) * sigma) + tau * math.sqrt(d))
    assert eps_zcdp == pytest.approx(1 / z, rel=1e-12)
    ref = dp_accounting.rdp.RdpAccountant()
    ref.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert epsilon_of([rel.event()] * rounds, DELTA) == pytest.approx(ref.get_epsilon(DELTA), rel=1e-9)


def test_small_per_client_sigma_pays_the_kls21_slack():
    # At per-client sigma ~ 0.3 the sum of discrete Gaussians is far from discrete Gaussian: tau > 0.
    eps = ddg_epsilon_zcdp(1.0, 0.3, 10, 100)
    assert eps > 1 / math.sqrt(10 * 0.09) * 1.01


def test_skellam_is_its_rdp_bound():
    z, delta2, d = 1.0, 500.0, 4096
    rho, xi = skellam_zcdp(delta2, (z * delta2) ** 2, d)
    v = (z * delta2) ** 2
    l1 = min(delta2**2, math.sqrt(d) * delta2)
    for alpha in (2.0, 8.0, 32.0):   # the charged line is at or above the paper's RDP curve
        paper = alpha * delta2**2 / (2 * v) + min(((2 * alpha - 1) * delta2**2 + 6 * l1) / (4 * v * v), 3 * l1 / (2 * v))
        assert rho * alpha + xi >= paper * (1 - 1e-12)
    assert rho * 8 + xi == pytest.approx(8 * delta2**2 / (2 * v) + min((15 * delta2**2 + 6 * l1) / (4 * v * v), 3 * l1 / (2 * v)))
    ref = dp_accounting.rdp.RdpAccountant()
    ref.compose(dp_accounting.ZCDpEvent(rho=rho, xi=xi), 10)
    assert epsilon_of([round_event("skellam", z, l2_sensitivity=delta2, dim=d)] * 10, DELTA) == pytest.approx(ref.get_epsilon(DELTA))


def test_sampled_discrete_gaussian_amplifies_like_the_gaussian_of_equal_rho():
    rel = RoundRelease("gaussian", 1.0, sampling_rate=0.1, l2_sensitivity=1000.0, honest_clients=5, dim=1000)
    ref = dp_accounting.rdp.RdpAccountant()
    ref.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 50)
    assert epsilon_of([rel.event()] * 50, DELTA) == pytest.approx(ref.get_epsilon(DELTA), rel=1e-6)
    assert epsilon_of([rel.event()] * 50, DELTA) < epsilon_of([RoundRelease("gaussian", 1.0, l2_sensitivity=1000.0, honest_clients=5, dim=1000).event()] * 50, DELTA)


def test_would_exceed_and_cumulative_composition():
    ev = round_event("continuous-gaussian", 2.0)
    acc = Accountant()
    one = Accountant([ev]).epsilon(DELTA)
    assert not acc.would_exceed(ev, one * 1.001, DELTA)
    acc.charge(ev)
    assert acc.epsilon(DELTA) == pytest.approx(one)
    assert acc.would_exceed(ev, one * 1.001, DELTA)      # a second round costs more
    assert len(acc.events) == 1                          # asking charged nothing
    assert Accountant().epsilon(DELTA) == 0.0


def test_release_round_trips_through_a_record_and_rejects_nonsense():
    rel = RoundRelease("skellam", 1.3, sampling_rate=0.5, l2_sensitivity=12.0, honest_clients=3, dim=7)
    assert RoundRelease.from_dict(rel.as_dict()) == rel
    for bad in (dict(mechanism="laplace"), dict(noise_multiplier=0.0), dict(sampling_rate=0.0), dict(honest_clients=0)):
        with pytest.raises(ValueError):
            RoundRelease(**{**rel.as_dict(), **bad})
    with pytest.raises(ValueError, match="rdp"):
        Accountant([rel.event()], kind="pld")
