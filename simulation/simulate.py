"""``secagg simulate``: a server process and client worker processes on localhost.

Real processes, real gRPC with TLS (a throwaway CA and localhost certificate), a real SQLite
store.  Every client's input is a deterministic function of (seed, round, client), so after
the run an oracle that only the simulator has recomputes each group's plaintext sum of the
survivors' encoded inputs and compares its digest with the one the server recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import multiprocessing as mp
import os
import queue
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from secagg.protocol.aggregation import sums_digest
from secagg.protocol.encoding import EncodingParams, encode
from secagg.protocol.messages import Phase
from secagg.protocol.policy import ClientPolicy

PHASES = [p.label for p in Phase]
VECTOR_SLOTS = 4   # input vectors a client worker holds at once (built lazily, per client, from its seed)


class SimulationError(RuntimeError):
    """The simulation could not run (server or a worker failed); the message says which."""


class SimulatedDropout(Exception):
    """Raised from the on_phase hook: the client vanishes before sending that phase's message."""


@dataclass
class SimConfig:
    clients: int = 20
    dim: int = 1000
    rounds: int = 3
    dropout: float = 0.1
    dropout_phase: str = "random"          # a phase label, or "random"
    groups: int = 2
    grouping: str = "stable"               # or "reshuffle" (the simulated clients then allow regrouping)
    epoch_rounds: int = 10
    neighbors: int = 0
    mode: str = "active"
    threshold: float = 0.0
    processes: int = 2
    seed: int = 0
    phase_seconds: float = 30.0
    clip_norm: float = 10.0
    clip_value: float = 0.0
    precision_bits: int = 16
    chunk_words: int = 1 << 18
    # learning task (None: synthetic vectors of length dim)
    task: str | None = None
    rule: str = "mean"
    byzantine_groups: int = 0
    attack: str = "none"
    byzantine: float = 0.0
    bypass_bounds: bool = False
    non_iid: float | None = None
    fl: dict[str, Any] = field(default_factory=dict)   # extra FLConfig fields
    workdir: str | None = None                         # keep the run's files here (default: temp, removed)
    profile_dir: str | None = None                     # write a cProfile of the server and of each worker here

    def client_policy(self) -> ClientPolicy:
        """The simulated clients' policy: the default, relaxed only where this simulation asks for less
        (semi-honest mode, groups under 5) and recorded in the summary."""
        smallest = self.clients // self.groups
        floor = min(5, smallest // 2 + 1)   # never above any threshold the server may pick
        regroup = self.grouping == "reshuffle"
        if self.mode == "semi-honest":
            return ClientPolicy.semi_honest(min_group_size=floor, allow_regrouping=regroup)
        return ClientPolicy(min_group_size=floor, allow_regrouping=regroup)

    def validate(self) -> SimConfig:
        if self.clients < 3:
            raise ValueError("--clients must be at least 3")
        if self.groups < 1 or self.clients // self.groups < 3:
            raise ValueError(f"--groups {self.groups} leaves fewer than 3 clients per group; use fewer groups or more clients")
        if not 0 <= self.dropout < 1:
            raise ValueError("--dropout must be in [0, 1)")
        if self.dropout_phase != "random" and self.dropout_phase not in PHASES:
            raise ValueError(f"--dropout-phase must be 'random' or one of {', '.join(PHASES)}")
        if self.dropout_phase == "consistency_check" and self.mode != "active":
            raise ValueError("the consistency_check phase exists only in --mode active")
        if self.rounds < 1 or self.processes < 1 or self.dim < 1:
            raise ValueError("--rounds, --processes and --dim must be positive")
        if self.grouping not in ("stable", "reshuffle") or self.epoch_rounds < 1:
            raise ValueError("--grouping must be 'stable' or 'reshuffle' and --epoch-rounds at least 1")
        if self.task not in (None, "synthetic", "digits"):
            raise ValueError("--task must be 'synthetic' or 'digits'")
        return self

    @property
    def encoding(self) -> EncodingParams:
        return EncodingParams(self.clip_norm, self.clip_value or None, self.precision_bits)

    def fl_config(self) -> Any:
        from .attacks import AttackConfig
        from .fl import FLConfig

        return FLConfig(clients=self.clients, groups=self.groups, rounds=self.rounds, non_iid=self.non_iid,
                        attack=AttackConfig(name=self.attack), byzantine=self.byzantine, bypass_bounds=self.bypass_bounds,
                        clip_norm=self.clip_norm, clip_value=self.clip_value or None, precision_bits=self.precision_bits,
                        rule=self.rule, seed=self.seed, mode=self.mode, grouping=self.grouping, epoch_rounds=self.epoch_rounds,
                        **self.fl)


def default_groups(clients: int) -> int:
    """Groups when none are asked for: 3 from 30 clients (groups of 10), fewer below, so that
    ``secagg simulate --clients 5`` runs as one group instead of failing for want of --groups."""
    return max(1, min(3, clients // 10))


def client_id(i: int) -> str:
    return f"client-{i:04d}"


def _digest_seed(*parts: object) -> bytes:
    return hashlib.sha256("|".join(map(str, parts)).encode()).digest()


def rounding_seed(seed: int, round_id: str, cid: str) -> bytes:
    """Simulation only: a reproducible rounding seed so the oracle can re-encode inputs."""
    return _digest_seed("rounding", seed, round_id, cid)


def synthetic_update(seed: int, round_id: str, cid: str, dim: int, clip_norm: float) -> np.ndarray:
    """A reproducible update of norm about B/2 (simulation data, not key material)."""
    rng = np.random.default_rng(np.frombuffer(_digest_seed("update", seed, round_id, cid), dtype=np.uint64))
    return rng.standard_normal(dim) * (0.5 * clip_norm / np.sqrt(dim))


def client_wait_seconds(cfg: SimConfig, dim: int) -> float:
    """How long a simulated client waits for a round or a phase: at least three times the longest
    phase deadline the server will grant its group (deadlines grow with the round's work)."""
    from secagg.protocol.deadlines import PhaseBudget
    from secagg.protocol.graph import recommended_degree

    size = -(-cfg.clients // cfg.groups)
    degree = min(size - 1, max(cfg.neighbors, recommended_degree(size))) if cfg.neighbors else size - 1
    budget = PhaseBudget(base_seconds=cfg.phase_seconds)   # the server's default rates
    longest = max(budget.seconds(p, members=size, degree=degree, dim=dim + 2, word_bytes=8) for p in Phase)
    return max(60.0, cfg.phase_seconds * 8, 3 * longest)


def drop_plan(cfg: SimConfig) -> dict[int, dict[str, str]]:
    """round number -> {client id: phase it vanishes before}; the same for every process."""
    rng = np.random.default_rng(cfg.seed + 7919)
    phases = [p for p in PHASES if cfg.mode == "active" or p != "consistency_check"]
    plan: dict[int, dict[str, str]] = {}
    n = int(round(cfg.dropout * cfg.clients))
    for r in range(cfg.rounds):
        who = rng.choice(cfg.clients, size=n, replace=False)
        plan[r] = {client_id(int(i)): cfg.dropout_phase if cfg.dropout_phase != "random" else phases[int(rng.integers(len(phases)))] for i in who}
    return plan


# ---- the server process -----------------------------------------------------------------------
def _profiled(profile_dir: str | None, name: str, fn: Callable[[], None]) -> None:
    """Run ``fn``, under cProfile when ``profile_dir`` is set (stats in PROFILE_DIR/NAME.prof)."""
    if not profile_dir:
        fn()
        return
    import cProfile

    prof = cProfile.Profile()
    try:
        prof.runcall(fn)
    finally:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        prof.dump_stats(str(Path(profile_dir) / f"{name}.prof"))


def _server_main(server_cfg: dict[str, Any], out: Any, profile_dir: str | None = None) -> None:
    import logging

    from secagg.server.config import ServerConfig
    from secagg.server.service import start

    # What a round did (aborts, rejections, dropouts) reaches the summary from the round records;
    # the child's own warnings (e.g. the temporary ledger key it creates) would only break the bars.
    logging.basicConfig(level=logging.ERROR)

    async def main() -> None:
        srv = await start(ServerConfig(**server_cfg), on_round=lambda rid: out.put(("round", rid)))
        out.put(("port", srv.port))
        try:
            await srv.task
        finally:
            await srv.stop()

    try:
        _profiled(profile_dir, "server", lambda: asyncio.run(main()))
        out.put(("server_done", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    except BaseException as exc:  # report, never hang the parent
        out.put(("server_error", f"{type(exc).__name__}: {exc}"))


# ---- client worker processes --------------------------------------------------------------------
def _worker_main(job: dict[str, Any], out: Any) -> None:
    try:
        _profiled(job["cfg"].get("profile_dir"), f"worker-{job['worker']}", lambda: asyncio.run(_worker(job, out)))
        out.put(("worker_done", job["worker"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    except BaseException as exc:
        out.put(("worker_error", f"{type(exc).__name__}: {exc}"))


async def _worker(job: dict[str, Any], out: Any) -> None:
    from secagg.client import AsyncClient, ClientError

    cfg = SimConfig(**job["cfg"])
    plan: dict[int, dict[str, str]] = job["plan"]
    fed = _federation(cfg) if cfg.task == "digits" else None
    models: dict[int, np.ndarray] = {}
    model_lock = asyncio.Lock()
    # inputs are built per client from its seed when its masked input is due and dropped once sent:
    # a worker holds at most VECTOR_SLOTS input vectors, however many clients it runs
    slots = asyncio.Semaphore(VECTOR_SLOTS)

    async def run_client(cid: str, key: bytes) -> None:
        index = int(cid.split("-")[1])
        async with AsyncClient(job["address"], ca_cert=job["ca"], identity_key=key, client_id=cid, server_name="localhost",
                               wait_seconds=job["wait"], policy=cfg.client_policy()) as client:
            for r in range(cfg.rounds):
                drop_at = plan.get(r, {}).get(cid)
                current: dict[str, str] = {}

                def hook(phase: Phase, _drop: str | None = drop_at) -> None:  # noqa: B023 (called within this iteration)
                    if phase.label == _drop:
                        raise SimulatedDropout(phase.label)

                async def make_update(info: Any, current: dict[str, str] = current) -> np.ndarray:
                    current["round_id"] = info.round_id
                    if fed is None:
                        return synthetic_update(cfg.seed, info.round_id, cid, info.dim, cfg.clip_norm)
                    async with model_lock:
                        if info.model_version not in models:
                            models[info.model_version] = (await client.get_model(info.model_version))[1]
                    return fed.update(index, models[info.model_version], info.model_version)

                def encoder(u: np.ndarray, p: EncodingParams, members: int, _seed: bytes, current: dict[str, str] = current) -> np.ndarray:
                    seed = rounding_seed(cfg.seed, current["round_id"], cid)
                    return encode_input(fed, index, u, p, members, seed)

                t0 = time.monotonic()
                try:
                    o = await client.participate(make_update, on_phase=hook, encoder=encoder, vector_slots=slots)
                    out.put(("client", cid, r, o.outcome, o.bytes_sent, o.bytes_received, time.monotonic() - t0))
                except SimulatedDropout as exc:
                    out.put(("client", cid, r, f"dropped before {exc}", 0, 0, time.monotonic() - t0))
                except ClientError as exc:
                    out.put(("client", cid, r, f"error: {exc}", 0, 0, time.monotonic() - t0))

    await asyncio.gather(*(run_client(cid, key) for cid, key in job["clients"]))


def _federation(cfg: SimConfig) -> Any:
    from .fl import Federation

    return Federation(cfg.fl_config())


def encode_input(fed: Any, index: int, update: np.ndarray, params: EncodingParams, members: int, seed: bytes) -> np.ndarray:
    """What client ``index`` puts under its mask: honest clients (and bound-respecting attackers)
    use the library's encoding; a bypassing attacker's own encoder sends raw values."""
    if fed is not None:
        return fed.encode(index, update, params, members, seed)
    return encode(update, params, members, rounding_seed=seed)


class LocalProcesses:
    """Where client workers run by default: processes on this machine, the server on loopback.
    Any other placement (``ray_backend.RayActors``) has the same two members: ``server_host``
    (the server listens there and workers dial it) and a call returning a Process-like worker."""

    kind = "processes"
    server_host = "127.0.0.1"

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx

    def __call__(self, job: dict[str, Any], events: Any, name: str) -> Any:
        return self._ctx.Process(target=_worker_main, args=(job, events), name=name, daemon=True)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


# ---- the parent: orchestration, oracle, summary --------------------------------------------------
def run_simulation(cfg: SimConfig, *, progress: Callable[[str, dict[str, Any]], None] | None = None,
                   workers_on: Any = None) -> dict[str, Any]:
    """Run the whole simulation; returns the summary (see ``secagg simulate --json``). Client workers
    run where ``workers_on`` puts them (default: ``LocalProcesses``)."""
    from secagg.server.store import Store
    from secagg.server.tls import write_dev_pki
    from secagg.wire.identity import identity_public_key, new_identity_key

    cfg.validate()
    fed = _federation(cfg) if cfg.task == "digits" else None
    dim = fed.dim if fed is not None else cfg.dim
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="secagg-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "secagg.db"
    if db.exists():
        raise SimulationError(f"{db} exists; give --workdir a fresh directory")
    pki = write_dev_pki(work / "pki")
    keys = {client_id(i): new_identity_key() for i in range(cfg.clients)}
    with Store(db) as store:
        for cid, key in keys.items():
            store.register_identity(cid, identity_public_key(key))
    init_model = ""
    if fed is not None:
        init_model = str(work / "init.npy")
        np.save(init_model, fed.initial_params())
    ctx = mp.get_context("spawn")
    launch = workers_on or LocalProcesses(ctx)
    server_cfg = dict(address=_host_port(launch.server_host, 0), db=str(db), tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), dim=dim,
                      init_model=init_model, rounds=cfg.rounds, linger_seconds=0.0, min_clients=cfg.clients, max_clients=cfg.clients, lobby_seconds=0.0,
                      groups=cfg.groups, grouping=cfg.grouping, epoch_rounds=cfg.epoch_rounds, mode=cfg.mode,
                      neighbors=cfg.neighbors, threshold=cfg.threshold, phase_seconds=cfg.phase_seconds, chunk_words=cfg.chunk_words, clip_norm=cfg.clip_norm,
                      clip_value=cfg.clip_value, precision_bits=cfg.precision_bits, rule=cfg.rule,
                      byzantine_groups=cfg.byzantine_groups)
    events = ctx.Queue()
    t_start = time.monotonic()
    server = ctx.Process(target=_server_main, args=(server_cfg, events, cfg.profile_dir), name="secagg-server", daemon=True)
    with _single_threaded_children():
        server.start()
    workers: list[Any] = []
    client_rows: list[tuple] = []
    peak_rss_kb = 0
    worker_rss_kb: dict[int, int] = {}
    try:
        port = _await_port(events, server)
        plan = drop_plan(cfg)
        ids = sorted(keys)
        for w in range(min(cfg.processes, cfg.clients)):
            # everything by value (CA certificate, identity keys): a worker may be on another machine
            job = {"worker": w, "cfg": asdict(cfg), "plan": plan, "address": _host_port(launch.server_host, port),
                   "ca": pki.ca_cert.read_bytes(), "wait": client_wait_seconds(cfg, dim),
                   "clients": [(c, keys[c]) for c in ids[w :: cfg.processes]]}
            p = launch(job, events, f"secagg-worker-{w}")
            with _single_threaded_children():
                p.start()
            workers.append(p)
        rounds_done = 0
        server_done = False
        while not server_done:
            try:
                ev = events.get(timeout=1.0)
            except queue.Empty:
                if not server.is_alive():
                    raise SimulationError("the server process died; rerun with --workdir DIR and look at DIR/secagg.db") from None
                continue
            kind = ev[0]
            if kind == "client":
                client_rows.append(ev[1:])
                if progress:
                    progress("client", {"client": ev[1], "round": ev[2], "outcome": ev[3]})
            elif kind == "round":
                rounds_done += 1
                if progress:
                    progress("round", {"round_id": ev[1], "done": rounds_done, "total": cfg.rounds})
            elif kind == "server_done":
                peak_rss_kb = ev[1]
                server_done = True
            elif kind == "worker_done":
                worker_rss_kb[ev[1]] = ev[2]
            elif kind in ("server_error", "worker_error"):
                raise SimulationError(f"{kind.split('_')[0]} failed: {ev[1]}")
        for p in workers:
            p.join(timeout=30)
        while True:  # late client reports
            try:
                ev = events.get_nowait()
            except queue.Empty:
                break
            if ev[0] == "client":
                client_rows.append(ev[1:])
                if progress:
                    progress("client", {"client": ev[1], "round": ev[2], "outcome": ev[3]})
            elif ev[0] == "worker_done":
                worker_rss_kb[ev[1]] = ev[2]
        wall = time.monotonic() - t_start
        with Store(db) as store:
            summary = summarize(cfg, store, client_rows, fed, dim)
        summary.update(wall_seconds=wall, server_peak_rss_mb=peak_rss_kb / 1024,
                       worker_peak_rss_mb=[worker_rss_kb[w] / 1024 for w in sorted(worker_rss_kb)],
                       workdir=str(work) if cfg.workdir else None, workers=launch.kind)
        return summary
    finally:
        for p in [*workers, server]:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)
        if not cfg.workdir:
            shutil.rmtree(work, ignore_errors=True)


# The simulator runs a server and several workers on the same cores: a BLAS thread pool per process
# only fights the others (np.dot of a 10^5-vector measured 16 ms threaded vs 16 us on one thread here).
_ONE_THREAD = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Children started inside inherit one-thread BLAS settings; this process's environment is restored."""
    saved = {k: os.environ.get(k) for k in _ONE_THREAD}
    os.environ.update(_ONE_THREAD)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _await_port(events: Any, server: Any) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ev = events.get(timeout=0.5)
        except queue.Empty:
            if not server.is_alive():
                raise SimulationError("the server process exited before listening") from None
            continue
        if ev[0] == "port":
            return int(ev[1])
        if ev[0] == "server_error":
            raise SimulationError(f"server failed to start: {ev[1]}")
    raise SimulationError("the server did not start listening within 60 s")


def expected_sums(cfg: SimConfig, record: Any, fed: Any, model: np.ndarray | None, dim: int) -> dict[int, np.ndarray]:
    """The oracle: plaintext sums of the survivors' encoded inputs, per completed group."""
    params = cfg.encoding
    errors = record.timings.get("group_errors", {})
    sums = {}
    for g, members in enumerate(record.groups):
        if str(g) in errors:
            continue
        survivors = record.survivors.get("masked_input", {}).get(str(g), [])
        dtype = params.dtype(len(members))
        total = np.zeros(dim + 2, dtype=dtype)
        for cid in survivors:
            index = int(cid.split("-")[1])
            if fed is None:
                update = synthetic_update(cfg.seed, record.round_id, cid, dim, cfg.clip_norm)
            else:
                update = fed.update(index, model, record.settings["model_version"])
            total += encode_input(fed, index, update, params, len(members), rounding_seed(cfg.seed, record.round_id, cid))
        sums[g] = total
    return sums


def server_phases(rec: Any, unit: Any) -> dict[str, dict[str, float | None]]:
    """Per phase, the slowest group's seconds (wall), its own work and the process's CPU while it was
    open, beside the PRG+add bound of ``secagg bench`` for the work (summing, unmasking)."""
    from secagg.protocol.bench import server_bounds

    t = rec.timings
    out: dict[str, dict[str, float | None]] = {}
    for g, wall in t.get("groups", {}).items():
        work, cpu = t.get("work", {}).get(g, {}), t.get("cpu", {}).get(g, {})
        survivors = len(rec.survivors.get("masked_input", {}).get(g, []))
        bounds = {p.label: b for p, b in server_bounds(unit, survivors=survivors,
                                                       expansions=t.get("unmask_expansions", {}).get(g, 0)).items()}
        for ph, seconds in wall.items():
            w, bound = work.get(ph, 0.0), bounds.get(ph)
            row = {"seconds": seconds, "work_seconds": w, "cpu_seconds": cpu.get(ph, 0.0), "bound_seconds": bound,
                   "ratio": w / bound if bound else None}
            if ph not in out or seconds > out[ph]["seconds"]:  # type: ignore[operator]
                out[ph] = row
    return out


def summarize(cfg: SimConfig, store: Any, client_rows: list[tuple], fed: Any, dim: int) -> dict[str, Any]:
    from secagg.protocol.bench import measure_unit_costs

    records = list(reversed(store.rounds(limit=cfg.rounds)))
    bits = {gc["modulus_bits"] for rec in records for gc in rec.settings.get("group_configs", [])} or {32}
    dtype = np.dtype(np.uint64 if 64 in bits else np.uint32)
    unit = measure_unit_costs(dim + 2, dtype, repeat=9)   # here, after the run, on the same machine
    per_round = []
    for r, rec in enumerate(records):
        model = store.model(rec.settings["model_version"]).params if fed is not None else None
        exp = expected_sums(cfg, rec, fed, model, dim)
        # a round where every group aborted released nothing: correct if nothing was recorded
        correct = sums_digest(exp) == rec.aggregate_digest if exp else rec.aggregate_digest is None
        rows = [row for row in client_rows if row[1] == r]
        sent = [row[3] for row in rows if row[3]]
        recv = [row[4] for row in rows if row[4]]
        group_t = rec.timings.get("groups", {})
        seconds = {ph: max((t.get(ph, 0.0) for t in group_t.values()), default=0.0) for ph in PHASES if any(ph in t for t in group_t.values())}
        entry: dict[str, Any] = {
            "round": r,
            "round_id": rec.round_id,
            "outcome": rec.outcome,
            "error": rec.error,
            "correct": correct,
            "survivors": {ph: sum(len(v) for v in groups.values()) for ph, groups in rec.survivors.items()},
            "dropouts": len(rec.dropouts),
            "seconds": seconds,
            "server": server_phases(rec, unit),
            "round_seconds": rec.timings.get("total", 0.0),
            "bytes_sent_per_client": float(np.mean(sent)) if sent else 0.0,
            "bytes_received_per_client": float(np.mean(recv)) if recv else 0.0,
            "rejected_groups": [{"group": c["group"], "reasons": c["reasons"]} for c in rec.checks if not c["accepted"]],
            "model_version": rec.model_version,
        }
        if fed is not None and rec.model_version is not None:
            entry.update({k: float(v) for k, v in fed.evaluate(store.model(rec.model_version).params).items() if v is not None})
        per_round.append(entry)
    return {"config": asdict(cfg), "dim": dim, "rounds": per_round, "vector_mb": (dim + 2) * dtype.itemsize / 2**20,
            "unit_costs": {"prg_seconds": unit.prg_seconds, "add_seconds": unit.add_seconds, "dtype": dtype.name}, "correct": all(x["correct"] for x in per_round) and len(per_round) == cfg.rounds}
