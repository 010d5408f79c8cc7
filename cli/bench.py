"""``secagg bench``: one in-memory round, per-phase seconds and bytes beside the model's bound."""

from __future__ import annotations

import argparse

from .jsonout import add_json_option, to_stdout, write_json
from .main import EXIT_ABORTED, EXIT_FAILED, NEIGHBORS_HELP, UsageError, neighbors_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark one in-memory secure-aggregation round",
                       description="Run one round in memory and report, per phase, client and server seconds, "
                                   "bytes each way and the lower bound of the performance model.")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--dim", type=int, default=100_000)
    p.add_argument("--dropout", type=float, default=0.0, help="fraction of clients that drop, spread over the phases")
    p.add_argument("--neighbors", type=neighbors_arg, default=0, help=NEIGHBORS_HELP)
    p.add_argument("--mode", choices=["semi-honest", "active"], default="semi-honest")
    p.add_argument("--seed", type=int, default=0)
    add_json_option(p, "the figures")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from secagg.protocol.bench import bench_round
    from secagg.protocol.messages import Mode

    if args.clients < 3:
        raise UsageError("--clients must be at least 3")
    if args.dim < 1:
        raise UsageError("--dim must be positive")
    if not 0 <= args.dropout < 1:
        raise UsageError("--dropout must be in [0, 1)")
    rep = bench_round(args.clients, args.dim, dropout=args.dropout, neighbors=args.neighbors or None,
                      mode=Mode(args.mode), seed=args.seed)
    if not to_stdout(args.json):
        print_report(rep)
    if args.json:
        write_json(args.json, rep)
    if rep["aborted"]:
        print(f"round aborted: {rep['aborted']}")
        return EXIT_ABORTED
    if not rep["correct"]:
        print("the aggregate differs from the plaintext sum")
        return EXIT_FAILED
    return 0


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def print_report(rep: dict) -> None:
    print(f"secagg bench: {rep['clients']} clients, dim {rep['dim']}, {rep['mode']}, neighbours {rep['neighbors']}, "
          f"t={rep['threshold']}, mod 2^{rep['modulus_bits']}, dropout {rep['dropout']:.0%}")
    u = rep["unit_costs"]
    print(f"unit costs: PRG expansion {u['prg_seconds'] * 1e3:.3f} ms, vector addition {u['add_seconds'] * 1e3:.3f} ms")
    head = f"{'phase':<18}{'survivors':>10}{'client s':>11}{'bound':>10}{'ratio':>8}{'server s':>11}{'bound':>10}{'ratio':>8}{'up KiB/cl':>11}{'down KiB':>11}"
    print(head)
    print("-" * len(head))
    for name, ph in rep["phases"].items():
        print(f"{name:<18}{ph['survivors']:>10}{ph['client_seconds_mean']:>11.4f}{ph['client_bound_seconds']:>10.4f}{_fmt(ph['client_ratio']):>8}"
              f"{ph['server_seconds']:>11.4f}{ph['server_bound_seconds']:>10.4f}{_fmt(ph['server_ratio']):>8}"
              f"{ph['bytes_up_per_client'] / 1024:>11.1f}{ph['bytes_down'] / 1024:>11.1f}")
    print(f"survivors {rep['survivors']}/{rep['clients']}, total {rep['total_seconds']:.2f} s, correct={str(rep['correct']).lower()}")
