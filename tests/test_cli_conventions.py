"""CLI conventions through the real CLI: --version, defaults in --help, choices, one spelling of
--neighbors and attack names, the adaptive --groups, documented exit codes, no false "yes" after an
aborted round, the sim extra named when missing, server config validation, and serve's logging."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from secagg.cli.main import EXIT_ABORTED, EXIT_CONNECTION, EXIT_FAILED, EXIT_REJECTED, EXIT_USAGE, build_parser, main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def parse_exit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """argparse-level outcomes (--help, --version, bad choices) end in SystemExit."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "secagg.cli", *argv], capture_output=True, text=True, timeout=timeout)


# -- parsing conventions ----------------------------------------------------------------------------

def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    code, out, _ = parse_exit(capsys, "--version")
    assert code == 0 and out.strip() == f"secagg {version('secagg')}"


def test_help_shows_defaults_choices_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = parse_exit(capsys, "serve", "--help")
    flat = " ".join(out.split())
    assert code == 0
    assert "--mode {active,semi-honest}" in out and "(default: active)" in flat
    assert "clients needed to start a round (default: 5)" in flat
    assert "--log-level {debug,info,warning,error}" in out and "--log-format {text,json}" in out
    _, out, _ = parse_exit(capsys, "simulate", "--help")
    flat = " ".join(out.split())
    assert "--clients CLIENTS default: 30" in flat and "(default: 0.1)" in flat and "(default: 3 from 30 clients" in flat
    _, out, _ = parse_exit(capsys, "bench", "--help")
    flat = " ".join(out.split())
    assert "0 = the complete graph (default: 0)" in flat and "--seed SEED default: 0" in flat
    _, out, _ = parse_exit(capsys, "--help")
    assert "2 usage, 3 connection, 4 rejected" in " ".join(out.split())


def test_serve_mode_has_choices(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = parse_exit(capsys, "serve", "--mode", "passive")
    assert code == EXIT_USAGE and "invalid choice: 'passive' (choose from 'active', 'semi-honest')" in err


def test_client_requires_update_instead_of_submitting_zeros(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = parse_exit(capsys, "client", "--server", "127.0.0.1:1", "--ca", "ca.pem", "--client-id", "a", "--key", "a.identity")
    assert code == EXIT_USAGE and "the following arguments are required: --update" in err


def test_neighbors_one_spelling_across_commands(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for cmd in ("bench", "simulate", "serve"):
        assert parser.parse_args([cmd, "--neighbors", "full"]).neighbors == 0
        assert parser.parse_args([cmd, "--neighbors", "0"]).neighbors == 0
        assert parser.parse_args([cmd, "--neighbors", "4"]).neighbors == 4
    code, _, err = parse_exit(capsys, "simulate", "--neighbors", "3")
    assert code == EXIT_USAGE and "expected an even number >= 2, or 0 for the complete graph; got 3" in err
    for spelling in ("0", "full"):
        code, out, _ = run(capsys, "bench", "--clients", "4", "--dim", "16", "--neighbors", spelling)
        assert code == 0 and "neighbours 3," in out and "correct=true" in out   # complete graph of 4: degree 3


def test_attack_names_accept_dashes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from secagg.simulation.attacks import AttackConfig
    from secagg.simulation.study import parse_attack

    assert parse_attack("sign-flip").name == "sign_flip" and AttackConfig(name="Label-Flip").name == "label_flip"
    code, _, _ = run(capsys, "study", "--out", str(tmp_path), "--clients", "10", "--rounds", "1", "--seeds", "1", "--jobs", "1",
                     "--group-sizes", "2", "--rules", "mean", "--attacks", "sign-flip", "--byzantine", "0.2",
                     "--quick", "--non-iid", "iid", "--bucket", "1", "--bypass-bounds", "false")
    assert code == 0
    with (tmp_path / "runs.csv").open() as fh:
        assert [r["attack"] for r in csv.DictReader(fh)] == ["sign_flip"]
    code, _, err = run(capsys, "simulate", "--attack", "sign-flop", "--byzantine", "0.2")
    assert code == EXIT_USAGE and "unknown attack 'sign_flop'" in err


# -- simulate: adaptive groups, no false "yes", exit codes --------------------------------------------

def test_simulate_five_clients_without_groups(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "simulate", "--clients", "5", "--dim", "20", "--rounds", "1", "--dropout", "0")
    assert code == 0, err
    assert "5 clients in 1 group(s)" in out
    assert "every aggregate equals the plaintext sum of its survivors' inputs: yes" in out


def test_aborted_simulation_never_claims_every_aggregate(capsys: pytest.CaptureFixture[str]) -> None:
    # threshold 5 of 5 and one client gone before unmasking: the round must abort
    code, out, err = run(capsys, "simulate", "--clients", "5", "--dim", "20", "--rounds", "1", "--dropout", "0.2",
                         "--dropout-phase", "unmasking", "--threshold", "5")
    assert code == EXIT_ABORTED, out + err
    assert "aborted" in out and "every aggregate equals" not in out
    assert "1 of 1 round(s) did not complete (nothing released); no aggregate to verify" in " ".join(out.split())


def test_missing_sim_extra_is_named(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("rich", "sklearn", "matplotlib"):
        monkeypatch.setitem(sys.modules, name, None)   # as if not installed
    code, out, err = run(capsys, "simulate", "--dim", "10")
    assert code == EXIT_USAGE and out == ""
    assert "`secagg simulate` needs the 'sim' extra" in err and "missing: rich" in err and "pip install '.[sim]'" in err
    code, _, err = run(capsys, "study", "--out", str(tmp_path), "--quick")
    assert code == EXIT_USAGE and "`secagg study` needs the 'sim' extra" in err and "sklearn" in err and "matplotlib" in err


def test_internal_error_exit_code(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import secagg.protocol.bench

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(secagg.protocol.bench, "bench_round", broken)
    code, _, err = run(capsys, "bench", "--clients", "4", "--dim", "8")
    assert code == EXIT_FAILED and "secagg bench: internal error: RuntimeError: boom" in err


# -- a real server: connection 3, rejected 4, JSON logs, config errors ----------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    assert main(["certs", "--out", str(d), "--client", "alice"]) == 0
    np.save(d / "u.npy", np.zeros(20))
    return d


@pytest.fixture(scope="module")
def server(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    work = tmp_path_factory.mktemp("serve")
    err = work / "serve.err"
    with err.open("w") as err_fh:
        proc = subprocess.Popen([sys.executable, "-m", "secagg.cli", "serve", "--db", str(work / "s.db"),
                                 "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                                 "--address", "127.0.0.1:0", "--dim", "20", "--min-clients", "3", "--log-format", "json"],
                                stdout=subprocess.PIPE, stderr=err_fh, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            m = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
            assert m, line + err.read_text()
            yield m.group(1), err
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def client_argv(pki: Path, address: str) -> list[str]:
    return ["client", "--server", address, "--ca", str(pki / "ca.pem"), "--client-id", "alice",
            "--key", str(pki / "alice.identity"), "--update", str(pki / "u.npy"), "--wait", "3"]


def test_client_connection_refused_exit_code(pki: Path) -> None:
    res = cli(*client_argv(pki, "127.0.0.1:1"))
    assert res.returncode == EXIT_CONNECTION, res.stderr
    assert "cannot reach 127.0.0.1:1" in res.stderr and "connection refused" in res.stderr


def test_client_rejected_exit_code_and_json_logs(pki: Path, server: tuple[str, Path]) -> None:
    address, err = server
    res = cli(*client_argv(pki, address))
    assert res.returncode == EXIT_REJECTED, res.stderr
    assert "server rejected us (UNAUTHENTICATED): client 'alice' is not registered" in res.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "verified" not in err.read_text():
        time.sleep(0.1)
    lines = [json.loads(line) for line in err.read_text().splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(r) for r in lines)
    assert any(r["level"] == "INFO" and "ledger of" in r["message"] for r in lines)


def test_serve_config_errors_name_key_value_and_allowed(pki: Path, tmp_path: Path) -> None:
    base = f'tls_cert = "{pki / "server.pem"}"\ntls_key = "{pki / "server.key"}"\ndb = "{tmp_path / "x.db"}"\n'
    cases = {
        'dim = "650"': "dim must be an integer (>= 1), got '650' (a string)",
        "groups = 6.5": "groups must be an integer (at least 1), got 6.5 (a float)",
        "public_reads = 1": "public_reads must be true or false, got 1 (an integer)",
        "phase_seconds = 0": "phase_seconds must be > 0, got 0",
        'mode = "passive"': "mode must be one of 'active', 'semi-honest', got 'passive'",
        "min_client = 5": "unknown setting 'min_client' in {path} (did you mean 'min_clients'?)",
        "clip_norm = nan": "clip_norm must be a finite number, got nan",
    }
    toml = tmp_path / "server.toml"
    for line, message in cases.items():
        toml.write_text(base + line + "\n")
        res = cli("serve", "--config", str(toml))
        assert res.returncode == EXIT_USAGE, (line, res.stderr)
        assert res.stderr == f"secagg serve: error: {message.format(path=toml)}\n", res.stderr   # one line, no traceback
    # a certificate with another's key: named here, not gRPC's "Failed to bind"
    res = cli("serve", "--db", str(tmp_path / "y.db"), "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "alice.key"),
              "--address", "127.0.0.1:0")
    assert res.returncode == EXIT_USAGE
    assert res.stderr == (f"secagg serve: error: tls_key {pki / 'alice.key'} does not belong to tls_cert {pki / 'server.pem'} "
                          "(their public keys differ): pass the private key made with that certificate\n")
    assert not (tmp_path / "y.db").exists()   # refused before creating anything


def test_schema_covers_fields_by_annotation() -> None:
    """A field added to ServerConfig is type-checked without a schema entry (types come from annotations)."""
    import dataclasses

    from secagg.server.config import ConfigError, ServerConfig, check_value

    for f in dataclasses.fields(ServerConfig):
        with pytest.raises(ConfigError, match=f"^{f.name} must be "):
            check_value(f.name, object())
    with pytest.raises(ConfigError, match=r"^metrics_port must be an integer \(or unset\)"):
        check_value("metrics_port", "9100")
    check_value("metrics_port", None)


def test_rich_log_handler_shares_the_progress_console() -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    from secagg.cli.log import setup_logging

    console = Console(file=open(os.devnull, "w"))
    root = logging.getLogger()
    level = root.level
    try:
        handler = setup_logging("warning", console=console)
        assert isinstance(handler, RichHandler) and handler.console is console
        again = setup_logging("info", "json")
        assert handler not in root.handlers and again in root.handlers   # replaced, never stacked
    finally:
        for h in [h for h in root.handlers if getattr(h, "_secagg", False)]:
            root.removeHandler(h)
        root.setLevel(level)
        console.file.close()


def test_plain_log_lines_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.logging import RichHandler

    from secagg.cli.log import setup_logging

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    root = logging.getLogger()
    level = root.level
    try:
        handler = setup_logging("info")
        assert not isinstance(handler, RichHandler)   # a log file gets whole lines, not 80-column wrapping
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# -- docs/operating.md's walk-through is runnable as written -------------------------------------------

def test_operating_walkthrough_commands_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import shlex

    from secagg.server.config import load

    doc = (Path(__file__).resolve().parents[1] / "docs" / "operating.md").read_text()
    head = doc[doc.index("## 1."):doc.index("## 4.")]
    commands = [line[2:] for line in head.replace("\\\n", " ").splitlines() if line.startswith("$ secagg ")]
    certs = next(c for c in commands if c.startswith("secagg certs"))
    register = next(c for c in commands if "--public-key-file" in c)
    serve = next(c for c in commands if c.startswith("secagg serve"))
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(certs)[1:]) == 0
    assert main(shlex.split(register)[1:]) == 0   # the .pub file the doc names exists
    names = shlex.split(certs)[shlex.split(certs).index("--client"):][1::2]
    for name in names[:-1]:                       # the doc's loop over the identity key files
        assert main(["register", "--db", "secagg.db", "--client-id", name, "--key", f"pki/{name}.identity"]) == 0
    capsys.readouterr()
    args = build_parser().parse_args(shlex.split(serve)[1:])
    assert args.min_clients == len(names) == 5    # as many registered clients as a round needs
    from secagg.cli.serve import _FLAGS

    cfg = load(args.config, {k: getattr(args, k) for k in (*_FLAGS, "public_reads")})   # validates, cert/key pair included
    assert (cfg.dim, cfg.min_clients, cfg.rounds) == (10, 5, 1)


def test_json_has_one_meaning_across_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--json PATH` writes there, `--json -` (or a bare `--json`) prints the JSON alone on stdout."""
    from secagg.server.store import Store

    db = tmp_path / "s.db"
    Store(db).close()
    for cmd in (["models", "--db", str(db)], ["rounds", "--db", str(db)]):
        code, out_dash, _ = run(capsys, *cmd, "--json", "-")
        code2, out_bare, _ = run(capsys, *cmd, "--json")
        target = tmp_path / cmd[0] / "out.json"
        code3, out_path, _ = run(capsys, *cmd, "--json", str(target))
        assert code == code2 == code3 == 0 and out_path == ""
        assert json.loads(out_dash) == json.loads(out_bare) == json.loads(target.read_text())
    code, out, _ = run(capsys, "bench", "--clients", "5", "--dim", "20", "--json", "-")
    assert code == 0 and json.loads(out)["correct"] is True   # stdout is the JSON alone, no table
    target = tmp_path / "bench" / "b.json"
    code, out, _ = run(capsys, "bench", "--clients", "5", "--dim", "20", "--json", str(target))
    assert code == 0 and json.loads(target.read_text())["clients"] == 5 and "correct" in out
