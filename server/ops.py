"""What an operator runs beside the service: one server per database and port, the standard gRPC
health and reflection services, and Prometheus metrics.

The health, reflection and metrics packages are the ``server`` extra (``pip install
'secagg[server]'``); they are imported only here and only when a server starts, so the client
library and the read-only CLI do not need them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError

if TYPE_CHECKING:
    import grpc

    from .rounds import Coordinator
    from .store import RoundRecord, Store

log = logging.getLogger("secagg.server")

EXTRA_HINT = "pip install 'secagg[server]'"
SERVICE_NAME = "secagg.v1.SecAgg"


def _need(what: str, module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the server extra, which is not installed: {EXTRA_HINT}") from None


# -- one server per database ----------------------------------------------------------------------

class DatabaseLock:
    """An exclusive ``flock`` on ``DB.lock``, held for the server's lifetime.

    A second server on the same database would close the first one's running round as
    "interrupted" and then race it on every write, so it is refused before it touches anything.
    Read-only and admin commands (``secagg rounds``, ``events``, ``register``...) do not take the
    lock: SQLite's WAL lets them work beside the server. The lock goes away with the process,
    however it ends (a crash or ``kill -9`` never leaves a stale lock behind); the file stays.
    """

    def __init__(self, path: str, fd: int | None) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, db: str) -> DatabaseLock:
        path = os.path.realpath(db) + ".lock"   # the same file whatever path or symlink names the database
        try:
            import fcntl
        except ImportError:   # not POSIX: no lock, say so
            log.warning("no file locking on this platform: nothing stops a second server on %s", db)
            return cls(path, None)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot open the database {db}: cannot create its lock file {path}: {exc.strerror}; "
                              "check that its directory exists and is writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"database {db} is in use by another secagg server{holder}; stop it first, or pass "
                                  "another --db") from None
            raise ConfigError(f"cannot lock the database {db} ({path}): {exc.strerror}") from None
        lock = cls(path, fd)
        lock.describe()
        return lock

    def describe(self, address: str = "") -> None:
        """Write who holds the lock into the file, for the message a second server prints."""
        if self._fd is None:
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "address": address,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing the descriptor drops the flock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        parts = [f"pid {int(info['pid'])}" + (f" on {info['host']}" if info.get("host") else "")]
        if info.get("address"):
            parts.append(f"listening on {info['address']}")
        if info.get("since"):
            parts.append(f"since {info['since']}")
        return f" ({', '.join(parts)})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


# -- one server per port --------------------------------------------------------------------------

def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (a bind without SO_REUSEPORT fails)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def port_taken(address: str) -> ConfigError | None:
    """The error for a HOST:PORT something already listens on (None when free, or port 0)."""
    host, _, text = address.rpartition(":")
    port = int(text)
    if not port or not port_in_use(host, port):
        return None
    return ConfigError(f"cannot listen on {address}: port {port} is already in use{port_holder(port)}; "
                       "stop that server or choose another --address")


def port_holder(port: int) -> str:
    """Best effort (Linux ``/proc``): which process listens on TCP ``port``, e.g. " (pid 12, secagg serve ...)"."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:   # 0A: LISTEN
                inodes.add(fields[9])
    if not inodes:
        return ""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return ""
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    who = "this process" if int(pid) == os.getpid() else "pid " + pid
                    return f" (by {who}{': ' + cmd[:100] if cmd else ''})"
        except OSError:
            continue
    return ""


# -- health and reflection ------------------------------------------------------------------------

def check_extra() -> None:
    """The health and reflection services are always on: refuse to start without their packages."""
    _need("the gRPC health service", "grpc_health.v1.health")
    _need("gRPC server reflection", "grpc_reflection.v1alpha.reflection")


def add_health_and_reflection(server: grpc.aio.Server) -> Any:
    """Add ``grpc.health.v1.Health`` and server reflection; returns the health servicer."""
    health = _need("the gRPC health service", "grpc_health.v1.health")
    health_pb2 = _need("the gRPC health service", "grpc_health.v1.health_pb2")
    health_pb2_grpc = _need("the gRPC health service", "grpc_health.v1.health_pb2_grpc")
    reflection = _need("gRPC server reflection", "grpc_reflection.v1alpha.reflection")
    servicer = health.aio.HealthServicer()   # nobody can ask before the server starts; then set_serving
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    return servicer


async def set_serving(health: Any, serving: bool = True) -> None:
    from grpc_health.v1 import health_pb2

    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", SERVICE_NAME):
        await health.set(service, status)


# -- metrics --------------------------------------------------------------------------------------

_PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ROUND_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """Prometheus metrics of one server, in a registry of its own (several servers may share a process).

    Counters move as things happen: every rejection and drop the coordinator records
    (``observe_event``) and every finished round, read back from its durable record
    (``observe_round``), so the metrics say what the records say. Gauges are read at scrape time.
    """

    def __init__(self, coordinator: Coordinator, store: Store) -> None:
        prom = _need("--metrics-port", "prometheus_client")
        self.registry = r = prom.CollectorRegistry()
        self.rounds = prom.Counter("secagg_rounds", "Rounds finished, by outcome", ["outcome"], registry=r)
        for outcome in ("completed", "aborted", "failed"):
            self.rounds.labels(outcome)
        self.round_seconds = prom.Histogram("secagg_round_duration_seconds", "Wall time of each finished round",
                                            buckets=_ROUND_BUCKETS, registry=r)
        self.phase_seconds = prom.Histogram("secagg_phase_duration_seconds", "Time each group spent in each phase",
                                            ["phase"], buckets=_PHASE_BUCKETS, registry=r)
        self.dropouts = prom.Counter("secagg_dropouts", "Clients dropped from a round, by phase and reason",
                                     ["phase", "reason"], registry=r)
        self.events = prom.Counter("secagg_rejections", "Rejected streams and messages and dropped clients, by "
                                   "event kind and the gRPC status sent", ["kind", "status"], registry=r)
        self.group_checks = prom.Counter("secagg_group_checks", "Group sums checked, by result", ["result"], registry=r)
        for result in ("accepted", "rejected"):
            self.group_checks.labels(result)
        self.clients = prom.Counter("secagg_round_clients", "Clients taken into rounds (cohort members)", registry=r)
        self.model_version = prom.Gauge("secagg_model_version", "Newest model version", registry=r)
        self.model_version.set(store.latest_version() or 0)
        prom.Gauge("secagg_connected_clients", "Authenticated streams open now", registry=r).set_function(
            lambda: len(coordinator.sessions))
        prom.Gauge("secagg_lobby_clients", "Clients waiting for the next round", registry=r).set_function(
            lambda: len(coordinator.lobby))
        prom.Gauge("secagg_round_running", "1 while a round runs", registry=r).set_function(
            lambda: 1 if coordinator.round_id else 0)
        self._http: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def observe_event(self, kind: str, status: str, count: int = 1) -> None:
        self.events.labels(kind, status).inc(count)

    def observe_round(self, record: RoundRecord) -> None:
        self.rounds.labels(record.outcome).inc()
        self.clients.inc(len(record.cohort))
        timings = record.timings or {}
        if isinstance(timings.get("total"), (int, float)):
            self.round_seconds.observe(timings["total"])
        for phases in (timings.get("groups") or {}).values():
            for phase, seconds in phases.items():
                self.phase_seconds.labels(phase).observe(seconds)
        for d in record.dropouts:
            self.dropouts.labels(str(d.get("phase", "")), str(d.get("reason", ""))).inc()
        for check in record.checks:
            self.group_checks.labels("accepted" if check.get("accepted") else "rejected").inc()
        if record.model_version is not None:
            self.model_version.set(record.model_version)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over plain HTTP on ``host:port`` (0: any free port); returns the port."""
        from prometheus_client import start_http_server

        host = host.strip("[]")
        try:
            self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
                              f"{port_holder(port) if exc.errno == errno.EADDRINUSE else ''}; choose another --metrics-port") from None
        self.port = int(self._http.server_address[1])
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
