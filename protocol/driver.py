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
from .messages import AggregateResult, GroupConfig, Mode, PassStart, Phase, wire_size
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


class GroupDriver:
    """One group's client machines and server machine, moving messages as a transport would.

    ``run_group`` drives a single-pass round through it; a multi-pass round opens each pass with
    ``run_pass`` once every group's previous pass is summed (the estimate needs them all)."""

    def __init__(
        self,
        config: GroupConfig,
        *,
        identity_keys: Mapping[int, bytes] | None = None,
        randbytes: Callable[[int], bytes] | Mapping[int, Callable[[int], bytes]] = os.urandom,
        policy: ClientPolicy | None = None,
        contributions: Mapping[int, bytes] | None = None,
    ) -> None:
        if contributions is None:
            if config.commitments:
                raise ValueError("a config with commitments needs the members' contributions")
            config, contributions = with_contributions(config, randbytes)
        policy = ClientPolicy.lenient() if policy is None else policy
        identities = None
        if config.mode is Mode.ACTIVE:
            from .signatures import public_key

            if identity_keys is None:
                raise ValueError("active mode needs identity_keys")
            identities = {i: public_key(k) for i, k in identity_keys.items()}
        self.config = config
        self.run = GroupRun(None, {p: PhaseStats() for p in Phase}, config=config)
        self.clients: dict[int, ClientMachine] = {}
        for i in range(1, config.members + 1):
            rb = randbytes[i] if isinstance(randbytes, Mapping) else randbytes
            self.clients[i] = ClientMachine(config, i, contribution=contributions[i], identity_key=(identity_keys or {}).get(i),
                                            policy=policy, randbytes=rb)
        self.server = ServerMachine(config, identities=identities)
        self.inbox: dict[int, object] = {i: None for i in self.clients}
        self.pass_results: list[AggregateResult] = []

    def step(self, phase: Phase, act: Callable[[ClientMachine, object], object], vanish: frozenset[int] = frozenset()) -> None:
        """Every client with a message answers it (``vanish`` go silently), then the phase closes."""
        run, server, inbox = self.run, self.server, self.inbox
        st = run.stats[phase]
        for i in sorted(inbox):
            if i in vanish:
                server.drop(i, DropReason.DISCONNECTED, f"vanished before {phase.label}")
                continue
            t0 = time.perf_counter()
            try:
                reply = act(self.clients[i], inbox[i])
            except (AbortError, RemoteProtocolError) as exc:  # the client refused to go on
                run.client_aborts[i] = str(exc)
                server.drop(i, DropReason.ABORTED, str(exc))
                continue
            finally:
                st.client_seconds.append(time.perf_counter() - t0)
            if reply is None:   # a message that needs no answer (multi-pass share delivery)
                continue
            st.bytes_up += wire_size(reply)
            t0 = time.perf_counter()
            try:
                server.receive(reply)  # type: ignore[arg-type]
            except RemoteProtocolError as exc:  # the server rejected (and dropped) this client
                run.rejections[i] = str(exc)
            st.server_seconds += time.perf_counter() - t0
        if phase is Phase.SHARE_KEYS and self.config.multipass:
            return   # the deliveries wait in the inbox; the first pass collects nothing more
        t0 = time.perf_counter()
        out = server.close_phase()
        st.server_seconds += time.perf_counter() - t0
        st.bytes_down += sum(wire_size(m) for m in out.values())
        run.survivors[phase] = frozenset(server.received[phase])
        inbox.clear()
        inbox.update(out)

    def unmask_steps(self, drops: Mapping[Phase, frozenset[int]]) -> None:
        if self.config.mode is Mode.ACTIVE:
            self.step(Phase.CONSISTENCY_CHECK, lambda c, m: c.consistency_check(m), drops.get(Phase.CONSISTENCY_CHECK, frozenset()))  # type: ignore[arg-type]
        self.step(Phase.UNMASKING, lambda c, m: c.unmask(m), drops.get(Phase.UNMASKING, frozenset()))  # type: ignore[arg-type]

    def keys(self, drops: Mapping[Phase, frozenset[int]]) -> None:
        self.step(Phase.ADVERTISE_KEYS, lambda c, _m: c.advertise_keys(), drops.get(Phase.ADVERTISE_KEYS, frozenset()))
        self.step(Phase.SHARE_KEYS, lambda c, m: c.share_keys(m), drops.get(Phase.SHARE_KEYS, frozenset()))  # type: ignore[arg-type]
        if self.config.multipass:   # the shares are delivered now; each pass opens with its public value
            out = self.server.close_phase()
            self.run.survivors[Phase.SHARE_KEYS] = frozenset(self.server.received[Phase.SHARE_KEYS])
            for i, delivery in out.items():
                try:
                    self.clients[i].receive_shares(delivery)  # type: ignore[arg-type]
                except (AbortError, RemoteProtocolError) as exc:
                    self.run.client_aborts[i] = str(exc)
                    self.server.drop(i, DropReason.ABORTED, str(exc))

    def run_pass(self, public: np.ndarray, input_for: Callable[[int, PassStart], np.ndarray], *,
                 left: frozenset[int] = frozenset(), drops: Mapping[Phase, frozenset[int]] | None = None) -> AggregateResult:
        """One pass of a multi-pass round: ``left`` closed their streams before it opened (the server
        knows), ``drops[phase]`` vanish before sending that phase's message; ``input_for(index,
        start)`` is a client's encoded input for it.  Raises AbortError when the group aborts."""
        drops = drops or {}
        for i in sorted(left):
            self.server.drop(i, DropReason.DISCONNECTED, "left between passes")
        out = self.server.start_pass(public)
        self.inbox.clear()
        self.inbox.update(out)
        self.step(Phase.MASKED_INPUT, lambda c, m: c.pass_input(m, input_for(c.index, m)), drops.get(Phase.MASKED_INPUT, frozenset()))  # type: ignore[arg-type]
        self.unmask_steps(drops)
        assert self.server.result is not None
        self.pass_results.append(self.server.result)
        self.run.result = self.server.result
        return self.server.result


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
    if config.multipass:
        raise ValueError("run_group runs single-pass rounds; drive a multi-pass round with GroupDriver.run_pass")
    g = GroupDriver(config, identity_keys=identity_keys, randbytes=randbytes, policy=policy, contributions=contributions)
    vanish = {p: frozenset(v) for p, v in (drops or {}).items()}
    try:
        g.keys(vanish)
        g.step(Phase.MASKED_INPUT, lambda c, m: c.masked_input(m, inputs[c.index]), vanish.get(Phase.MASKED_INPUT, frozenset()))  # type: ignore[arg-type]
        g.unmask_steps(vanish)
    except AbortError as exc:
        g.run.aborted = str(exc)
        return g.run
    g.run.result = g.server.result
    return g.run


def deterministic_randbytes(seed: bytes) -> Callable[[int], bytes]:
    """A reproducible randomness source (AES-CTR keystream under ``seed``) for tests and replays."""
    from .prg import _encryptor

    stream = _encryptor(seed)
    return lambda n: stream.update(bytes(n))
