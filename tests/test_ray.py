"""Ray: a sweep as Ray tasks writes the local pool's tables, client workers as Ray actors aggregate
exactly over real gRPC, every Ray process is gone afterwards, and without Ray `--ray` names the extra.

The two Ray runs start a real local Ray (2 CPUs, no dashboard) in a ``secagg`` subprocess, tagged
with an environment variable that every process it starts inherits (raylet, GCS, Ray workers, the
server and its children), so the test can tell that none of them outlived the command.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from secagg.cli.main import EXIT_CONNECTION, EXIT_USAGE, main

pytestmark = pytest.mark.slow

SWEEP = ["--clients", "10", "--rounds", "2", "--seeds", "2", "--group-sizes", "1,2", "--rules", "mean,median",
         "--attacks", "sign_flip", "--byzantine", "0.2", "--jobs", "2",
         "--quick", "--non-iid", "iid", "--bucket", "1", "--bypass-bounds", "false"]   # 8 runs: enough for the local pool to start


def _tagged(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries ``SECAGG_RAY_TEST=marker``."""
    needle = f"SECAGG_RAY_TEST={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env.split(b"\0") and state != "Z":
            pids.append(int(entry))
    return pids


@pytest.fixture
def ray_cli() -> Iterator[tuple[Callable[..., subprocess.CompletedProcess[str]], Path]]:
    """Run ``secagg ARGS`` in a subprocess that starts its own local Ray; afterwards assert that no
    process it started is left (Ray shuts down within seconds of the driver leaving)."""
    marker = uuid.uuid4().hex
    tmp = Path(tempfile.mkdtemp(prefix="sr", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {**os.environ, "SECAGG_RAY_TEST": marker, "RAY_TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "secagg.cli", *argv], env=env, capture_output=True, text=True,
                              timeout=240)

    yield run, tmp
    deadline = time.monotonic() + 30
    while _tagged(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _tagged(marker)
    details = [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for p in left if Path(f"/proc/{p}").exists()]
    shutil.rmtree(tmp, ignore_errors=True)
    assert not left, f"processes left after the command: {details}"


def _csv(path: Path, drop: str | None = None) -> list[dict[str, str]]:
    with path.open() as fh:
        return [{k: v for k, v in row.items() if k != drop} for row in csv.DictReader(fh)]


def test_sweep_on_ray_writes_the_local_pools_tables(ray_cli: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, ray_tmp = ray_cli
    res = run("study", "--out", str(tmp_path / "ray"), "--ray", *SWEEP)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Ray tasks on a local Ray (2 CPUs)" in " ".join(res.stdout.split())
    assert list(ray_tmp.glob("ray/session_*/logs")), "no Ray session was started under RAY_TMPDIR"

    assert main(["study", "--out", str(tmp_path / "pool"), *SWEEP]) == 0   # the local process pool
    capsys.readouterr()
    ray_runs, pool_runs = _csv(tmp_path / "ray/runs.csv", "seconds"), _csv(tmp_path / "pool/runs.csv", "seconds")
    assert len(ray_runs) == 8 and {r["backend"] for r in ray_runs} == {"memory"}
    assert ray_runs == pool_runs    # same rows, same order: each run is a deterministic function of its spec
    assert _csv(tmp_path / "ray/summary.csv", "seconds_mean") == _csv(tmp_path / "pool/summary.csv", "seconds_mean")
    assert (tmp_path / "ray/worst_case.csv").read_text() == (tmp_path / "pool/worst_case.csv").read_text()


def test_simulate_clients_as_ray_actors_over_grpc_is_exact(ray_cli: tuple) -> None:
    run, _ = ray_cli
    # one of 5 clients vanishes before its masked input: the server must recover its masks from shares
    res = run("simulate", "--ray", "--clients", "5", "--dim", "100", "--rounds", "1", "--dropout", "0.2",
              "--dropout-phase", "masked_input", "--json", "-")
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads(res.stdout)
    assert summary["workers"] == "ray"
    (r,) = summary["rounds"]
    assert r["outcome"] == "completed" and r["survivors"]["share_keys"] == 5 and r["survivors"]["masked_input"] == 4
    assert r["correct"] and summary["correct"]   # the server's aggregate digest equals the plaintext sum's
    assert r["bytes_sent_per_client"] > 100 * 4  # the actors' reports came back through the relay


def test_without_ray_the_flag_names_the_extra(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)   # as if `secagg[ray]` were not installed
    for argv in (["study", "--out", str(tmp_path / "o"), "--quick", "--ray"],
                 ["simulate", "--dim", "10", "--ray", "10.0.0.5:6379"]):
        t0 = time.monotonic()
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == EXIT_USAGE and out == ""
        assert err.count("\n") == 1 and "secagg[ray]" in err and "pip install '.[ray]'" in err, err
        assert time.monotonic() - t0 < 5   # before any run
    assert not (tmp_path / "o").exists()


def test_ray_usage_and_connection_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["study", "--out", str(tmp_path), "--quick", "--ray", "--grpc"])
    assert code == EXIT_USAGE and "give one of them" in capsys.readouterr().err
    code = main(["simulate", "--dim", "10", "--server-host", "10.0.0.5"])
    assert code == EXIT_USAGE and "--server-host applies to --ray" in capsys.readouterr().err
    code = main(["simulate", "--dim", "10", "--ray", "--server-host", "0.0.0.0"])
    assert code == EXIT_USAGE and "not a wildcard" in capsys.readouterr().err
    # nothing listens on port 1: refused at once instead of Ray's minutes of retries
    code = main(["simulate", "--dim", "10", "--clients", "3", "--rounds", "1", "--ray", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == EXIT_CONNECTION and "cannot reach the Ray cluster at 127.0.0.1:1" in err and "ray start --head" in err


def test_nothing_imports_ray_until_asked() -> None:
    probe = ("import sys, secagg.client, secagg.server.service, secagg.simulation.study, secagg.simulation.simulate, "
             "secagg.simulation.ray_backend, secagg.cli.main as m; m.build_parser(); print('ray' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "False", res.stderr
