"""The package as users get it: generated code in sync, layering contract, wheel contents."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    from grpc_tools import protoc

    out = tmp_path / "gen"
    out.mkdir()
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
                      str(ROOT / "proto/secagg/v1/secagg.proto")])
    assert rc == 0
    for name in ("secagg_pb2.py", "secagg_pb2.pyi", "secagg_pb2_grpc.py"):
        fresh = (out / "secagg/v1" / name).read_text()
        kept = (ROOT / "proto/secagg/v1" / name).read_text()
        assert fresh == kept, f"{name} is stale: regenerate with `python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/secagg/v1/secagg.proto`"


def test_layering_contract() -> None:
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter not installed")
    res = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_wheel_holds_every_package_and_no_bare_top_level(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {res.stderr[-300:]}")
    wheel = next(tmp_path.glob("secagg-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"secagg"}, f"wheel installs bare top-level modules: {tops}"
    for pkg in ("protocol", "server", "client", "simulation", "cli", "wire", "v1"):
        assert f"secagg/{pkg}/__init__.py" in names
        assert f"secagg/{pkg}/py.typed" in names
    for module in ("protocol/client.py", "protocol/server.py", "v1/secagg_pb2.py", "v1/secagg_pb2_grpc.py", "v1/secagg.proto"):
        assert f"secagg/{module}" in names
    # the wheel's code imports on its own, from a directory holding nothing else
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = "import secagg.protocol.driver, secagg.server.service, secagg.client, secagg.simulation.simulate, secagg.cli.main; print('ok')"
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""}, capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr


def test_console_script_help() -> None:
    exe = shutil.which("secagg")
    assert exe, "the secagg console script is not installed"
    res = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for cmd in ("bench", "serve", "client", "simulate", "rounds", "rollback"):
        assert cmd in res.stdout
