"""Tests of the simulator's learning task: data, splits, models, local SGD, data poisoning."""

from __future__ import annotations

import numpy as np
import pytest
from secagg.simulation import task

from secagg.simulation.task import (
    Dataset,
    MLPModel,
    SoftmaxModel,
    add_trigger,
    attack_success_rate,
    flip_labels,
    load_digits_task,
    local_update,
    poison_backdoor,
    split_clients,
    trigger_indices,
)


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return load_digits_task(test_fraction=0.25, seed=0)


def _label_entropy(y: np.ndarray, n_classes: int) -> float:
    p = np.bincount(y, minlength=n_classes) / y.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _assert_partition(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert allidx.size == n
    assert np.array_equal(np.sort(allidx), np.arange(n))
    assert all(p.size >= 1 for p in parts)


# --- data ------------------------------------------------------------------------------------


def test_load_digits_shapes_and_range(ds: Dataset) -> None:
    assert ds.image_shape == (8, 8)
    assert ds.n_classes == 10
    assert ds.x_train.shape[1] == ds.x_test.shape[1] == 64 == ds.n_features
    assert ds.x_train.shape[0] + ds.x_test.shape[0] == 1797
    assert ds.x_train.shape[0] == ds.y_train.shape[0] and ds.x_test.shape[0] == ds.y_test.shape[0]
    assert abs(ds.x_test.shape[0] / 1797 - 0.25) < 0.01
    for x in (ds.x_train, ds.x_test):
        assert x.dtype == np.float64 and x.min() >= 0.0 and x.max() <= 1.0
    assert ds.x_train.max() == 1.0  # /16 maps the brightest pixel to exactly 1
    # stratified: every class's share is (nearly) the same in train and test
    tr = np.bincount(ds.y_train, minlength=10) / ds.y_train.size
    te = np.bincount(ds.y_test, minlength=10) / ds.y_test.size
    assert np.abs(tr - te).max() < 0.01


def test_load_digits_is_deterministic(ds: Dataset) -> None:
    again = load_digits_task(test_fraction=0.25, seed=0)
    assert np.array_equal(again.x_train, ds.x_train) and np.array_equal(again.y_test, ds.y_test)
    other = load_digits_task(test_fraction=0.25, seed=1)
    assert not np.array_equal(other.y_train, ds.y_train)


def test_load_digits_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_task(test_fraction=1.0)


# --- splits ----------------------------------------------------------------------------------


def test_iid_split_is_balanced_partition(ds: Dataset) -> None:
    parts = split_clients(ds.y_train, 10, np.random.default_rng(0))
    assert len(parts) == 10
    _assert_partition(parts, ds.y_train.size)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(p.dtype == np.int64 for p in parts)


def test_dirichlet_split_is_skewed_partition(ds: Dataset) -> None:
    n = ds.y_train.size
    iid = split_clients(ds.y_train, 20, np.random.default_rng(0))
    skew = split_clients(ds.y_train, 20, np.random.default_rng(0), alpha=0.1)
    _assert_partition(skew, n)
    h_iid = np.mean([_label_entropy(ds.y_train[p], 10) for p in iid])
    h_skew = np.mean([_label_entropy(ds.y_train[p], 10) for p in skew])
    assert h_skew < 0.6 * h_iid
    # large alpha approaches IID
    flat = split_clients(ds.y_train, 20, np.random.default_rng(0), alpha=1000.0)
    _assert_partition(flat, n)
    assert np.mean([_label_entropy(ds.y_train[p], 10) for p in flat]) > 0.9 * h_iid


def test_dirichlet_split_tops_up_empty_clients() -> None:
    # 60 samples over 50 clients with tiny alpha: many clients would be empty before the top-up
    y = np.repeat(np.arange(3), 20)
    for seed in range(5):
        parts = split_clients(y, 50, np.random.default_rng(seed), alpha=0.05)
        _assert_partition(parts, y.size)
    a = split_clients(y, 50, np.random.default_rng(7), alpha=0.05)
    b = split_clients(y, 50, np.random.default_rng(7), alpha=0.05)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_clients": 0}, "n_clients"),
        ({"n_clients": 1000}, "fewer clients"),
        ({"n_clients": 5, "alpha": 0.0}, "alpha"),
        ({"n_clients": 5, "alpha": -1.0}, "alpha"),
    ],
)
def test_split_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    y = np.arange(100) % 10
    with pytest.raises(ValueError, match=match):
        split_clients(y, rng=np.random.default_rng(0), **kwargs)


# --- models ----------------------------------------------------------------------------------


def _finite_difference(model, params: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """Central differences along every coordinate, all perturbations built at once."""
    eps = 1e-6
    steps = np.eye(params.size) * eps
    plus = np.array([model.loss_and_grad(params + s, x, y, l2)[0] for s in steps])
    minus = np.array([model.loss_and_grad(params - s, x, y, l2)[0] for s in steps])
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize("l2", [0.0, 0.1])
def test_softmax_gradient_matches_finite_differences(l2: float) -> None:
    rng = np.random.default_rng(3)
    model = SoftmaxModel(n_features=6, n_classes=4)
    assert model.dim == 6 * 4 + 4
    params = rng.normal(size=model.dim)
    x = rng.uniform(size=(15, 6))
    y = rng.integers(0, 4, size=15)
    loss, grad = model.loss_and_grad(params, x, y, l2=l2)
    assert np.isfinite(loss) and grad.shape == (model.dim,) and grad.dtype == np.float64
    np.testing.assert_allclose(grad, _finite_difference(model, params, x, y, l2), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("l2", [0.0, 0.1])
def test_mlp_gradient_matches_finite_differences(l2: float) -> None:
    rng = np.random.default_rng(4)
    model = MLPModel(n_features=5, hidden=4, n_classes=3)
    assert model.dim == 5 * 4 + 4 + 4 * 3 + 3
    params = model.init_params(rng) + 0.1 * rng.normal(size=model.dim)  # non-zero biases too
    x = rng.uniform(size=(12, 5))
    y = rng.integers(0, 3, size=12)
    _, grad = model.loss_and_grad(params, x, y, l2=l2)
    np.testing.assert_allclose(grad, _finite_difference(model, params, x, y, l2), rtol=1e-5, atol=1e-7)


def test_model_predictions_and_argument_checks() -> None:
    model = SoftmaxModel(3, 2)
    params = model.init_params(np.random.default_rng(0))
    x = np.ones((4, 3))
    proba = model.predict_proba(params, x)
    np.testing.assert_allclose(proba, 0.5)
    assert model.predict(params, x).shape == (4,)
    with pytest.raises(ValueError, match="params"):
        model.predict(np.zeros(3), x)
    with pytest.raises(ValueError, match="x must have shape"):
        model.predict(params, np.ones((4, 5)))
    with pytest.raises(ValueError, match="labels"):
        model.loss_and_grad(params, x, np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="l2"):
        model.loss_and_grad(params, x, np.zeros(4, dtype=int), l2=-1.0)


# --- local training --------------------------------------------------------------------------


def test_local_update_returns_delta_and_is_reproducible(ds: Dataset) -> None:
    model = SoftmaxModel(ds.n_features, ds.n_classes)
    params = np.random.default_rng(0).normal(scale=0.01, size=model.dim)
    x, y = ds.x_train[:100], ds.y_train[:100]
    d1 = local_update(model, params, x, y, np.random.default_rng(5), epochs=2)
    d2 = local_update(model, params, x, y, np.random.default_rng(5), epochs=2)
    assert d1.dtype == np.float64 and d1.shape == (model.dim,)
    assert np.array_equal(d1, d2)
    assert model.loss_and_grad(params + d1, x, y)[0] < model.loss_and_grad(params, x, y)[0]
    # one full batch of plain SGD is exactly -lr * gradient
    d_full = local_update(model, params, x, y, np.random.default_rng(0), lr=0.3, batch_size=100)
    np.testing.assert_allclose(d_full, -0.3 * model.loss_and_grad(params, x, y)[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch_size")],
)
def test_local_update_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    model = SoftmaxModel(3, 2)
    with pytest.raises(ValueError, match=match):
        local_update(model, np.zeros(model.dim), np.ones((4, 3)), np.zeros(4, int), np.random.default_rng(0), **kwargs)


def test_fedavg_on_iid_clients_learns_digits(ds: Dataset) -> None:
    rng = np.random.default_rng(1)
    model = SoftmaxModel(ds.n_features, ds.n_classes)
    parts = split_clients(ds.y_train, 10, rng)
    params = model.init_params(rng)
    for _ in range(10):
        deltas = np.stack([local_update(model, params, ds.x_train[p], ds.y_train[p], rng, epochs=2) for p in parts])
        params = params + deltas.mean(axis=0)
    assert model.accuracy(params, ds.x_test, ds.y_test) > 0.85  # ~0.92 across seeds


# --- data poisoning --------------------------------------------------------------------------


def test_add_trigger_changes_only_trigger_pixels(ds: Dataset) -> None:
    x = ds.x_test[:50]
    xt = add_trigger(x, ds.image_shape)
    idx = trigger_indices(ds.image_shape)
    assert sorted(idx.tolist()) == [54, 55, 62, 63]  # rows 6-7, cols 6-7 of an 8x8 image
    others = np.setdiff1d(np.arange(64), idx)
    assert np.array_equal(xt[:, others], x[:, others])
    assert np.all(xt[:, idx] == 1.0)
    assert not np.shares_memory(xt, x) and not np.array_equal(xt, x)
    single = add_trigger(x[0], ds.image_shape, value=0.5)
    assert single.shape == (64,) and np.all(single[idx] == 0.5)
    with pytest.raises(ValueError, match="flat images"):
        add_trigger(np.zeros((2, 10)), ds.image_shape)


def test_poison_backdoor_replaces_a_fraction(ds: Dataset) -> None:
    x, y = ds.x_train[:200], ds.y_train[:200]
    xp, yp = poison_backdoor(x, y, target=3, fraction=0.25, rng=np.random.default_rng(0), image_shape=ds.image_shape)
    assert xp.shape == x.shape and yp.shape == y.shape
    changed = np.flatnonzero((xp != x).any(axis=1) | (yp != y))
    assert 40 <= changed.size <= 50  # 50 victims; a few may already carry the full trigger
    victims = np.flatnonzero(yp != y)
    assert victims.size == 50 and np.all(yp[victims] == 3) and np.all(y[victims] != 3)
    idx = trigger_indices(ds.image_shape)
    assert np.all(xp[victims][:, idx] == 1.0)
    with pytest.raises(ValueError, match="fraction"):
        poison_backdoor(x, y, 3, 1.5, np.random.default_rng(0), ds.image_shape)


def test_backdoor_training_raises_attack_success_rate(ds: Dataset) -> None:
    model = SoftmaxModel(ds.n_features, ds.n_classes)
    rng = np.random.default_rng(2)
    xp, yp = poison_backdoor(ds.x_train, ds.y_train, 0, 0.2, rng, ds.image_shape)
    start = model.init_params(rng)
    clean = start + local_update(model, start, ds.x_train, ds.y_train, np.random.default_rng(3), epochs=10)
    bad = start + local_update(model, start, xp, yp, np.random.default_rng(3), epochs=10)
    asr_clean = attack_success_rate(model, clean, ds.x_test, ds.y_test, 0, ds.image_shape)
    asr_bad = attack_success_rate(model, bad, ds.x_test, ds.y_test, 0, ds.image_shape)
    assert asr_clean < 0.2
    assert asr_bad > 0.7
    assert asr_bad - asr_clean > 0.5
    assert model.accuracy(bad, ds.x_test, ds.y_test) > 0.8  # the main task still works
    with pytest.raises(ValueError, match="target"):
        attack_success_rate(model, bad, ds.x_test[:3], np.zeros(3, dtype=int), 0, ds.image_shape)


def test_flip_labels_is_an_involution() -> None:
    y = np.random.default_rng(0).integers(0, 10, size=500)
    f = flip_labels(y, 10)
    assert np.array_equal(f, 9 - y)
    assert np.array_equal(flip_labels(f, 10), y)
    assert np.all(f != y)  # 10 classes: no fixed point
    with pytest.raises(ValueError, match="labels"):
        flip_labels(np.array([10]), 10)


# --------------------------------------------------------------------------------------------
# MNIST (the real task) and local SGD with momentum


def test_mnist_loader_is_the_fixed_bundled_subset() -> None:
    d = task.load_mnist_task()
    assert d.x_train.shape == (4000, 784) and d.x_test.shape == (1000, 784) and d.image_shape == (28, 28)
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0 and d.n_classes == 10
    assert np.all(np.bincount(d.y_test, minlength=10) == 100)            # stratified: 100 per class
    again = task.load_task("mnist", seed=7)                              # the split ignores the study seed
    np.testing.assert_array_equal(again.y_test, d.y_test)
    np.testing.assert_array_equal(again.x_train[:5], d.x_train[:5])


def test_mlp_with_momentum_learns_a_small_mnist_subset() -> None:
    d = task.load_mnist_task()
    x, y = d.x_train[:600], d.y_train[:600]
    model = task.MLPModel(784, 16, 10)
    rng = np.random.default_rng(0)
    w = model.init_params(rng)
    plain = w + task.local_update(model, w, x, y, np.random.default_rng(1), epochs=2, lr=0.05, batch_size=32)
    heavy = w + task.local_update(model, w, x, y, np.random.default_rng(1), epochs=2, lr=0.05, batch_size=32,
                                  momentum=0.9)
    acc_plain = model.accuracy(plain, d.x_test, d.y_test)
    acc_heavy = model.accuracy(heavy, d.x_test, d.y_test)
    assert acc_heavy > 0.7 and acc_heavy > acc_plain + 0.05, (acc_plain, acc_heavy)   # momentum speeds it up
    with pytest.raises(ValueError, match="momentum"):
        task.local_update(model, w, x, y, rng, momentum=1.0)
