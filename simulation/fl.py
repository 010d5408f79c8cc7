"""Federated learning over secure aggregation, in memory: the population and the round loop.

``Federation`` is the population: the data split, which clients are Byzantine and what each
client computes and encodes in a round.  The gRPC simulator imports it to produce clients'
inputs; ``run_in_memory`` runs the same clients through real secure aggregation
(``protocol.driver.run_group``, one instance per group), then the server's decision
(``protocol.aggregation.combine_groups``: checks on every revealed group sum, robust rule over the
accepted group means), and trains the model.

Reproducibility: everything that affects the numbers (split, Byzantine choice, SGD order,
poisoning, grouping, dropouts, stochastic rounding) is a pure function of ``FLConfig.seed``, the
round number and the client id.  Key material comes from ``os.urandom``; it cannot change a
result because masks cancel exactly.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from secagg.protocol import encoding
from secagg.protocol.aggregation import combine_groups
from secagg.protocol.bench import make_config
from secagg.protocol.driver import run_group
from secagg.protocol.encoding import EncodingParams
from secagg.protocol.messages import Mode, Phase
from secagg.protocol.plan import PlanError, PlanSettings, RoundPlan, make_plan
from secagg.protocol.robust import RULES, assumed_f, bucket_seed, f_cap

from . import task
from .attacks import GROUP_LEVEL, AttackConfig, craft_update, group_targets, is_data_poisoning, needs_benign

__all__ = ["FLConfig", "Federation", "RoundMetrics", "RunResult", "encode_takeover", "encode_unbounded",
           "feasible_target", "rule_f_cap", "run_in_memory"]

MLP_HIDDEN = 32
MINORITY_SHARE = 0.2  # RunResult.minority_accuracy: the honest clients whose labels are rarest, this share of them
TAIL_ROUNDS = 5  # RunResult.worst_accuracy looks at this many last rounds

# Purposes of the simulation's random streams (SeedSequence entropy: [seed, purpose, ...]).
_SPLIT, _BYZANTINE, _INIT, _TRAIN, _POISON, _CRAFT, _GROUPS, _DROPS, _GROUP_CRAFT = range(9)


@dataclass(frozen=True)
class FLConfig:
    clients: int = 30
    rounds: int = 15
    groups: int = 6                     # secure-aggregation groups per round (group size = clients/groups)
    grouping: str = "stable"            # "stable": groups fixed for epoch_rounds rounds; "reshuffle": new groups every round
    epoch_rounds: int = 10              # rounds per epoch under stable grouping
    sample_rate: float = 0.0            # Poisson sampling rate (of groups under stable grouping); 0 = everyone
    sample_size: int = 0                # fixed-size sampling (clients; whole groups under stable); 0 = off
    model: str = "softmax"              # or "mlp"
    task: str = "digits"                # or "mnist" (784 features, fixed split)
    hidden: int = MLP_HIDDEN            # the MLP's hidden units
    local_momentum: float = 0.0         # heavy-ball momentum of the local SGD steps
    non_iid: float | None = None        # Dirichlet alpha; None = IID
    local_epochs: int = 1
    lr: float = 0.5
    batch_size: int = 32
    server_lr: float = 1.0
    attack: AttackConfig = AttackConfig()  # noqa: RUF009 - frozen, so one shared default is safe
    byzantine: float = 0.0              # fraction of clients that are Byzantine
    bypass_bounds: bool = False         # one attacker per group skips the library and takes the group over
    clip_norm: float = 5.0
    clip_value: float | None = None
    precision_bits: int = 16
    rule: str = "mean"
    rule_f: int | None = None           # f for the rule; None = from assumed_byzantine (never the true count)
    assumed_byzantine: float = 0.2      # the Byzantine fraction the operator assumes: f = min(ceil(a n), groups - 1)
    rule_params: dict = field(default_factory=dict)
    momentum: float = 0.0               # worker momentum beta: clients send m = beta m + (1 - beta) delta
    bucket: int = 1                     # bucketing size s: the rule runs over means of s shuffled group means
    dropout: float = 0.0                # fraction of clients that vanish each round (phase chosen at random)
    mode: str = "semi-honest"
    seed: int = 0

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        for name in ("clients", "rounds", "groups", "local_epochs", "batch_size", "hidden", "bucket"):
            positive_int(name)
        if self.task not in task.TASKS:
            raise ValueError(f"task must be one of {', '.join(task.TASKS)}, got {self.task!r}")
        for name in ("momentum", "local_momentum", "assumed_byzantine"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if self.groups > self.clients:
            raise ValueError(f"groups ({self.groups}) cannot exceed clients ({self.clients}); every group needs a member")
        if self.model not in ("softmax", "mlp"):
            raise ValueError(f"model must be 'softmax' or 'mlp', got {self.model!r}")
        if self.non_iid is not None and not (math.isfinite(self.non_iid) and self.non_iid > 0):
            raise ValueError(f"non_iid is a Dirichlet alpha and must be > 0 (or None for IID), got {self.non_iid}")
        for name in ("lr", "server_lr"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v}")
        if not isinstance(self.attack, AttackConfig):
            raise TypeError(f"attack must be an AttackConfig, got {type(self.attack).__name__}")
        if not 0.0 <= self.byzantine < 1.0:
            raise ValueError(f"byzantine is a fraction of clients in [0, 1), got {self.byzantine}")
        if self.n_byzantine and needs_benign(self.attack.name) and self.clients - self.n_byzantine < 2:
            raise ValueError(f"attack {self.attack.name!r} observes honest updates and needs at least 2 honest clients")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout is a fraction of clients in [0, 1), got {self.dropout}")
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {', '.join(RULES)}")
        if self.rule_f is not None and (isinstance(self.rule_f, bool) or not isinstance(self.rule_f, int) or self.rule_f < 0):
            raise ValueError(f"rule_f must be a non-negative integer or None, got {self.rule_f!r}")
        if self.mode not in (m.value for m in Mode):
            raise ValueError(f"mode must be 'semi-honest' or 'active', got {self.mode!r}")
        try:
            self.plan_settings()
        except PlanError as exc:
            raise ValueError(str(exc)) from None
        self.encoding_params()  # validates clip_norm, clip_value, precision_bits
        self.encoding_params().modulus_bits(self.clients // self.groups + 1)

    @property
    def n_byzantine(self) -> int:
        return round(self.byzantine * self.clients)

    def encoding_params(self) -> EncodingParams:
        return EncodingParams(clip_norm=self.clip_norm, clip_value=self.clip_value, precision_bits=self.precision_bits)

    def plan_settings(self) -> PlanSettings:
        """The round plan's settings; groups of any size run in memory (min_group 1)."""
        return PlanSettings(groups=self.groups, grouping=self.grouping, epoch_rounds=self.epoch_rounds,
                            sample_rate=self.sample_rate, sample_size=self.sample_size, min_group=1)


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([int(e) for e in entropy])


def rounding_seed(seed: int, round_no: int, client: int) -> bytes:
    """The stochastic-rounding seed of a client's input in a round (simulation, not key material)."""
    return hashlib.sha256(f"secagg-fl/rounding/{seed}/{round_no}/{client}".encode()).digest()


@lru_cache(maxsize=8)
def _dataset(name: str, seed: int) -> task.Dataset:
    return task.load_task(name, seed=seed)


def _wrap(q: np.ndarray, params: EncodingParams, members: int) -> np.ndarray:
    """Signed integers -> words mod 2^k of the group's word size (two's complement wrap)."""
    bits = params.modulus_bits(members)
    if bits < 64:
        half = 1 << (bits - 1)
        q = ((q + half) & ((1 << bits) - 1)) - half
    return encoding.embed(q, params.dtype(members))


def feasible_target(target: np.ndarray, params: EncodingParams) -> np.ndarray:
    """The point of the check-feasible set {|v_i| <= c, ||v|| <= B} a takeover aims at:
    coordinates clipped to c, then the vector scaled into the B-ball (the library's bound)."""
    return encoding.bound(np.clip(np.asarray(target, dtype=np.float64), -params.coord_bound, params.coord_bound),
                          params.clip_norm)


def encode_takeover(target: np.ndarray, others: list[np.ndarray], params: EncodingParams, members: int,
                    *, contributors: int | None = None) -> np.ndarray:
    """Group takeover: the words a bypassing member sends so that its group's revealed sum
    decodes to ``members * target`` with count ``members`` and the squared-norm total filling
    the budget ``members * B^2`` exactly, given the other members' words (the threat model's
    omniscient attacker). Every check on the sum passes when ``target`` is feasible
    (``feasible_target``); its own vector is up to (2 members - 1) B long. ``members`` sizes
    the words (the group's size); ``contributors`` (default: 1 + len(others)) is how many
    inputs the sum will hold, i.e. what the count must say.
    """
    t = np.asarray(target, dtype=np.float64)
    d = t.size
    n = len(others) + 1 if contributors is None else int(contributors)
    want = np.empty(d + encoding.EXTRA_COORDS, dtype=np.int64)
    want[:d] = np.round(n * t * params.scale)
    want[-2] = n
    want[-1] = int(math.floor(n * params.clip_norm**2 * params.sqnorm_scale))
    dtype = params.dtype(members)
    if others:
        acc = np.sum(np.stack(others), axis=0, dtype=dtype)  # mod 2^k, like the real sum
        want = want - encoding.to_signed(acc).astype(np.int64)
    return _wrap(want, params, members)


def encode_unbounded(x: np.ndarray, params: EncodingParams, members: int, *, rounding_seed: bytes) -> np.ndarray:
    """A cheating client's encoder: quantise ``x`` without any bounding and wrap mod 2^k.

    It claims the squared norm ``min(||x||^2, B^2)`` (lying low, so the group's squared-norm
    total stays within ``contributors * B^2``); the norm, range and Cauchy-Schwarz checks on the
    group sum are what must catch it.  The count coordinate is an honest 1.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"update must be a 1-D vector, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("update contains NaN or infinity")
    v = np.empty(x.size + encoding.EXTRA_COORDS, dtype=np.float64)
    v[: x.size] = x * params.scale
    v[-2] = 1.0
    v[-1] = min(float(np.dot(x, x)), params.clip_norm**2) * params.sqnorm_scale
    np.clip(v, -(2.0**62), 2.0**62, out=v)  # keep int64 rounding defined; wrapping follows
    return _wrap(encoding.stochastic_round(v, rounding_seed), params, members)


class Federation:
    """The population: data split, which clients are Byzantine, how each computes its update."""

    def __init__(self, cfg: FLConfig) -> None:
        self.cfg = cfg
        self.data = _dataset(cfg.task, cfg.seed)
        d = self.data
        if cfg.clients > d.y_train.size:
            raise ValueError(f"{cfg.clients} clients but only {d.y_train.size} training samples; use fewer clients")
        if cfg.model == "softmax":
            self.model: task.Model = task.SoftmaxModel(d.n_features, d.n_classes)
        else:
            self.model = task.MLPModel(d.n_features, cfg.hidden, d.n_classes)
        self.dim: int = self.model.dim
        self.parts = task.split_clients(d.y_train, cfg.clients, _rng(cfg.seed, _SPLIT), alpha=cfg.non_iid)
        picked = _rng(cfg.seed, _BYZANTINE).choice(cfg.clients, size=cfg.n_byzantine, replace=False)
        self.byzantine_ids: frozenset[int] = frozenset(int(i) for i in picked)
        self.honest_ids: tuple[int, ...] = tuple(c for c in range(cfg.clients) if c not in self.byzantine_ids)
        self._cache_key: tuple[int, bytes] | None = None
        self._cache: dict[int, np.ndarray] = {}
        self._momenta: dict[int, np.ndarray] = {}
        self._momentum_round: dict[int, int] = {}

    # -- the model --------------------------------------------------------------------------------
    def initial_params(self) -> np.ndarray:
        return self.model.init_params(_rng(self.cfg.seed, _INIT))

    def minority_clients(self) -> tuple[int, ...]:
        """The MINORITY_SHARE of honest clients whose label mix is farthest (total variation)
        from the pooled training labels: chosen from the data alone, before any training."""
        d = self.data
        pooled = np.bincount(d.y_train, minlength=d.n_classes) / d.y_train.size
        tv = [0.5 * float(np.abs(self.label_mix(c) - pooled).sum()) for c in self.honest_ids]
        k = max(1, round(MINORITY_SHARE * len(self.honest_ids)))
        order = np.argsort(-np.asarray(tv), kind="stable")[:k]
        return tuple(sorted(self.honest_ids[i] for i in order))

    def label_mix(self, client: int) -> np.ndarray:
        d = self.data
        return np.bincount(d.y_train[self.parts[client]], minlength=d.n_classes) / self.parts[client].size

    def minority_accuracy(self, params: np.ndarray) -> float:
        """Mean over ``minority_clients`` of the test accuracy weighted by each one's label mix
        (per-class test accuracy . the client's class shares): how well the model serves them."""
        d = self.data
        pred = self.model.predict(params, d.x_test)
        per_class = np.array([np.mean(pred[d.y_test == k] == k) if np.any(d.y_test == k) else 0.0
                              for k in range(d.n_classes)])
        return float(np.mean([self.label_mix(c) @ per_class for c in self.minority_clients()]))

    def evaluate(self, params: np.ndarray) -> dict[str, float]:
        d = self.data
        out = {"accuracy": self.model.accuracy(params, d.x_test, d.y_test)}
        if self.cfg.attack.name in ("backdoor", "model_replacement"):
            out["backdoor_asr"] = task.attack_success_rate(self.model, params, d.x_test, d.y_test,
                                                           self.cfg.attack.backdoor_target, d.image_shape)
        return out

    # -- who is where ---------------------------------------------------------------------------
    def epoch_seed(self, round_no: int) -> bytes:
        """The epoch's seed in a simulation: a function of ``FLConfig.seed`` (a server draws it with ``secrets``)."""
        epoch = self.cfg.plan_settings().epoch_of(round_no)
        return hashlib.sha256(f"secagg-fl/epoch/{self.cfg.seed}/{epoch}".encode()).digest()

    def plan(self, round_no: int, epoch_seed: bytes | None = None) -> RoundPlan:
        """The round's plan (``protocol.plan``), the one a server with the same seed would run: every
        client present (dropouts happen inside the round), client ``c`` named ``str(c)``."""
        names = [str(c) for c in range(self.cfg.clients)]
        seed = self.epoch_seed(round_no) if epoch_seed is None else epoch_seed
        return make_plan(self.cfg.plan_settings(), round_no, seed, present=names, population=names)

    def assignment(self, round_no: int) -> list[list[int]]:
        """The groups that run in the round (client ids, each group sorted), from ``plan``."""
        return [sorted(int(c) for c in g) for g in self.plan(round_no).groups]

    def dropouts(self, round_no: int) -> dict[int, Phase]:
        """Client -> the phase it vanishes before, for round(dropout * clients) clients."""
        n = round(self.cfg.dropout * self.cfg.clients)
        if n == 0:
            return {}
        rng = _rng(self.cfg.seed, _DROPS, round_no)
        phases = [p for p in Phase if self.cfg.mode == Mode.ACTIVE.value or p is not Phase.CONSISTENCY_CHECK]
        who = rng.choice(self.cfg.clients, size=n, replace=False)
        return {int(c): phases[int(rng.integers(len(phases)))] for c in who}

    # -- what clients compute ----------------------------------------------------------------------
    def _check_client(self, client: int) -> int:
        if isinstance(client, bool) or not isinstance(client, (int, np.integer)) or not 0 <= client < self.cfg.clients:
            raise ValueError(f"client must be an id in 0..{self.cfg.clients - 1}, got {client!r}")
        return int(client)

    def _train(self, client: int, params: np.ndarray, round_no: int, *, poisoned: bool) -> np.ndarray:
        cfg, d = self.cfg, self.data
        idx = self.parts[client]
        x, y = d.x_train[idx], d.y_train[idx]
        if poisoned:
            prng = _rng(cfg.seed, _POISON, round_no, client)
            if cfg.attack.name in ("backdoor", "model_replacement"):
                x, y = task.poison_backdoor(x, y, cfg.attack.backdoor_target, cfg.attack.backdoor_fraction, prng, d.image_shape)
            elif cfg.attack.name == "label_flip":
                y = task.flip_labels(y, d.n_classes)
        return task.local_update(self.model, params, x, y, _rng(cfg.seed, _TRAIN, round_no, client),
                                 epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                 momentum=cfg.local_momentum)

    def honest_update(self, client: int, params: np.ndarray, round_no: int) -> np.ndarray:
        """Local SGD on the client's own clean data (cached per round and model)."""
        client = self._check_client(client)
        params = np.asarray(params, dtype=np.float64)
        key = (int(round_no), hashlib.blake2b(params.tobytes(), digest_size=16).digest())
        if key != self._cache_key:
            self._cache_key, self._cache = key, {}
        if client not in self._cache:
            self._cache[client] = self._train(client, params, round_no, poisoned=False)
        return self._cache[client]

    def sent_honest(self, client: int, params: np.ndarray, round_no: int) -> np.ndarray:
        """What an honest client sends: its delta, or with worker momentum (Karimireddy, He,
        Jaggi 2021) m <- beta m + (1 - beta) delta, m starting at the first delta. The state
        advances once per round the client takes part in (a repeat call returns the same m)."""
        client = self._check_client(client)
        delta = self.honest_update(client, params, round_no)
        beta = self.cfg.momentum
        if not beta:
            return delta.copy()
        if self._momentum_round.get(client) != round_no:
            prev = self._momenta.get(client)
            self._momenta[client] = delta.copy() if prev is None else beta * prev + (1.0 - beta) * delta
            self._momentum_round[client] = round_no
        return self._momenta[client].copy()

    def update(self, client: int, params: np.ndarray, round_no: int, benign: np.ndarray | None = None) -> np.ndarray:
        """The raw update the client intends to send: its honest vector, or the crafted
        client-level attack (``benign``: the honest vectors it observes, default all of them)."""
        client = self._check_client(client)
        if client not in self.byzantine_ids or self.cfg.attack.name == "none":
            return self.sent_honest(client, params, round_no)
        cfg = self.cfg
        if is_data_poisoning(cfg.attack.name):
            own = self._train(client, np.asarray(params, dtype=np.float64), round_no, poisoned=True)
        else:
            own = self.honest_update(client, params, round_no)
        if benign is None and needs_benign(cfg.attack.name):  # omniscient: every honest client's vector
            benign = np.stack([self.sent_honest(c, params, round_no) for c in self.honest_ids])
        elif benign is None:
            benign = np.empty((0, self.dim))
        return craft_update(cfg.attack, own, benign, _rng(cfg.seed, _CRAFT, round_no, client),
                            n_total=cfg.clients, n_byzantine=len(self.byzantine_ids), server_lr=cfg.server_lr)

    def server_f(self, accepted: int) -> int:
        """The f the server runs the rule with over ``accepted`` group means: the configured
        ``rule_f``, else from the ASSUMED fraction, capped so the rule can run."""
        cfg = self.cfg
        f = cfg.rule_f if cfg.rule_f is not None else assumed_f(cfg.assumed_byzantine, cfg.clients, max(accepted, 1))
        return min(f, rule_f_cap(cfg.rule, accepted))

    def round_inputs(self, params: np.ndarray, round_no: int, groups: list[list[int]], present: set[int],
                     enc: EncodingParams) -> dict[int, np.ndarray]:
        """Every present client's words for the round, attackers coordinating per group.

        A group holding a present attacker is a bad group. Group-level attacks (GROUP_LEVEL)
        compute one target per bad group over the benign group means (groups without an
        attacker; with fewer than 2 of those, over the honest clients' vectors), with the
        number of groups and the server's f. Without bypass the group's k attackers each send
        (m t - sum of honest members)/k, which the library then clips to B; with bypass the
        first attacker takes the group over (``encode_takeover``) and its mean becomes the
        feasible target. Client-level attacks send their crafted vectors; with bypass the
        group mean becomes the mean of its attackers' crafted vectors (projected to the ball).
        """
        cfg = self.cfg
        honest = {c: self.sent_honest(c, params, round_no) for c in sorted(present) if c not in self.byzantine_ids}
        vec: dict[int, np.ndarray] = dict(honest)
        live = [[c for c in g if c in present] for g in groups]
        bad = [i for i, g in enumerate(live) if any(c in self.byzantine_ids for c in g)]
        targets: dict[int, np.ndarray] = {}
        attacking = cfg.attack.name != "none" and bad
        if attacking and cfg.attack.name in GROUP_LEVEL:
            good = [np.mean([honest[c] for c in g], axis=0) for i, g in enumerate(live) if g and i not in bad]
            benign = np.stack(good) if len(good) >= 2 else np.stack(list(honest.values()))
            n_inputs = sum(1 for g in live if g)
            t = group_targets(cfg.attack, benign, n_inputs=n_inputs, n_bad=len(bad), rule_f=self.server_f(n_inputs),
                              clip_norm=cfg.clip_norm, rng=_rng(cfg.seed, _GROUP_CRAFT, round_no))
            targets = dict(zip(bad, t))
        elif attacking:
            benign = np.stack(list(honest.values())) if needs_benign(cfg.attack.name) else None
            for i in bad:
                for c in live[i]:
                    if c in self.byzantine_ids:
                        vec[c] = self.update(c, params, round_no, benign)
                if cfg.bypass_bounds:
                    targets[i] = np.mean([vec[c] for c in live[i] if c in self.byzantine_ids], axis=0)
        else:  # no attack: Byzantine clients behave honestly
            vec.update({c: self.sent_honest(c, params, round_no) for c in present if c in self.byzantine_ids})
        takers: dict[int, tuple[int, np.ndarray]] = {}
        for i, t in targets.items():
            g = live[i]
            atk = [c for c in g if c in self.byzantine_ids]
            if cfg.bypass_bounds:
                takers[i] = (atk[0], feasible_target(t, enc))
                for c in atk[1:]:
                    vec.setdefault(c, self.sent_honest(c, params, round_no))
            else:
                rest = sum((honest[c] for c in g if c not in self.byzantine_ids), np.zeros(self.dim))
                for c in atk:
                    vec[c] = (len(g) * t - rest) / len(atk)
        out: dict[int, np.ndarray] = {}
        for i, g in enumerate(live):
            m = len(groups[i])
            taker = takers.get(i, (None, None))[0]
            for c in g:
                if c != taker:
                    out[c] = encoding.encode(vec[c], enc, m, rounding_seed=rounding_seed(cfg.seed, round_no, c))
            if taker is not None:
                out[taker] = encode_takeover(takers[i][1], [out[c] for c in g if c != taker], enc, m, contributors=len(g))
        return out

    def encode(self, client: int, update: np.ndarray, params: EncodingParams, members: int, rounding_seed: bytes) -> np.ndarray:
        """What the client puts under its mask: the library's bounded encoding, or (a bypassing
        attacker) the raw values via ``encode_unbounded``."""
        client = self._check_client(client)
        if self.cfg.bypass_bounds and client in self.byzantine_ids:
            return encode_unbounded(update, params, members, rounding_seed=rounding_seed)
        return encoding.encode(update, params, members, rounding_seed=rounding_seed)


@dataclass
class RoundMetrics:
    round: int
    accuracy: float
    backdoor_asr: float | None
    accepted_groups: int
    rejected_groups: int
    reasons: list[str]          # check failures (each starts with the check's name), "abort: ...", "rule: ..."
    survivors: int              # clients whose input is in an unmasked group sum
    seconds: float
    aborted_groups: int = 0     # groups whose protocol aborted (too few survivors): no sum at all
    f: int = 0                  # f handed to the rule
    updated: bool = True        # False when no update was applied (nothing accepted, or the rule could not run)


@dataclass
class RunResult:
    config: FLConfig
    rounds: list[RoundMetrics]
    final_accuracy: float
    worst_accuracy: float           # min accuracy over the last TAIL_ROUNDS rounds
    final_backdoor_asr: float | None
    rejected_total: int
    aborted_total: int = 0
    seconds: float = 0.0
    final_params: np.ndarray | None = None
    minority_accuracy: float = math.nan   # see Federation.minority_accuracy


def rule_f_cap(rule: str, accepted: int) -> int:
    """The largest f the rule can run with over ``accepted`` group means."""
    return f_cap(rule, accepted)


def _run_group_sum(cfg: FLConfig, fed: Federation, members: list[int], inputs: dict[int, np.ndarray],
                   drops: Mapping[int, Phase], params: EncodingParams, mode: Mode) -> tuple[np.ndarray | None, list[int], str]:
    """One group's secure aggregation: (word sum, contributing client ids, abort message)."""
    if len(members) == 1:  # no secure aggregation for one: the server sees the input itself
        c = members[0]
        return (None, [], f"client {c} dropped") if c in drops else (inputs[c], [c], "")
    gcfg = make_config(len(members), fed.dim, mode, None, params)
    local = {i + 1: c for i, c in enumerate(members)}
    by_phase: dict[Phase, set[int]] = {}
    for i, c in local.items():
        if c in drops:
            by_phase.setdefault(drops[c], set()).add(i)
    ids = {i: os.urandom(32) for i in local} if mode is Mode.ACTIVE else None
    run = run_group(gcfg, {i: inputs[c] for i, c in local.items() if c in inputs}, drops=by_phase, identity_keys=ids)
    if run.result is None:
        return None, [], run.aborted or "aborted"
    return run.result.total, sorted(local[i] for i in run.result.survivors), ""


def run_in_memory(cfg: FLConfig, *, progress: Callable[[int, RoundMetrics], None] | None = None) -> RunResult:
    """Train for ``cfg.rounds`` rounds; every round is real secure aggregation per group."""
    t_start = time.perf_counter()
    fed = Federation(cfg)
    params_enc = cfg.encoding_params()
    mode = Mode(cfg.mode)
    model = fed.initial_params()
    prev_update = np.zeros(fed.dim)
    history: list[RoundMetrics] = []
    for r in range(cfg.rounds):
        t0 = time.perf_counter()
        groups = fed.assignment(r)
        drops = fed.dropouts(r)
        # a client that vanishes before sending its input computes nothing
        present = {c for members in groups for c in members if not (c in drops and drops[c] <= Phase.MASKED_INPUT)}
        inputs = fed.round_inputs(model, r, groups, present, params_enc)
        sums: dict[int, tuple[np.ndarray, int]] = {}
        contributors: dict[int, list[int]] = {}
        reasons: list[str] = []
        for g, members in enumerate(groups):
            total, who, aborted = _run_group_sum(cfg, fed, members, inputs, drops, params_enc, mode)
            if total is None:
                reasons.append(f"abort group {g}: {aborted}")
                continue
            sums[g], contributors[g] = (total, len(who)), who
        used_f: list[int] = []

        def f_for(accepted: list[int]) -> int:
            """From the operator's assumption and the accepted count only (no oracle)."""
            used_f.append(fed.server_f(len(accepted)))
            return used_f[-1]

        rparams = dict(cfg.rule_params)
        if cfg.rule == "centered_clipping":
            rparams.setdefault("center", prev_update)  # centred on the previous aggregate, as the paper runs it
        if cfg.bucket > 1:
            rparams.update(bucket=cfg.bucket, bucket_seed=bucket_seed(cfg.seed, r))
        decision = combine_groups(sums, params_enc, rule=cfg.rule, f=f_for, rule_params=rparams)
        f = used_f[-1] if used_f else 0
        for v in decision.verdicts:
            reasons.extend(v.reasons)
        if decision.update is not None:
            model = model + cfg.server_lr * decision.update
            prev_update = decision.update
        elif decision.failure:
            reasons.append(f"rule: {decision.failure}")
        ev = fed.evaluate(model)
        rm = RoundMetrics(
            round=r, accuracy=ev["accuracy"], backdoor_asr=ev.get("backdoor_asr"),
            accepted_groups=sum(v.accepted for v in decision.verdicts),
            rejected_groups=sum(not v.accepted for v in decision.verdicts), reasons=reasons,
            survivors=sum(len(w) for w in contributors.values()), seconds=time.perf_counter() - t0,
            aborted_groups=len(groups) - len(sums), f=f, updated=decision.update is not None,
        )
        history.append(rm)
        if progress is not None:
            progress(r, rm)
    tail = [m.accuracy for m in history[-TAIL_ROUNDS:]]
    return RunResult(
        config=cfg, rounds=history, final_accuracy=history[-1].accuracy, worst_accuracy=min(tail),
        final_backdoor_asr=history[-1].backdoor_asr, rejected_total=sum(m.rejected_groups for m in history),
        aborted_total=sum(m.aborted_groups for m in history), seconds=time.perf_counter() - t_start,
        final_params=model, minority_accuracy=fed.minority_accuracy(model),
    )

