"""``secagg serve``: run the aggregation server from flags and/or a TOML file."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal

from .main import NEIGHBORS_HELP, UsageError, neighbors_arg

_FLAGS = {  # flag -> (type, help)
    "address": (str, "host:port to listen on (port 0: any free port)"),
    "db": (str, "SQLite database file (created if missing)"),
    "tls_cert": (str, "PEM server certificate"),
    "tls_key": (str, "PEM server private key"),
    "client_ca": (str, "require client certificates signed by this CA (mutual TLS)"),
    "ledger_key": (str, "Ed25519 PEM key that signs the record chain (default: DB.ledger-key; keep it apart from the DB)"),
    "dim": (int, "model / update length"),
    "init_model": (str, ".npy file with the initial model"),
    "server_lr": (float, "model += server_lr * aggregate"),
    "rounds": (int, "stop after this many rounds (0: run forever)"),
    "linger_seconds": (float, "after the last round, keep serving model downloads this long"),
    "min_clients": (int, "clients needed to start a round"),
    "max_clients": (int, "clients taken into one round"),
    "lobby_seconds": (float, "extra wait for more clients once min_clients wait"),
    "groups": (int, "secure-aggregation groups per round (per epoch under stable grouping)"),
    "grouping": (str, "stable: groups fixed for --epoch-rounds rounds (a group runs only with all its members); reshuffle: new groups every round"),
    "epoch_rounds": (int, "rounds per epoch under stable grouping"),
    "sample_rate": (float, "Poisson sampling: each client (whole groups under stable grouping) with this probability (0: off)"),
    "sample_size": (int, "fixed-size sampling: this many clients a round (whole groups under stable grouping; 0: off)"),
    "mode": (str, "active, or semi-honest (default clients refuse it)"),
    "neighbors": (neighbors_arg, NEIGHBORS_HELP),
    "threshold": (float, "0 = safe minimum; <1 fraction of share holders; >=1 absolute"),
    "phase_seconds": (float, "per-phase deadline of a small round (grows with the round's work, below)"),
    "phase_member_seconds": (float, "each phase's deadline grows by this per group member"),
    "phase_pair_seconds": (float, "... and by this per member and neighbour"),
    "phase_ingest_rate": (float, "bytes/s: the masked-input deadline grows by all members' vectors at this rate (0: not)"),
    "chunk_words": (int, "words per masked-input chunk"),
    "max_inflight": (int, "masked-input streams assembled at once per group"),
    "stall_seconds": (float, "drop a client silent this long mid-vector (0: phase_seconds / 4)"),
    "clip_norm": (float, "L2 bound B on each client's update"),
    "clip_value": (float, "per-coordinate bound c (0: none beyond B)"),
    "precision_bits": (int, "fixed-point precision"),
    "rule": (str, "robust rule over group means"),
    "byzantine_groups": (int, "f: bad groups the rule tolerates"),
    "noise_multiplier": (float, "DP noise each round charges to the privacy account: sum stddev / L2 sensitivity (0: no DP)"),
    "dp_mechanism": (str, "the accounted DP mechanism"),
    "epsilon_budget": (float, "refuse to start a round that would take the cumulative epsilon above this (0: no budget)"),
    "delta": (float, "the delta every epsilon is stated at"),
    "metrics_port": (int, "serve Prometheus metrics at http://HOST:PORT/metrics (HOST from --address; off by default)"),
}


_CHOICES = {"mode": ("active", "semi-honest"), "grouping": ("stable", "reshuffle"),
            "dp_mechanism": ("gaussian", "skellam", "continuous-gaussian")}


def _defaults() -> dict[str, object]:
    from secagg.server.config import ServerConfig

    return {f.name: f.default for f in dataclasses.fields(ServerConfig) if f.default is not dataclasses.MISSING}


def register(sub: argparse._SubParsersAction) -> None:
    from .log import FORMATS, LEVELS

    p = sub.add_parser("serve", help="run the secure-aggregation server",
                       description="Run the gRPC server. Settings come from --config (TOML) and these flags (flags win); "
                                   "the defaults shown are ServerConfig's, used when neither sets a value.")
    p.add_argument("--config", help="TOML file with the settings (flat, or under [server])")
    defaults = _defaults()
    for name, (typ, help_) in _FLAGS.items():
        default = defaults.get(name)
        shown = "" if default in ("", None) else f" (default: {default})"
        # default=None: a flag not given leaves the TOML value (or ServerConfig's default) alone
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, choices=_CHOICES.get(name),
                       help=(help_ + shown).replace("%", "%%"))
    p.add_argument("--public-reads", dest="public_reads", action="store_const", const=True, default=None,
                   help="let any TLS peer download models and read the status (default: registered clients, signed)")
    p.add_argument("--log-level", choices=LEVELS, default="info", help="log lines at this level and above (default: info)")
    p.add_argument("--log-format", choices=FORMATS, default="text",
                   help="text (through rich when installed) or json: one JSON object per line (default: text)")
    p.add_argument("-v", "--verbose", action="store_true", help="same as --log-level debug")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from secagg.server.config import ConfigError, load
    from secagg.server.service import start

    from .log import setup_logging

    setup_logging("debug" if args.verbose else args.log_level, args.log_format)
    try:
        cfg = load(args.config, {k: getattr(args, k) for k in (*_FLAGS, "public_reads")})
    except ConfigError as exc:
        raise UsageError(str(exc)) from None

    async def main() -> None:
        try:
            srv = await start(cfg, on_round=lambda rid: print(f"{rid}: {srv.coordinator.last_outcome}", flush=True))
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        host = cfg.address.rsplit(":", 1)[0]
        print(f"secagg server listening on {host}:{srv.port} (TLS{', mutual' if cfg.client_ca else ''}), db {cfg.db}, "
              f"dim {cfg.dim}, {cfg.groups} group(s), {cfg.mode}", flush=True)
        if srv.metrics_port is not None:
            print(f"metrics at http://{host}:{srv.metrics_port}/metrics", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, srv.task.cancel)
        try:
            await srv.task
        except asyncio.CancelledError:
            pass
        finally:
            await srv.stop()

    asyncio.run(main())
    return 0

