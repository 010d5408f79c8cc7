"""One in-memory round, measured against the performance model of docs/performance.md.

The lower bound of a phase is (number of PRG expansions and vector additions it needs) times
the cost of one expansion plus one addition of a D-vector, both measured in the same run.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import prg, thresholds
from .driver import GroupRun, run_group
from .encoding import EncodingParams, encode
from .messages import GroupConfig, Mode, Phase


@dataclass(frozen=True)
class UnitCosts:
    prg_seconds: float   # one PRG expansion of a D-vector
    add_seconds: float   # one in-place modular addition of a D-vector

    @property
    def per_vector(self) -> float:
        return self.prg_seconds + self.add_seconds


def _best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_unit_costs(dim: int, dtype: np.dtype, repeat: int = 25) -> UnitCosts:
    """The model's units on this machine now: one AES-CTR pass over a D-vector, one addition."""
    seed = os.urandom(32)
    nbytes = dim * np.dtype(dtype).itemsize
    zeros, out = bytes(nbytes), bytearray(nbytes + 16)
    acc = np.zeros(dim, dtype=dtype)
    v = prg.expand(seed, dim, dtype)

    def expand() -> None:
        prg._encryptor(seed).update_into(zeros, out)

    def add() -> None:
        np.add(acc, v, out=acc)

    return UnitCosts(prg_seconds=_best(expand, repeat), add_seconds=_best(add, repeat))


def server_bounds(unit: UnitCosts, *, survivors: int, expansions: int) -> dict[Phase, float]:
    """The server's lower bounds (docs/performance.md): summing the masked inputs costs one vector
    addition per survivor; unmasking one PRG expansion and addition per seed it expands (each
    survivor's self mask, and each dropped member's pairwise masks with its surviving neighbours)."""
    return {Phase.MASKED_INPUT: survivors * unit.add_seconds, Phase.UNMASKING: expansions * unit.per_vector}


def make_config(clients: int, dim: int, mode: Mode, neighbors: int | None, params: EncodingParams, threshold: int | None = None) -> GroupConfig:
    holders = clients if neighbors is None or neighbors >= clients - 1 else neighbors + 1
    return GroupConfig(
        session=os.urandom(32),
        members=clients,
        threshold=threshold or thresholds.default(holders, mode),
        dim=dim + 2,
        modulus_bits=params.modulus_bits(clients),
        mode=mode,
        neighbors=None if neighbors is None or neighbors >= clients - 1 else neighbors,
    )


def choose_drops(clients: int, dropout: float, mode: Mode, seed: int) -> dict[Phase, set[int]]:
    """Spread ``dropout`` * clients dropouts over the phases (simulator randomness, not crypto)."""
    rng = np.random.default_rng(seed)
    n = int(round(dropout * clients))
    who = rng.choice(np.arange(1, clients + 1), size=n, replace=False)
    phases = [p for p in Phase if mode is Mode.ACTIVE or p is not Phase.CONSISTENCY_CHECK]
    out: dict[Phase, set[int]] = {}
    for k, i in enumerate(who):
        out.setdefault(phases[k % len(phases)], set()).add(int(i))
    return out


def bench_round(clients: int, dim: int, *, dropout: float = 0.0, neighbors: int | None = None,
                mode: Mode = Mode.SEMI_HONEST, seed: int = 0, params: EncodingParams | None = None) -> dict:
    """Run and measure one round; returns the report (see ``secagg bench --json``)."""
    params = params or EncodingParams(clip_norm=10.0)
    cfg = make_config(clients, dim, mode, neighbors, params)
    data = np.random.default_rng(seed)
    inputs = {i: encode(data.normal(size=dim) * 0.01, params, clients, rounding_seed=os.urandom(32)) for i in range(1, clients + 1)}
    ids = {i: os.urandom(32) for i in range(1, clients + 1)} if mode is Mode.ACTIVE else None
    drops = choose_drops(clients, dropout, mode, seed)
    t0 = time.perf_counter()
    run = run_group(cfg, inputs, drops=drops, identity_keys=ids)
    total = time.perf_counter() - t0
    unit = measure_unit_costs(cfg.dim, cfg.dtype)
    return report(cfg, run, inputs, unit, total, dropout=dropout)


def report(cfg: GroupConfig, run: GroupRun, inputs: dict[int, np.ndarray], unit: UnitCosts, total: float, *, dropout: float) -> dict:
    correct = False
    survivors: frozenset[int] = frozenset()
    if run.result is not None:
        survivors = run.result.survivors
        expected = np.zeros(cfg.dim, dtype=cfg.dtype)
        for i in survivors:
            expected += inputs[i]
        correct = bool(np.array_equal(expected, run.result.total))
    degree = cfg.degree
    u2 = run.survivors.get(Phase.SHARE_KEYS, frozenset())
    dropped_after_sharing = len(u2 - survivors)
    server = server_bounds(unit, survivors=len(survivors), expansions=len(survivors) + dropped_after_sharing * degree)
    bounds = {
        Phase.MASKED_INPUT: ((degree + 1) * unit.per_vector, server[Phase.MASKED_INPUT]),
        Phase.UNMASKING: (0.0, server[Phase.UNMASKING]),
    }
    phases = {}
    for p, st in run.stats.items():
        if p is Phase.CONSISTENCY_CHECK and cfg.mode is not Mode.ACTIVE:
            continue
        cb, sb = bounds.get(p, (0.0, 0.0))
        phases[p.label] = {
            "client_seconds_mean": st.client_mean,
            "client_seconds_max": st.client_max,
            "server_seconds": st.server_seconds,
            "bytes_up": st.bytes_up,
            "bytes_down": st.bytes_down,
            "bytes_up_per_client": st.bytes_up / max(1, len(st.client_seconds)),
            "client_bound_seconds": cb,
            "server_bound_seconds": sb,
            "client_ratio": st.client_mean / cb if cb else None,
            "server_ratio": st.server_seconds / sb if sb else None,
            "survivors": len(run.survivors.get(p, ())),
        }
    return {
        "clients": cfg.members,
        "dim": cfg.dim - 2,
        "mode": cfg.mode.value,
        "neighbors": degree,
        "threshold": cfg.threshold,
        "modulus_bits": cfg.modulus_bits,
        "dropout": dropout,
        "survivors": len(survivors),
        "aborted": run.aborted,
        "correct": correct,
        "total_seconds": total,
        "unit_costs": {"prg_seconds": unit.prg_seconds, "add_seconds": unit.add_seconds},
        "phases": phases,
    }
