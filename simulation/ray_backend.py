"""Ray, for when one machine is not enough: a study's runs as Ray tasks, simulated clients as Ray actors.

Ray is the optional extra ``secagg[ray]``. Nothing else in secagg imports it, and this module
imports it only inside ``require_ray``, so the core and the client library never pay for it.

- ``ray_session(address, num_cpus=...)`` starts a small local Ray (``address=None``) or joins a
  running cluster (``HOST:6379``, ``auto``, ``ray://HOST:10001``), and shuts Ray down afterwards.
- ``RayExecutor`` is a ``concurrent.futures.Executor`` whose ``submit`` runs the function as a
  Ray task; ``run_study(executor=...)`` spreads a sweep with it exactly as over a process pool.
- ``RayActors`` places ``secagg simulate``'s client workers as Ray actors. Each actor gets what it
  needs by value (CA certificate bytes, its clients' identity keys, the server address), never a
  file path on the head machine, and connects to the server over gRPC with TLS.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from types import ModuleType
from typing import Any

__all__ = ["INSTALL_HINT", "RayActors", "RayExecutor", "RayUnavailable", "RayUnreachable", "node_ip", "ray_session", "require_ray"]

#: secagg is installed from a checkout (it is not on PyPI), like its other extras
INSTALL_HINT = "install the extra secagg[ray]: `python -m pip install '.[ray]'` in the secagg checkout"
MIN_VERSION = (2, 9)
#: the local Ray's object store: runs and client workers pass small objects only
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024


class RayUnavailable(RuntimeError):
    """Ray is not installed or too old; the message names the extra to install."""


class RayUnreachable(RayUnavailable):
    """The Ray cluster at the given address cannot be reached."""


def require_ray() -> ModuleType:
    """Import Ray, or raise RayUnavailable naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"--ray needs Ray, which is not installed; {INSTALL_HINT}") from None
    version = tuple(int(p) for p in ray.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_VERSION:
        raise RayUnavailable(f"--ray needs Ray >= {'.'.join(map(str, MIN_VERSION))}, found {ray.__version__}; "
                             f"{INSTALL_HINT} (it asks for ray>=2.9)")
    return ray


@contextmanager
def ray_session(address: str | None, *, num_cpus: int) -> Iterator[ModuleType]:
    """Ray for the length of the block: a local instance with ``num_cpus`` CPUs and no dashboard when
    ``address`` is None, else the cluster at ``address``. A Ray that is already initialised is used
    as it is and left running."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is not None:
        _probe(address)
    try:
        if address is None:
            # "local" rather than None: a RAY_ADDRESS in the environment must not send a local run to a cluster
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        raise RayUnreachable(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _probe(address: str, timeout: float = 5.0) -> None:
    """Refuse a ``HOST:PORT`` nothing listens on now; ``ray.init`` would retry it for minutes."""
    if address == "auto" or "://" in address:
        return  # Ray finds (or rejects) these itself, quickly
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RayUnreachable(f"the Ray address must be HOST:PORT (e.g. 10.0.0.5:6379), auto or ray://HOST:10001, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayUnreachable(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start its head with "
                             f"`ray start --head` and pass the address it prints") from None


def node_ip(ray: ModuleType) -> str:
    """This machine's address as the Ray cluster sees it (where its nodes reach the driver)."""
    return str(ray.util.get_node_ip_address())


# ---- study: runs as Ray tasks ------------------------------------------------------------------------

class RayExecutor(Executor):
    """``submit(fn, *args)`` runs ``fn`` as a Ray task of ``num_cpus`` CPUs; the future resolves to its
    result. ``fn`` must be importable on every node (a module-level function of secagg)."""

    def __init__(self, ray: ModuleType, *, num_cpus: float = 1) -> None:
        self._ray = ray
        self._num_cpus = num_cpus
        self._remote: dict[Callable[..., Any], Any] = {}
        self._refs: list[Any] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if fn not in self._remote:
            self._remote[fn] = self._ray.remote(num_cpus=self._num_cpus, max_retries=0)(fn)
        ref = self._remote[fn].remote(*args, **kwargs)
        self._refs.append(ref)
        return ref.future()  # type: ignore[no-any-return]

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            for ref in self._refs:
                self._ray.cancel(ref, force=True)
        elif wait and self._refs:
            self._ray.wait(self._refs, num_returns=len(self._refs))
        self._refs = []


# ---- simulate: client workers as Ray actors --------------------------------------------------------

class _ClientWorker:
    """The body of one Ray actor: runs the simulator's client worker and keeps its events until the
    driver collects them (two threads: ``run`` works while ``drain`` answers)."""

    def __init__(self) -> None:
        self._events: collections.deque[tuple[Any, ...]] = collections.deque()

    def put(self, event: tuple[Any, ...]) -> None:  # the worker's result queue
        self._events.append(event)

    def run(self, job: dict[str, Any]) -> None:
        from .simulate import _worker_main

        _worker_main(job, self)

    def drain(self) -> list[tuple[Any, ...]]:
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out


class _ActorProcess:
    """A Ray actor running one client worker, behind the ``multiprocessing.Process`` methods the
    simulator uses (start, is_alive, join, terminate). A thread relays the actor's events into the
    simulator's event queue while it runs."""

    POLL_SECONDS = 0.5

    def __init__(self, ray: ModuleType, job: dict[str, Any], events: Any, name: str) -> None:
        self._ray, self._job, self._events, self.name = ray, job, events, name
        self._actor: Any = None
        self._thread = threading.Thread(target=self._relay, name=f"relay-{name}", daemon=True)

    def start(self) -> None:
        actor_cls = self._ray.remote(_ClientWorker)
        self._actor = actor_cls.options(num_cpus=1, max_concurrency=2, scheduling_strategy="SPREAD",
                                        max_restarts=0).remote()
        self._done = self._actor.run.remote(self._job)
        self._thread.start()

    def _relay(self) -> None:
        ray = self._ray
        try:
            while True:
                ready, _ = ray.wait([self._done], timeout=self.POLL_SECONDS)
                for event in ray.get(self._actor.drain.remote()):
                    self._events.put(event)
                if ready:
                    ray.get(self._done)
                    return
        except Exception as exc:  # the actor died or could not start: the simulator reports it
            self._events.put(("worker_error", f"Ray actor {self.name}: {type(exc).__name__}: {exc}"))
        finally:
            ray.kill(self._actor)  # done: free its CPU now rather than at shutdown

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join(timeout)

    def terminate(self) -> None:
        if self._actor is not None:
            self._ray.kill(self._actor)


class RayActors:
    """Where ``run_simulation`` puts its client workers: one Ray actor (1 CPU) per worker, spread
    over the cluster's nodes. ``server_host`` is the address the server listens on and the actors
    dial; it must be reachable from every node."""

    kind = "ray"

    def __init__(self, ray: ModuleType, server_host: str) -> None:
        self._ray = ray
        self.server_host = server_host

    def __call__(self, job: dict[str, Any], events: Any, name: str) -> _ActorProcess:
        return _ActorProcess(self._ray, job, events, name)
