"""Server settings: from a TOML file, overridden by command-line flags.

Everything that shapes a round (cohort, groups, mode, bounds, rule) lives here and is copied
into every round record, so a record says exactly how its round was run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secagg.protocol import thresholds
from secagg.protocol.deadlines import PhaseBudget
from secagg.protocol.encoding import EncodingParams
from secagg.protocol.messages import Mode
from secagg.protocol.plan import GROUPINGS, PlanSettings
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
    groups: int = 1                    # secure-aggregation groups per round (per epoch under stable grouping)
    grouping: str = "stable"           # "stable": groups fixed for epoch_rounds rounds; "reshuffle": new groups every round
    epoch_rounds: int = 10             # rounds per epoch under stable grouping
    sample_rate: float = 0.0           # Poisson sampling rate q in (0, 1]; 0 = every connected client (or sample_size)
    sample_size: int = 0               # fixed-size sampling: this many clients per round; 0 = off
    mode: str = "active"               # or "semi-honest" (clients refuse it unless they opt in)
    neighbors: int = 0                 # 0 = complete graph; else SecAgg+ degree k (even), raised to the recommended degree
    threshold: float = 0.0             # 0 = safe minimum; <1 a fraction of holders; >=1 absolute
    phase_seconds: float = 30.0        # per-phase deadline of a small round; it grows with the round's work:
    phase_member_seconds: float = 0.01   # ... by this per group member
    phase_pair_seconds: float = 0.001    # ... and this per member and neighbour (phases with pairwise work)
    phase_ingest_rate: float = float(16 << 20)   # ... and the masked input by all members' vectors at this many bytes/s (0: not)
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
    # privacy accounting
    noise_multiplier: float = 0.0      # DP noise (sum's stddev / L2 sensitivity) the round charges; 0 = no DP
    dp_mechanism: str = "gaussian"     # the accounted mechanism: gaussian (distributed discrete), skellam, continuous-gaussian
    epsilon_budget: float = 0.0        # refuse to start a round that would take the cumulative epsilon above this; 0 = no budget
    delta: float = 1e-6                # the delta every epsilon is stated at

    def validate(self) -> ServerConfig:
        check_schema(self)   # types and ranges of every field, derived from the annotations above
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
        self._check_plan()
        if self.rule not in RULES:
            raise ConfigError(f"unknown rule {self.rule!r}; choose one of {', '.join(RULES)}")
        try:
            _ = self.encoding   # EncodingParams validates B, c and precision
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._check_tls_files()
        return self

    def _check_tls_files(self) -> None:
        """A certificate and key that do not match fail here, by name, not as gRPC's "Failed to bind"."""
        from .tls import PKIError, check_key_pair

        if not (Path(self.tls_cert).is_file() and Path(self.tls_key).is_file()):
            return   # start() names the file it cannot read
        try:
            check_key_pair(self.tls_cert, self.tls_key)
        except PKIError as exc:
            raise ConfigError(str(exc)) from None

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

    def _check_plan(self) -> None:
        if self.sample_rate and self.sample_size:
            raise ConfigError(f"sample_rate ({self.sample_rate}) and sample_size ({self.sample_size}) are two sampling modes: "
                              "set one (Poisson with rate q, or a fixed number of clients), not both")
        if self.sample_size and self.sample_size > self.max_clients:
            raise ConfigError(f"sample_size {self.sample_size} exceeds max_clients {self.max_clients}: a round cannot sample more "
                              "clients than it takes")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.epsilon_budget and not self.noise_multiplier:
            raise ConfigError(f"epsilon_budget {self.epsilon_budget:g} needs DP noise: set noise_multiplier > 0 "
                              "(without noise every round's epsilon is infinite)")

    @property
    def plan_settings(self) -> PlanSettings:
        return PlanSettings(groups=self.groups, grouping=self.grouping, epoch_rounds=self.epoch_rounds,
                            sample_rate=self.sample_rate, sample_size=self.sample_size)

    @property
    def phase_budget(self) -> PhaseBudget:
        """Each phase's deadline for a group: phase_seconds plus the group's work at the floor rates above."""
        return PhaseBudget(self.phase_seconds, self.phase_member_seconds, self.phase_pair_seconds, self.phase_ingest_rate)

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
    names = [f.name for f in dataclasses.fields(ServerConfig)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError("; ".join(_unknown(key, names, path) for key in unknown))
    for key, value in values.items():   # before the dataclass sees them: no TypeError tracebacks
        check_value(key, value)
    return ServerConfig(**values).validate()


def _unknown(key: str, names: list[str], path: str | Path | None) -> str:
    where = f" in {path}" if path else ""
    close = difflib.get_close_matches(key.replace("-", "_").lower(), names, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known settings: {', '.join(names)}"
    return f"unknown setting {key!r}{where}{hint}"


# -- the schema ----------------------------------------------------------------------------------
# Types come from ServerConfig's annotations, so a field added there is type-checked without
# touching this table; _ALLOWED adds the range or the choices of the fields that have one.


@dataclass(frozen=True)
class Allowed:
    """What values a setting takes beyond its type: a closed or open range, or a set of choices."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False          # lo itself is not allowed (> lo)
    choices: tuple[str, ...] = ()
    text: str = ""                 # how to say the range, when the default wording does not fit

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.lo is not None and self.hi is not None:
            return f"in {_num(self.lo)}..{_num(self.hi)}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"<= {_num(self.hi)}"

    def admits(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or value <= self.hi


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_ALLOWED: dict[str, Allowed] = {
    "dim": Allowed(lo=1),
    "server_lr": Allowed(),
    "rounds": Allowed(lo=0, text=">= 0 (0: run forever)"),
    "linger_seconds": Allowed(lo=0),
    "min_clients": Allowed(lo=3, text="at least 3"),
    "max_clients": Allowed(lo=3, text="at least 3 (and >= min_clients)"),
    "lobby_seconds": Allowed(lo=0),
    "groups": Allowed(lo=1, text="at least 1"),
    "grouping": Allowed(choices=GROUPINGS),
    "epoch_rounds": Allowed(lo=1, text="at least 1"),
    "sample_rate": Allowed(lo=0, hi=1, text="in (0, 1] (0: no Poisson sampling)"),
    "sample_size": Allowed(lo=0, text=">= 0 (0: no fixed-size sampling)"),
    "noise_multiplier": Allowed(lo=0, text=">= 0 (0: no DP noise)"),
    "dp_mechanism": Allowed(choices=("gaussian", "skellam", "continuous-gaussian")),
    "epsilon_budget": Allowed(lo=0, text=">= 0 (0: no budget)"),
    "delta": Allowed(lo=0, hi=1, lo_open=True, text="in (0, 1)"),
    "mode": Allowed(choices=("active", "semi-honest")),
    "neighbors": Allowed(lo=0, text="0 (complete graph) or an even number >= 2"),
    "threshold": Allowed(lo=0, text=">= 0 (0: the safe minimum; < 1 a fraction; >= 1 absolute)"),
    "phase_seconds": Allowed(lo=0, lo_open=True),
    "phase_member_seconds": Allowed(lo=0),
    "phase_pair_seconds": Allowed(lo=0),
    "phase_ingest_rate": Allowed(lo=0, text=">= 0 bytes/s (0: the masked-input deadline does not grow with vector size)"),
    "chunk_words": Allowed(lo=1, hi=1 << 19),
    "max_inflight": Allowed(lo=1),
    "stall_seconds": Allowed(lo=0, text=">= 0 (0: phase_seconds / 4)"),
    "clip_norm": Allowed(lo=0, lo_open=True),
    "clip_value": Allowed(lo=0, text=">= 0 (0: no per-coordinate bound)"),
    "precision_bits": Allowed(lo=1, hi=52),
    "byzantine_groups": Allowed(lo=0),
}

_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table"}
_TYPE_NAME = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list", dict: "a table"}


def _field_types() -> dict[str, tuple[tuple[type, ...], bool]]:
    """name -> (accepted base types, None allowed), from ServerConfig's annotations."""
    out: dict[str, tuple[tuple[type, ...], bool]] = {}
    for name, tp in typing.get_type_hints(ServerConfig).items():
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        optional = type(None) in args
        bases = tuple(typing.get_origin(a) or a for a in args if a is not type(None))
        out[name] = (tuple(b for b in bases if isinstance(b, type)), optional)
    return out


def _type_ok(value: Any, bases: tuple[type, ...]) -> bool:
    for base in bases:
        if base is bool and isinstance(value, bool):
            return True
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if base not in (bool, int, float) and isinstance(value, base):
            return True
    return False


def check_value(key: str, value: Any) -> None:
    """Raise ConfigError naming the key, the value and what is allowed, if ``value`` does not fit."""
    bases, optional = _field_types().get(key, ((), True))
    if not bases or any(b not in _KIND for b in bases):
        return   # a type this schema does not know: the field's own checks apply
    allowed = _ALLOWED.get(key, Allowed())
    if value is None and optional:
        return
    if not _type_ok(value, bases):
        kind = " or ".join(_KIND.get(b, b.__name__) for b in bases) + (" (or unset)" if optional else "")
        extra = f" ({allowed.describe()})" if (allowed.lo is not None or allowed.hi is not None or allowed.choices) else ""
        got = _TYPE_NAME.get(type(value), type(value).__name__)
        raise ConfigError(f"{key} must be {kind}{extra}, got {value!r} ({got})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if (allowed.lo is not None or allowed.hi is not None or allowed.choices) and not allowed.admits(value):
        raise ConfigError(f"{key} must be {allowed.describe()}, got {value!r}")


def check_schema(cfg: ServerConfig) -> None:
    """Every field of ``cfg`` against its annotated type and its range (ConfigError on the first)."""
    for f in dataclasses.fields(cfg):
        check_value(f.name, getattr(cfg, f.name))
