"""Whole-round benchmarks on the in-memory driver across group sizes, graphs and modes.

    python bench/run_benchmarks.py [--quick] [--json bench/results.json]

Prints, per configuration, the client's masked-input and the server's unmasking seconds beside
the performance model's bound (measured in the same run) and their ratio.  Benchmarks, not
tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from secagg.protocol.bench import bench_round
from secagg.protocol.messages import Mode

GRID = [
    # clients, dim, dropout, neighbors, mode
    (100, 100_000, 0.1, None, Mode.SEMI_HONEST),
    (100, 100_000, 0.1, None, Mode.ACTIVE),
    (100, 100_000, 0.1, 14, Mode.SEMI_HONEST),
    (200, 10_000, 0.1, None, Mode.SEMI_HONEST),
    (200, 10_000, 0.1, 16, Mode.SEMI_HONEST),
    (20, 1_000_000, 0.1, None, Mode.SEMI_HONEST),
]
QUICK = [(50, 10_000, 0.1, None, Mode.SEMI_HONEST), (50, 10_000, 0.1, 8, Mode.ACTIVE)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    print(f"{'clients':>8}{'dim':>10}{'graph':>7}{'mode':>13}{'client mi s':>13}{'ratio':>7}{'server unmask s':>17}{'ratio':>7}{'total s':>9}  correct")
    for clients, dim, dropout, k, mode in QUICK if args.quick else GRID:
        rep = bench_round(clients, dim, dropout=dropout, neighbors=k, mode=mode)
        mi, um = rep["phases"]["masked_input"], rep["phases"]["unmasking"]
        print(f"{clients:>8}{dim:>10}{('full' if k is None else str(k)):>7}{mode.value:>13}{mi['client_seconds_mean']:>13.4f}"
              f"{mi['client_ratio']:>7.2f}{um['server_seconds']:>17.4f}{um['server_ratio']:>7.2f}{rep['total_seconds']:>9.2f}  {rep['correct']}")
        rows.append(rep)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
