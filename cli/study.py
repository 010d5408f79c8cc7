"""``secagg study``: sweep group size x rule x attack (x Byzantine fraction, dropout, bypass) x seeds.

Writes runs.csv, summary.csv, worst_case.csv/.md and accuracy_vs_group_size.png into --out and
prints the worst-case table.  Grid values come from the built-in default (or --quick), then a
TOML file (--config, same keys as the flags with '_' for '-', lists for the axes), then flags.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from .main import UsageError, require_sim_extra
from .ray_option import add_ray_option, check_ray, ray_for, where

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study", help="sweep group size, robust rule and attack over in-memory federated runs; tables and a plot",
        description="Run federated learning (MNIST by default, digits with --quick) through real secure aggregation for "
                    "every point of a grid (group size x rule x attack x Byzantine fraction x dropout x takeover x "
                    "data split x momentum x bucketing x seeds), then write runs.csv, summary.csv (95%% confidence "
                    "intervals), worst_case.md/.csv, worst_over_attacks.md/.csv and accuracy_vs_group_size.png. Lists are "
                    "comma separated. An attack is NAME or NAME:FIELD=VALUE[:FIELD=VALUE], e.g. scaling:scale=-100.")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the tables and the plot")
    p.add_argument("--config", type=Path, metavar="TOML", help="grid file; keys as the flags (group_sizes = [1, 2, 5], ...)")
    p.add_argument("--quick", action="store_true", help="a small grid on the digits task (under 3 minutes on 2 cores)")
    p.add_argument("--grpc", action="store_true", help="run each point through the multi-process gRPC simulator instead")
    add_ray_option(p, "run every point as a Ray task (the same tables as the local processes)")
    p.add_argument("--seeds", metavar="N", help="seeds 0..N-1 per grid point")
    p.add_argument("--rounds", metavar="R")
    p.add_argument("--clients", metavar="N")
    g = p.add_argument_group("grid axes (comma-separated lists)")
    g.add_argument("--group-sizes", metavar="LIST", help="clients per group g; a run has clients // g groups (e.g. 1,2,5,10)")
    g.add_argument("--rules", metavar="LIST",
                   help="robust rules over group means (mean,median,trimmed_mean,krum,geometric_median,...)")
    g.add_argument("--attacks", metavar="LIST", help="attacks of the Byzantine clients (none,sign_flip,alie,scaling,...; "
                   "sign-flip works too)")
    g.add_argument("--byzantine", metavar="LIST", help="fractions of Byzantine clients (e.g. 0.0,0.2)")
    g.add_argument("--dropout", metavar="LIST", help="fractions of clients that vanish each round (e.g. 0.0,0.1)")
    g.add_argument("--bypass-bounds", nargs="?", const="true", metavar="LIST",
                   help="group takeover: one attacker per bad group skips the client library, fills the group's check "
                        "budget and sets the group mean to its target; alone means true, or a list such as false,true")
    g.add_argument("--non-iid", metavar="LIST", help="data splits: Dirichlet alphas, iid for IID (e.g. iid,1,0.1)")
    g.add_argument("--momentum", metavar="LIST", help="worker momentum beta of the honest clients (e.g. 0,0.9)")
    g.add_argument("--bucket", metavar="LIST", help="bucketing sizes s before the rule (1 = none; e.g. 1,2)")
    o = p.add_argument_group("task")
    o.add_argument("--task", choices=["digits", "mnist"], help="mnist: 784 features (the default grid); digits: fast")
    o.add_argument("--model", choices=["softmax", "mlp"])
    o.add_argument("--assumed-byzantine", metavar="FRACTION",
                   help="the Byzantine fraction the operator assumes; rules get f from it, never the true count")
    p.add_argument("--jobs", default="0", metavar="N",
                   help="worker processes for in-memory runs, or the CPUs of a local --ray (default 0 = one per core; "
                        "results do not depend on it)")
    p.set_defaults(func=run)


def _int(flag: str, raw: str, lo: int) -> int:
    try:
        v = int(raw)
    except ValueError:
        raise UsageError(f"{flag} must be an integer, got {raw!r}") from None
    if v < lo:
        raise UsageError(f"{flag} must be >= {lo}, got {v}")
    return v


def _items(flag: str, raw: str) -> list[str]:
    items = [s.strip() for s in raw.split(",")]
    if not items or any(not s for s in items):
        raise UsageError(f"{flag} must be a comma-separated list without empty items, got {raw!r}")
    return items


def _floats(flag: str, raw: str) -> list[float]:
    out = []
    for s in _items(flag, raw):
        try:
            out.append(float(s))
        except ValueError:
            raise UsageError(f"{flag} must list numbers, got {s!r}") from None
    return out


def _bools(flag: str, raw: str) -> list[bool]:
    out = []
    for s in _items(flag, raw):
        if s.lower() not in _TRUE | _FALSE:
            raise UsageError(f"{flag} must list true or false, got {s!r}")
        out.append(s.lower() in _TRUE)
    return out


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The grid keys set on the command line, parsed."""
    v: dict[str, Any] = {}
    if args.seeds is not None:
        v["seeds"] = _int("--seeds", args.seeds, 1)
    if args.rounds is not None:
        v["rounds"] = _int("--rounds", args.rounds, 1)
    if args.clients is not None:
        v["clients"] = _int("--clients", args.clients, 2)
    if args.group_sizes is not None:
        v["group_sizes"] = [_int("--group-sizes", s, 1) for s in _items("--group-sizes", args.group_sizes)]
    if args.rules is not None:
        v["rules"] = _items("--rules", args.rules)
    if args.attacks is not None:
        v["attacks"] = _items("--attacks", args.attacks)
    if args.byzantine is not None:
        v["byzantine"] = _floats("--byzantine", args.byzantine)
    if args.dropout is not None:
        v["dropout"] = _floats("--dropout", args.dropout)
    if args.bypass_bounds is not None:
        v["bypass_bounds"] = _bools("--bypass-bounds", args.bypass_bounds)
    if args.model is not None:
        v["model"] = args.model
    if args.task is not None:
        v["task"] = args.task
    if args.non_iid is not None:
        alphas: list[float | None] = []
        for item in _items("--non-iid", args.non_iid):
            if item.lower() == "iid":
                alphas.append(None)
                continue
            try:
                alphas.append(float(item))
            except ValueError:
                raise UsageError(f"--non-iid must list Dirichlet alphas or iid, got {item!r}") from None
        v["non_iid"] = alphas
    if args.momentum is not None:
        v["momentum"] = _floats("--momentum", args.momentum)
    if args.bucket is not None:
        v["bucket"] = [_int("--bucket", s, 1) for s in _items("--bucket", args.bucket)]
    if args.assumed_byzantine is not None:
        v["assumed_byzantine"] = _floats("--assumed-byzantine", args.assumed_byzantine)[0]
    return v


def build_grid(args: argparse.Namespace) -> Any:
    import tomllib

    from secagg.simulation.study import DEFAULT, QUICK, grid_from_mapping

    grid = QUICK if args.quick else DEFAULT
    try:
        if args.config is not None:
            try:
                data = tomllib.loads(args.config.read_text())
            except OSError as exc:
                raise UsageError(f"cannot read --config {args.config}: {exc.strerror or exc}") from None
            except tomllib.TOMLDecodeError as exc:
                raise UsageError(f"--config {args.config} is not valid TOML: {exc}") from None
            grid = grid_from_mapping(data, grid, source=str(args.config))
        grid = grid_from_mapping(flag_values(args), grid, source="flags")
        return grid.validate()
    except ValueError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None


def _check_grpc(specs: list) -> None:
    try:
        from secagg.simulation.simulate import SimConfig
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("secagg.simulation"):
            raise UsageError("--grpc needs secagg.simulation.simulate (the multi-process gRPC simulator), "
                             "which is not available in this installation; run without --grpc") from None
        raise
    for spec in specs:
        if ":" in spec.attack:
            raise UsageError(f"--grpc takes plain attack names; {spec.attack!r} has parameters")
        if spec.task != "digits" or spec.momentum or spec.bucket > 1:
            raise UsageError("--grpc runs the digits task without momentum or bucketing; add --task digits "
                             "--momentum 0 --bucket 1 (or drop --grpc)")
        try:
            SimConfig(clients=spec.clients, rounds=spec.rounds, dropout=spec.dropout, groups=spec.groups, mode=spec.mode,
                      seed=spec.seed, task="digits").validate()
        except ValueError as exc:
            raise UsageError(f"--grpc: group size {spec.group_size}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    require_sim_extra("study")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table
    from secagg.simulation.study import expand, run_study, worst_case, write_outputs

    if args.ray is not None:
        if args.grpc:
            raise UsageError("--ray runs the in-memory runs as Ray tasks and --grpc runs each through local server and "
                             "client processes; give one of them")
        check_ray()
    jobs = _int("--jobs", args.jobs, 0) or (os.cpu_count() or 1)
    grid = build_grid(args)
    specs = expand(grid)
    if args.grpc:
        _check_grpc(specs)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {args.out}: {exc.strerror or exc}") from None

    console = Console()
    from .log import setup_logging

    setup_logging("warning", console=console)  # log lines print above the progress bar, not through it
    backend = ("gRPC simulator" if args.grpc else f"in memory, Ray tasks on {where(args.ray, jobs)}" if args.ray is not None
               else f"in memory, {jobs} process(es)")
    console.print(f"[bold]secagg study[/]: {len(specs)} runs ({len(grid.group_sizes)} group sizes x {len(grid.rules)} rules x "
                  f"{len(grid.attacks)} attacks x {len(grid.byzantine)} Byzantine fractions x {len(grid.dropout)} dropout x "
                  f"{len(grid.bypass_bounds)} takeover x {len(grid.non_iid)} splits x {len(grid.momentum)} momentum x "
                  f"{len(grid.bucket)} bucketing x {grid.seeds} seeds, clean points once), {grid.task}, {grid.clients} "
                  f"clients, {grid.rounds} rounds, {backend}")
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("[dim]{task.fields[last]}"), console=console) as prog:
        bar = prog.add_task("runs", total=len(specs), last="")

        def on_row(spec: Any, row: dict) -> None:
            prog.update(bar, advance=1, last=f"{spec.label()}: accuracy {row['final_accuracy']:.3f}")

        try:
            if args.ray is None:
                rows = run_study(specs, jobs=jobs, grpc=args.grpc, on_row=on_row)
            else:
                from secagg.simulation.ray_backend import RayExecutor

                with ray_for(args.ray, num_cpus=jobs) as ray:
                    rows = run_study(specs, on_row=on_row, executor=RayExecutor(ray))
        except ValueError as exc:
            raise UsageError(str(exc).splitlines()[0]) from None
    wall = time.perf_counter() - t0
    paths = write_outputs(rows, args.out, grid=grid)

    worst = worst_case(rows)
    cell = {(w["rule"], w["attack"]): w for w in worst}
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    table = Table(title="worst-case final accuracy (over group sizes, splits, Byzantine fractions, dropout, takeover, seeds)")
    table.add_column("rule")
    for a in attacks:
        table.add_column(a, justify="right")
    for rule in dict.fromkeys(r["rule"] for r in rows):
        cells = []
        for a in attacks:
            w = cell.get((rule, a))
            if w is None:
                cells.append("-")
                continue
            acc = w["worst_final_accuracy"]
            color = "green" if acc >= 0.8 else "yellow" if acc >= 0.5 else "red"
            cells.append(f"[{color}]{acc:.3f}[/] [dim](g={w['group_size']}{', takeover' if w['bypass_bounds'] else ''})[/]")
        table.add_row(rule, *cells)
    console.print(table)
    console.print(f"{len(rows)} runs in {wall:.1f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
