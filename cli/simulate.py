"""``secagg simulate``: server and clients as real processes on localhost, verified round by round."""

from __future__ import annotations

import argparse
import sys

from .jsonout import add_json_option, to_stdout, write_json
from .main import EXIT_ABORTED, EXIT_FAILED, NEIGHBORS_HELP, UsageError, neighbors_arg, require_sim_extra
from .ray_option import add_ray_option, check_ray, ray_address, ray_for, where


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run a local multi-process simulation over gRPC with TLS",
                       description="Start a server and client worker processes on localhost, run rounds with injected "
                                   "dropouts (and attacks on a learning task), verify every aggregate against the "
                                   "plaintext sum of the survivors' inputs, and print a summary.")
    p.add_argument("--clients", type=int, default=30)
    p.add_argument("--dim", type=int, default=None, help="update length for synthetic inputs (implies --task synthetic)")
    p.add_argument("--rounds", type=int, default=None, help="rounds to run (default 3 synthetic, 12 digits)")
    p.add_argument("--dropout", type=float, default=0.1, help="fraction of clients that drop each round")
    p.add_argument("--dropout-phase", default="random", help="phase they drop before: advertise_keys, share_keys, "
                   "masked_input, consistency_check, unmasking, or random")
    p.add_argument("--groups", type=int, default=None, help="secure-aggregation groups (default: 3 from 30 clients, "
                   "clients // 10 below, at least 1)")
    p.add_argument("--grouping", choices=["stable", "reshuffle"], default="stable",
                   help="stable: groups fixed for --epoch-rounds rounds (default); reshuffle: new groups every round")
    p.add_argument("--epoch-rounds", type=int, default=10, help="rounds per epoch under stable grouping (default 10)")
    p.add_argument("--neighbors", type=neighbors_arg, default=0, help=NEIGHBORS_HELP)
    p.add_argument("--mode", choices=["semi-honest", "active"], default="active")
    p.add_argument("--threshold", type=float, default=0.0, help="0 = safe minimum; <1 fraction; >=1 absolute")
    p.add_argument("--processes", type=int, default=2, help="client worker processes (Ray actors with --ray)")
    add_ray_option(p, "place the client workers as Ray actors that dial the server over gRPC,")
    p.add_argument("--server-host", metavar="HOST", help="with --ray: the address the server listens on and the actors "
                   "dial; every Ray node must reach it (default 127.0.0.1 on a local Ray, else this machine's address "
                   "in the Ray cluster)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase-seconds", type=float, default=30.0)
    add_json_option(p, "the summary")
    p.add_argument("--workdir", help="keep the run's database and certificates here")
    p.add_argument("--profile", metavar="DIR", help="write a cProfile of the server (server.prof) and of each client worker "
                   "(worker-N.prof) to DIR; read them with `python -m pstats` or snakeviz")
    g = p.add_argument_group("learning task and attacks")
    g.add_argument("--task", choices=["synthetic", "digits"], default=None,
                   help="digits: softmax regression on scikit-learn's digits (default unless --dim is given)")
    g.add_argument("--rule", default="mean", help="robust rule over group means")
    g.add_argument("--byzantine-groups", type=int, default=0, help="f for the robust rule")
    g.add_argument("--attack", default="none", help="none, scaling, sign_flip, gaussian, alie, ipm, backdoor, label_flip, "
                   "sybil ('-' for '_' works too)")
    g.add_argument("--byzantine", type=float, default=0.0, help="fraction of clients that attack")
    g.add_argument("--bypass-bounds", action="store_true", help="attackers skip the library's bounding (send raw values)")
    g.add_argument("--clip-norm", type=float, default=None, help="L2 bound B (default 10 synthetic, 5 digits)")
    g.add_argument("--non-iid", type=float, default=None, metavar="ALPHA", help="Dirichlet alpha for a non-IID split")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    task = args.task or ("synthetic" if args.dim is not None else "digits")
    require_sim_extra("simulate", ("rich",) if task == "synthetic" else ("rich", "sklearn"))
    from secagg.simulation.attacks import normalize_attack_name
    from secagg.simulation.simulate import SimConfig, SimulationError, default_groups, run_simulation

    if args.ray is not None:
        check_ray()
    elif args.server_host is not None:
        raise UsageError("--server-host applies to --ray; local worker processes reach the server on 127.0.0.1")
    if args.server_host is not None and args.server_host.strip("[]") in ("0.0.0.0", "::", ""):
        raise UsageError(f"--server-host {args.server_host!r}: the actors dial this address, so give one of this machine's "
                         "addresses that every Ray node reaches, not a wildcard")
    if task == "digits" and args.dim is not None:
        raise UsageError("--dim applies to --task synthetic; the digits model's size is fixed")
    groups = default_groups(args.clients) if args.groups is None else args.groups
    try:
        def given(value: float | None, default: float) -> float:
            return default if value is None else value

        cfg = SimConfig(
            clients=args.clients, dim=int(given(args.dim, 1000)), rounds=int(given(args.rounds, 3 if task == "synthetic" else 12)),
            dropout=args.dropout, dropout_phase=args.dropout_phase, groups=groups, grouping=args.grouping,
            epoch_rounds=args.epoch_rounds, neighbors=args.neighbors,
            mode=args.mode, threshold=args.threshold, processes=args.processes, seed=args.seed, phase_seconds=args.phase_seconds,
            clip_norm=given(args.clip_norm, 10.0 if task == "synthetic" else 5.0), task=None if task == "synthetic" else task,
            rule=args.rule, byzantine_groups=args.byzantine_groups, attack=normalize_attack_name(args.attack), byzantine=args.byzantine,
            bypass_bounds=args.bypass_bounds, non_iid=args.non_iid, workdir=args.workdir, profile_dir=args.profile,
        ).validate()
        if cfg.task:
            cfg.fl_config()  # validates attack, rule, clip norm and the non-IID alpha before any process starts
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # logs and pipes get the whole table; with --json - standard output is the JSON alone
    console = Console(width=None if sys.stdout.isatty() else 140, stderr=to_stdout(args.json))
    from .log import setup_logging

    setup_logging("warning", console=console)  # log lines print above the progress bars, not through them
    what = f"synthetic vectors (dim {cfg.dim})" if task == "synthetic" else "softmax regression on digits"
    workers = f"{cfg.processes} worker processes" if args.ray is None else f"{cfg.processes} Ray actors on {where(args.ray, cfg.processes)}"
    console.print(f"[bold]secagg simulate[/]: {cfg.clients} clients in {cfg.groups} group(s), {what}, {cfg.rounds} rounds, {cfg.mode}, "
                  f"dropout {cfg.dropout:.0%} before {cfg.dropout_phase}, {workers}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as prog:
        rounds = prog.add_task("rounds", total=cfg.rounds)
        clients = prog.add_task("client results", total=cfg.rounds * cfg.clients)

        def on_event(kind: str, data: dict) -> None:
            prog.advance(rounds if kind == "round" else clients)

        try:
            if args.ray is None:
                summary = run_simulation(cfg, progress=on_event)
            else:
                from secagg.simulation.ray_backend import RayActors, node_ip

                with ray_for(args.ray, num_cpus=cfg.processes) as ray:
                    host = args.server_host or ("127.0.0.1" if ray_address(args.ray) is None else node_ip(ray))
                    summary = run_simulation(cfg, progress=on_event, workers_on=RayActors(ray, host))
        except SimulationError as exc:
            raise UsageError(str(exc)) from None
    print_summary(console, summary)
    if args.json:
        write_json(args.json, summary)
        if not to_stdout(args.json):
            console.print(f"summary written to {args.json}")
    return exit_code(console, summary)


def exit_code(console: object, summary: dict) -> int:
    """1 when an aggregate differs from its plaintext sum, 5 when a round did not complete, else 0."""
    if not summary["correct"]:
        return EXIT_FAILED
    if any(r["outcome"] != "completed" for r in summary["rounds"]) or len(summary["rounds"]) < summary["config"]["rounds"]:
        console.print("see the outcome column, or rerun with --workdir DIR and "  # type: ignore[attr-defined]
                      "`secagg rounds --db DIR/secagg.db`")
        return EXIT_ABORTED
    return 0


_ABBREV = {"advertise_keys": "ak", "share_keys": "sk", "masked_input": "mi", "consistency_check": "cc", "unmasking": "um"}


def print_summary(console: object, summary: dict) -> None:
    from rich.table import Table

    phases = list(_ABBREV)
    used = [p for p in phases if any(p in r["survivors"] for r in summary["rounds"])]
    legend = "/".join(_ABBREV[p] for p in used)
    task = summary["config"]["task"]
    t = Table(title=f"{len(summary['rounds'])} rounds (phases {legend})")
    for name, kw in [("round", {}), ("outcome", {}), ("correct", {}), (f"survivors {legend}", {}), (f"seconds {legend}", {}),
                     ("KiB up", {"justify": "right"})] + ([("accuracy", {"justify": "right"})] if task else []) + [("rejected", {})]:
        t.add_column(name, no_wrap=True, **kw)
    for r in summary["rounds"]:
        verdict = "[green]yes[/]" if r["correct"] else "[red]NO[/]"
        if r["outcome"] == "aborted":
            verdict = "n/a"   # nothing was released, so there is nothing to verify
        row = [str(r["round"]), r["outcome"], verdict,
               "/".join(str(r["survivors"].get(p, "-")) for p in used),
               "/".join(f"{r['seconds'].get(p, 0):.2f}" for p in used), f"{r['bytes_sent_per_client'] / 1024:.1f}"]
        if task:
            row.append(f"{r.get('accuracy', float('nan')):.3f}")
        row.append(", ".join(f"g{x['group']} {x['reasons'][0].split(' ')[0]}" for x in r["rejected_groups"]) or "-")
        t.add_row(*row)
    console.print(t)  # type: ignore[attr-defined]
    last = summary["rounds"][-1] if summary["rounds"] else {}
    acc = f"test accuracy {last['accuracy']:.3f}; " if task and "accuracy" in last else ""
    verdict = "[green]yes[/]" if summary["correct"] else "[red]NO[/]"
    done = [r for r in summary["rounds"] if r["outcome"] == "completed"]
    if len(done) == len(summary["rounds"]) == summary["config"]["rounds"]:
        claim = f"every aggregate equals the plaintext sum of its survivors' inputs: {verdict}"
    else:   # an aborted round released nothing: never claim "every aggregate" for it
        missing = summary["config"]["rounds"] - len(done)
        claim = (f"[red]{missing} of {summary['config']['rounds']} round(s) did not complete[/] (nothing released); "
                 + (f"the {len(done)} completed round(s) match the plaintext sums of their survivors' inputs: {verdict}"
                    if done else "no aggregate to verify"))
    console.print(f"{acc}wall {summary['wall_seconds']:.1f} s; server peak RSS {summary['server_peak_rss_mb']:.0f} MiB; "  # type: ignore[attr-defined]
                  + claim)
