"""Rounds over real gRPC as they grow: ``secagg simulate`` over clients x dims.

    python bench/scaling.py [--clients 100 300 1000] [--dims 10000 100000 1000000] [--out bench/scaling]

Each configuration is one round of ``secagg simulate --groups 1 --neighbors K --dropout 0.1``
(SecAgg+ at the recommended degree, active mode, TLS, real processes), run as its own process.
Writes OUT.json (every summary, the machine's load average before and after each run) and
OUT.png (seconds per phase; the server's own work over its PRG+add bound for summing and
unmasking).  A benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ["advertise_keys", "share_keys", "masked_input", "consistency_check", "unmasking"]


def run_one(clients: int, dim: int, neighbors: int, dropout: float, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="secagg-scaling-") as tmp:
        out = Path(tmp) / "summary.json"
        argv = [sys.executable, "-m", "secagg.cli", "simulate", "--groups", "1", "--neighbors", str(neighbors), "--dropout", str(dropout),
                "--rounds", "1", "--clients", str(clients), "--dim", str(dim), "--seed", str(seed), "--json", str(out)]
        load_before = os.getloadavg()
        t0 = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True)
        wall = time.monotonic() - t0
        row: dict = {"clients": clients, "dim": dim, "neighbors_asked": neighbors, "dropout": dropout, "exit_code": proc.returncode,
                     "wall_seconds": wall, "load_before": load_before, "load_after": os.getloadavg()}
        if out.exists():
            row["summary"] = json.loads(out.read_text())
        else:
            row["error"] = (proc.stderr or proc.stdout)[-2000:]
        return row


def table(rows: list[dict]) -> str:
    """The markdown table docs/performance.md shows."""
    head = ("| clients | dim | correct | round s | ak / sk / mi / cc / um s | server summing: work s / bound s (x) "
            "| unmasking: work s / bound s (x) | server RSS MiB | worker RSS MiB | load |")
    lines = [head, "|---:|---:|---|---:|---|---|---|---:|---:|---|"]
    for r in rows:
        s = r.get("summary")
        if not s or not s["rounds"]:
            lines.append(f"| {r['clients']} | {r['dim']:,} | failed (exit {r['exit_code']}) | | | | | | | |")
            continue
        rnd = s["rounds"][0]
        srv = rnd["server"]
        mi, um = srv.get("masked_input", {}), srv.get("unmasking", {})

        def ratio(x: dict) -> str:
            return f"{x['work_seconds']:.3f} / {x['bound_seconds']:.4f} ({x['ratio']:.1f}x)" if x.get("ratio") else "-"

        phases = " / ".join(f"{rnd['seconds'].get(p, 0):.2f}" for p in PHASES)
        load = f"{r['load_before'][0]:.1f}-{r['load_after'][0]:.1f}"
        lines.append(f"| {r['clients']} | {r['dim']:,} | {rnd['correct']} | {rnd['round_seconds']:.1f} | {phases} | {ratio(mi)} | {ratio(um)} "
                     f"| {s['server_peak_rss_mb']:.0f} | {max(s['worker_peak_rss_mb'] or [0]):.0f} | {load} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("summary") and r["summary"]["rounds"]]
    labels = [f"{r['clients']}x{r['dim']:.0e}".replace("e+0", "e") for r in done]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    bottom = [0.0] * len(done)
    for p in PHASES:
        vals = [r["summary"]["rounds"][0]["seconds"].get(p, 0.0) for r in done]
        ax1.bar(labels, vals, bottom=bottom, label=p.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.set_ylabel("seconds (slowest group, wall)")
    ax1.set_title("one round over gRPC+TLS, 2 cores: seconds per phase")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax1.tick_params(axis="x", rotation=45)
    width = 0.4
    xs = range(len(done))
    for k, (phase, name) in enumerate([("masked_input", "summing / addition bound"), ("unmasking", "unmasking / PRG+add bound")]):
        vals = [r["summary"]["rounds"][0]["server"].get(phase, {}).get("ratio") or 0.0 for r in done]
        ax2.bar([x + (k - 0.5) * width for x in xs], vals, width, label=name)
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xticks(list(xs), labels, rotation=45)
    ax2.set_yscale("log")
    ax2.set_ylabel("server work / bound")
    ax2.set_title("server's own work against its bound")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--dims", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--neighbors", type=int, default=20, help="asked degree; the server raises it to the recommended one")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/scaling"), help="writes OUT.json and OUT.png")
    ap.add_argument("--from-json", action="store_true", help="only redraw the table and plot from OUT.json")
    args = ap.parse_args()
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    if args.from_json:
        rows = json.loads(json_path.read_text())["runs"]
    else:
        rows = []
        for dim in args.dims:
            for clients in args.clients:
                row = run_one(clients, dim, args.neighbors, args.dropout, args.seed)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
                json_path.parent.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps({"cores": os.cpu_count(), "runs": rows}, indent=1))
    print(table(rows))
    try:
        plot(rows, png_path)
        print(f"wrote {json_path} and {png_path}")
    except ImportError:
        print(f"wrote {json_path}; install matplotlib (the 'sim' extra) for {png_path}")


if __name__ == "__main__":
    main()
