"""Server settings: from a TOML file, overridden by command-line flags.

Everything that shapes a round (cohort, groups, mode, bounds, rule) lives here and is copied
into every round record, so a record says exactly how its round was run.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secagg.protocol import thresholds
from secagg.protocol.encoding import EncodingParams
from secagg.protocol.messages import Mode
from secagg.protocol.robust import RULES


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and says what to do."""


@dataclass
class ServerConfig:
    # network and files
    address: str = "127.0.0.1:50051"
    db: str = "secagg.db"
    tls_cert: str = ""                 # PEM server certificate (required: TLS is always on)
    tls_key: str = ""
    client_ca: str = ""                # set to require client certificates (mutual TLS)
    ledger_key: str = ""               # PEM key signing the ledger; "" = db + ".ledger-key" (keep it elsewhere, 0600)
    public_reads: bool = False         # let any TLS peer download models and read the status (else: registered, signed)
    metrics_port: int | None = None    # serve Prometheus metrics over HTTP on the address's host; None = off, 0 = any free port
    # the model
    dim: int = 1000                    # length of the update / model vector
    init_model: str = ""               # .npy with the initial model (zeros when empty)
    server_lr: float = 1.0             # model += server_lr * aggregate
    # rounds
    rounds: int = 0                    # rounds to run before stopping; 0 = forever
    linger_seconds: float = 3.0        # after the last round, keep serving model downloads this long
    min_clients: int = 5               # a round starts once this many clients wait (default clients refuse groups below 5)...
    max_clients: int = 1000            # ...and takes at most this many
    lobby_seconds: float = 2.0         # how long to wait for more clients after min_clients
    groups: int = 1                    # secure-aggregation groups per round
    mode: str = "active"               # or "semi-honest" (clients refuse it unless they opt in)
    neighbors: int = 0                 # 0 = complete graph; else SecAgg+ degree k (even), raised to the recommended degree
    threshold: float = 0.0             # 0 = safe minimum; <1 a fraction of holders; >=1 absolute
    phase_seconds: float = 30.0        # per-phase deadline
    chunk_words: int = 1 << 18         # words per masked-input chunk (1 MiB at 32 bits)
    max_inflight: int = 16             # masked-input streams assembled at once per group
    stall_seconds: float = 0.0         # drop a client silent this long mid-vector; 0 = phase_seconds / 4
    min_upload_rate: float = 65536.0   # bytes/s: a masked input must arrive within stall limit + size / rate of taking a slot; 0 = no floor
    # robustness
    clip_norm: float = 10.0
    clip_value: float = 0.0            # 0 = only the norm bound
    precision_bits: int = 16
    rule: str = "mean"
    byzantine_groups: int = 0          # f for the robust rule
    rule_params: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> ServerConfig:
        if not self.tls_cert or not self.tls_key:
            raise ConfigError("TLS is required: pass --tls-cert and --tls-key (make a dev pair with `secagg certs --out DIR`)")
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"address must be HOST:PORT with a port in 0..65535, got {self.address!r}")
        if self.ledger_key and Path(self.ledger_key).resolve() == Path(self.db).resolve():
            raise ConfigError("ledger_key must be its own file, not the database (keep it away from the database)")
        if self.metrics_port is not None and (isinstance(self.metrics_port, bool) or not isinstance(self.metrics_port, int)
                                              or not 0 <= self.metrics_port <= 65535):
            raise ConfigError(f"metrics_port must be a port in 0..65535 (or unset for no metrics), got {self.metrics_port!r}")
        if self.dim < 1:
            raise ConfigError("dim must be positive")
        if self.min_clients < 3:
            raise ConfigError("min_clients must be at least 3")
        if self.max_clients < self.min_clients:
            raise ConfigError("max_clients must be >= min_clients")
        if self.groups < 1:
            raise ConfigError("groups must be at least 1")
        if self.min_clients // self.groups < 3:
            raise ConfigError(f"{self.groups} groups need at least {3 * self.groups} clients per round (min_clients)")
        self.mode_enum  # noqa: B018  (validates)
        if self.neighbors and (self.neighbors < 2 or self.neighbors % 2):
            raise ConfigError("neighbors must be 0 (complete graph) or an even number >= 2")
        if self.phase_seconds <= 0 or self.lobby_seconds < 0:
            raise ConfigError("phase_seconds must be > 0 and lobby_seconds >= 0")
        if self.max_inflight < 1 or self.stall_seconds < 0:
            raise ConfigError("max_inflight must be >= 1 and stall_seconds >= 0")
        if not self.min_upload_rate >= 0 or self.min_upload_rate == float("inf"):
            raise ConfigError(f"min_upload_rate must be a finite number of bytes/s >= 0 (0: no floor), got {self.min_upload_rate!r}")
        if not 1 <= self.chunk_words <= 1 << 19:
            raise ConfigError("chunk_words must be in 1..524288 (at most 4 MiB a chunk with 64-bit words)")
        self._check_threshold()
        if self.rule not in RULES:
            raise ConfigError(f"unknown rule {self.rule!r}; choose one of {', '.join(RULES)}")
        try:
            _ = self.encoding   # EncodingParams validates B, c and precision
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return self

    def _check_threshold(self) -> None:
        """Refuse thresholds honest clients would refuse, instead of running rounds that all abort."""
        t, mode = self.threshold, self.mode_enum
        if t < 0:
            raise ConfigError("threshold must be >= 0")
        if 0 < t < 1:
            floor = 2 / 3 if mode is Mode.ACTIVE else 1 / 2
            if t <= floor:
                raise ConfigError(f"threshold fraction {t} is unsafe in {mode.value} mode: it must exceed {floor:.3g} (or use 0 for the safe minimum)")
        elif t >= 1:
            size = self.min_clients // self.groups
            holders = size if not self.neighbors or self.neighbors >= size - 1 else self.neighbors + 1
            if int(t) < thresholds.minimum(holders, mode) or int(t) > holders:
                raise ConfigError(f"threshold {int(t)} does not fit groups of {size}: it must be in "
                                  f"{thresholds.minimum(holders, mode)}..{holders} (or use 0 for the safe minimum)")

    @property
    def stall_limit(self) -> float:
        return self.stall_seconds or self.phase_seconds / 4

    @property
    def mode_enum(self) -> Mode:
        try:
            return Mode(self.mode)
        except ValueError:
            raise ConfigError(f"mode must be 'semi-honest' or 'active', got {self.mode!r}") from None

    @property
    def encoding(self) -> EncodingParams:
        return EncodingParams(clip_norm=self.clip_norm, clip_value=self.clip_value or None, precision_bits=self.precision_bits)

    def settings(self) -> dict[str, Any]:
        """What a round record stores about how the round was run (no file paths or keys)."""
        skip = {"address", "db", "tls_cert", "tls_key", "client_ca", "init_model", "ledger_key", "metrics_port"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def load(path: str | Path | None, overrides: dict[str, Any]) -> ServerConfig:
    """Read a TOML file (flat keys, or a [server] table) then apply non-None overrides."""
    values: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        values.update(data.get("server", data))
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    return ServerConfig(**values).validate()
