"""Tests of the Byzantine attacks on update vectors: each attack's definition and its checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from secagg.simulation.attacks import (
    ATTACKS,
    AttackConfig,
    alie_z_max,
    craft_update,
    is_data_poisoning,
    needs_benign,
)

D = 50
K = 8


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    own = rng.normal(size=D)
    benign = rng.normal(loc=0.3, scale=0.5, size=(K, D))
    return own, benign


def _craft(cfg: AttackConfig, own: np.ndarray, benign: np.ndarray, seed: int = 1, n: int = 10, f: int = 2) -> np.ndarray:
    return craft_update(cfg, own, benign, np.random.default_rng(seed), n_total=n, n_byzantine=f)


def test_none_returns_a_copy_of_own(data) -> None:
    own, benign = data
    out = _craft(AttackConfig(), own, benign)
    assert np.array_equal(out, own) and not np.shares_memory(out, own)
    assert out.dtype == np.float64


def test_scaling_multiplies_the_norm_exactly(data) -> None:
    own, benign = data
    out = _craft(AttackConfig("scaling", scale=7.5), own, benign)
    np.testing.assert_allclose(out, 7.5 * own, rtol=0, atol=0)
    assert math.isclose(np.linalg.norm(out), 7.5 * np.linalg.norm(own), rel_tol=1e-14)


def test_sign_flip_negates_without_boost(data) -> None:
    own, benign = data
    out = _craft(AttackConfig("sign_flip", scale=100.0), own, benign)
    assert np.array_equal(out, -own)


def test_gaussian_is_noise_with_the_given_std(data) -> None:
    own, _ = data
    big_own = np.zeros(20_000)
    out = craft_update(AttackConfig("gaussian", noise_std=2.0), big_own, np.empty((0, 20_000)),
                       np.random.default_rng(3), n_total=10, n_byzantine=1)
    assert out.shape == big_own.shape
    assert abs(out.mean()) < 0.05 and abs(out.std() - 2.0) < 0.05
    # independent of own update, reproducible from the generator
    a = _craft(AttackConfig("gaussian"), own, np.empty((0, D)), seed=9)
    b = _craft(AttackConfig("gaussian"), 100 * own, np.empty((0, D)), seed=9)
    assert np.array_equal(a, b)


def test_alie_z_max_formula() -> None:
    # n=10, f=2: s = floor(10/2 + 1) - 2 = 4; z = Phi^-1((10 - 4) / 10) = Phi^-1(0.6) = 0.2533471...
    assert math.isclose(alie_z_max(10, 2), 0.2533471031357998, rel_tol=1e-12)
    # n=50, f=12 (a setting of Baruch et al.): s = 26 - 12 = 14; z = Phi^-1(36/50 = 0.72) = 0.5828415...
    assert math.isclose(alie_z_max(50, 12), 0.5828415072712162, rel_tol=1e-12)
    # n=4, f=1: s = 3 - 1 = 2; z = Phi^-1(0.5) = 0
    assert alie_z_max(4, 1) == 0.0
    # more attackers -> larger admissible shift
    assert alie_z_max(50, 20) > alie_z_max(50, 12) > alie_z_max(50, 5)


@pytest.mark.parametrize("n, f", [(10, 6), (10, 10), (1, 0), (2, 0), (5, 7), (0, 0)])
def test_alie_z_max_rejects_undefined_settings(n: int, f: int) -> None:
    with pytest.raises(ValueError):
        alie_z_max(n, f)


def test_alie_is_mean_minus_z_std(data) -> None:
    own, benign = data
    mean = benign.sum(axis=0) / K
    std = np.sqrt(((benign - mean) ** 2).sum(axis=0) / K)
    z = 0.2533471031357998  # alie_z_max(10, 2), see above
    out = _craft(AttackConfig("alie"), own, benign, n=10, f=2)
    np.testing.assert_allclose(out, mean - z * std, rtol=1e-12, atol=1e-14)
    # an explicit z overrides the formula
    out = _craft(AttackConfig("alie", alie_z=1.5), own, benign, n=10, f=2)
    np.testing.assert_allclose(out, mean - 1.5 * std, rtol=1e-12, atol=1e-14)
    # and the attack ignores the attacker's own training
    assert np.array_equal(out, _craft(AttackConfig("alie", alie_z=1.5), -own, benign, seed=5))


def test_alie_needs_two_benign_updates(data) -> None:
    own, benign = data
    for k in (0, 1):
        with pytest.raises(ValueError, match="at least 2 benign"):
            _craft(AttackConfig("alie"), own, benign[:k])


def test_ipm_opposes_the_benign_mean(data) -> None:
    own, benign = data
    mean = benign.mean(axis=0)
    out = _craft(AttackConfig("ipm", ipm_epsilon=0.5), own, benign)
    np.testing.assert_allclose(out, -0.5 * mean, rtol=1e-12)
    assert float(out @ mean) < 0
    # with epsilon > 1 the attack flips the sign of the plain average of benign + attacker
    big = _craft(AttackConfig("ipm", ipm_epsilon=float(K) + 1), own, benign)
    assert float((benign.sum(axis=0) + big) @ mean) < 0


def test_data_poisoning_attacks_apply_only_the_boost(data) -> None:
    own, benign = data
    for name in ("backdoor", "label_flip"):
        assert is_data_poisoning(name)
        assert np.array_equal(_craft(AttackConfig(name), own, benign), own)
        np.testing.assert_allclose(_craft(AttackConfig(name, boost=3.0), own, np.empty((0, D))), 3.0 * own, rtol=0)
    assert not any(is_data_poisoning(n) for n in ATTACKS if n not in ("backdoor", "label_flip", "model_replacement"))


def test_sybils_send_one_identical_boosted_vector(data) -> None:
    own, benign = data
    cfg = AttackConfig("sybil", scale=4.0)
    rng = np.random.default_rng(0)
    outs = [craft_update(cfg, own * (i + 1), benign, rng, n_total=10, n_byzantine=3) for i in range(3)]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    np.testing.assert_allclose(outs[0], -4.0 * benign.mean(axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="benign"):
        _craft(cfg, own, benign[:1])


def test_needs_benign_names_the_omniscient_attacks() -> None:
    assert {n for n in ATTACKS if needs_benign(n)} == {"alie", "ipm", "sybil", "takeover", "fang_krum", "fang_trim",
                                                        "min_max", "min_sum"}


def test_every_attack_returns_a_float_vector_of_the_right_shape(data) -> None:
    own, benign = data
    for name in ATTACKS:
        out = _craft(AttackConfig(name), own, benign)
        assert out.shape == (D,) and out.dtype == np.float64 and np.all(np.isfinite(out)), name


def test_unknown_attack_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown attack"):
        AttackConfig(name="nope")
    with pytest.raises(ValueError, match="unknown attack"):
        is_data_poisoning("nope")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise_std": -1.0}, "noise_std"),
        ({"ipm_epsilon": 0.0}, "ipm_epsilon"),
        ({"backdoor_fraction": 1.5}, "backdoor_fraction"),
        ({"backdoor_target": -1}, "backdoor_target"),
        ({"scale": float("nan")}, "scale"),
        ({"alie_z": float("inf")}, "alie_z"),
    ],
)
def test_config_rejects_bad_knobs(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AttackConfig(**kwargs)


def test_craft_rejects_bad_shapes_and_counts(data) -> None:
    own, benign = data
    cfg = AttackConfig("scaling")
    with pytest.raises(ValueError, match="1-D"):
        _craft(cfg, own.reshape(5, 10), benign)
    with pytest.raises(ValueError, match="benign_updates must have shape"):
        _craft(cfg, own, benign[:, :10])
    with pytest.raises(ValueError, match="n_byzantine"):
        _craft(cfg, own, benign, n=3, f=4)
    with pytest.raises(ValueError, match="n_total"):
        _craft(cfg, own, benign, n=0, f=0)
