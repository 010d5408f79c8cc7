"""The in-memory driver: N client machines and one server machine in one process.

It moves messages exactly as a transport would, and measures per phase the client and server
seconds and the payload bytes each way.  Tests and ``secagg bench`` use it; the gRPC path must
produce bit-identical aggregates for the same seeds.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .client import ClientMachine
from .graph import commit_contribution
from .policy import ClientPolicy
from .errors import AbortError, DropReason, RemoteProtocolError
from .messages import AggregateResult, GroupConfig, Mode, Phase, wire_size
from .server import ServerMachine


@dataclass
class PhaseStats:
    client_seconds: list[float] = field(default_factory=list)   # one entry per client that worked
    server_seconds: float = 0.0
    bytes_up: int = 0      # client -> server, all clients
    bytes_down: int = 0    # server -> clients, all clients

    @property
    def client_mean(self) -> float:
        return float(np.mean(self.client_seconds)) if self.client_seconds else 0.0

    @property
    def client_max(self) -> float:
        return max(self.client_seconds, default=0.0)


@dataclass
class GroupRun:
    result: AggregateResult | None
    stats: dict[Phase, PhaseStats]
    aborted: str = ""                       # why the group aborted, empty if it completed
    client_aborts: dict[int, str] = field(default_factory=dict)
    rejections: dict[int, str] = field(default_factory=dict)   # messages the server refused
    survivors: dict[Phase, frozenset[int]] = field(default_factory=dict)
    config: GroupConfig | None = None       # what ran: the given config with the members' commitments


def with_contributions(config: GroupConfig, randbytes: Callable[[int], bytes] | Mapping[int, Callable[[int], bytes]] = os.urandom
                       ) -> tuple[GroupConfig, dict[int, bytes]]:
    """Draw each member's contribution and put its commitment in the configuration (what the
    gRPC server does with the commitments from the members' hellos)."""
    contributions = {i: (randbytes[i] if isinstance(randbytes, Mapping) else randbytes)(32) for i in range(1, config.members + 1)}
    commitments = tuple(commit_contribution(contributions[i]) for i in range(1, config.members + 1))
    return dataclasses.replace(config, commitments=commitments), contributions


def run_group(
    config: GroupConfig,
    inputs: Mapping[int, np.ndarray],
    *,
    drops: Mapping[Phase, set[int] | frozenset[int]] | None = None,
    identity_keys: Mapping[int, bytes] | None = None,
    randbytes: Callable[[int], bytes] | Mapping[int, Callable[[int], bytes]] = os.urandom,
    policy: ClientPolicy | None = None,
    contributions: Mapping[int, bytes] | None = None,
) -> GroupRun:
    """Run one group's protocol.  ``drops[p]`` are the clients that vanish before sending phase p.

    ``inputs`` are encoded vectors (config.dim words of config.dtype) for indices 1..m.
    ``randbytes`` is os.urandom, or one deterministic source per client index for test vectors.
    ``policy`` is every client's (``ClientPolicy.lenient()`` by default: the in-memory server is
    honest).  A config without commitments gets fresh contributions (``with_contributions``).
    """
    if contributions is None:
        if config.commitments:
            raise ValueError("a config with commitments needs the members' contributions")
        config, contributions = with_contributions(config, randbytes)
    policy = ClientPolicy.lenient() if policy is None else policy
    drops = {p: frozenset(v) for p, v in (drops or {}).items()}
    identities = None
    if config.mode is Mode.ACTIVE:
        from .signatures import public_key

        if identity_keys is None:
            raise ValueError("active mode needs identity_keys")
        identities = {i: public_key(k) for i, k in identity_keys.items()}
    stats = {p: PhaseStats() for p in Phase}
    run = GroupRun(None, stats, config=config)
    clients: dict[int, ClientMachine] = {}
    for i in range(1, config.members + 1):
        rb = randbytes[i] if isinstance(randbytes, Mapping) else randbytes
        clients[i] = ClientMachine(config, i, contribution=contributions[i], identity_key=(identity_keys or {}).get(i),
                                   policy=policy, randbytes=rb)
    server = ServerMachine(config, identities=identities)
    inbox: dict[int, object] = {i: None for i in clients}

    def step(phase: Phase, act: Callable[[ClientMachine, object], object]) -> None:
        st = stats[phase]
        for i in sorted(inbox):
            if i in drops.get(phase, ()):
                server.drop(i, DropReason.DISCONNECTED, f"vanished before {phase.label}")
                continue
            t0 = time.perf_counter()
            try:
                reply = act(clients[i], inbox[i])
            except (AbortError, RemoteProtocolError) as exc:  # the client refused to go on
                run.client_aborts[i] = str(exc)
                server.drop(i, DropReason.ABORTED, str(exc))
                continue
            finally:
                st.client_seconds.append(time.perf_counter() - t0)
            st.bytes_up += wire_size(reply)
            t0 = time.perf_counter()
            try:
                server.receive(reply)  # type: ignore[arg-type]
            except RemoteProtocolError as exc:  # the server rejected (and dropped) this client
                run.rejections[i] = str(exc)
            st.server_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        out = server.close_phase()
        st.server_seconds += time.perf_counter() - t0
        st.bytes_down += sum(wire_size(m) for m in out.values())
        run.survivors[phase] = frozenset(server.received[phase])
        inbox.clear()
        inbox.update(out)

    phases: list[tuple[Phase, Callable[[ClientMachine, object], object]]] = [
        (Phase.ADVERTISE_KEYS, lambda c, _m: c.advertise_keys()),
        (Phase.SHARE_KEYS, lambda c, m: c.share_keys(m)),  # type: ignore[arg-type]
        (Phase.MASKED_INPUT, lambda c, m: c.masked_input(m, inputs[c.index])),  # type: ignore[arg-type]
    ]
    if config.mode is Mode.ACTIVE:
        phases.append((Phase.CONSISTENCY_CHECK, lambda c, m: c.consistency_check(m)))  # type: ignore[arg-type]
    phases.append((Phase.UNMASKING, lambda c, m: c.unmask(m)))  # type: ignore[arg-type]
    try:
        for phase, act in phases:
            step(phase, act)
    except AbortError as exc:
        run.aborted = str(exc)
        return run
    run.result = server.result
    return run


def deterministic_randbytes(seed: bytes) -> Callable[[int], bytes]:
    """A reproducible randomness source (AES-CTR keystream under ``seed``) for tests and replays."""
    from .prg import _encryptor

    stream = _encryptor(seed)
    return lambda n: stream.update(bytes(n))
