"""Operator tooling over a real server: one server per database and port, gRPC health and
reflection, Prometheus metrics after a real round, `secagg status` / `secagg events`, and the
documented Python API example (run as written in docs/operating.md)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_harness import async_test, running_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from secagg.cli.main import EXIT_CONNECTION, EXIT_REJECTED, main
from secagg.server.config import ConfigError, ServerConfig
from secagg.server.service import start
from secagg.wire.identity import new_identity_key, save_identity_key

ROOT = Path(__file__).resolve().parents[1]


def _channel(h) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(h.address, grpc.ssl_channel_credentials(root_certificates=h.pki.ca_cert.read_bytes()))


def _cfg(h, **overrides) -> ServerConfig:
    """Another server's settings: the harness's, with its own free port unless overridden."""
    values = {"address": "127.0.0.1:0", "db": h.cfg.db, "tls_cert": h.cfg.tls_cert, "tls_key": h.cfg.tls_key,
              "dim": h.cfg.dim, "min_clients": 3, "max_clients": 3, "mode": "semi-honest"}
    return ServerConfig(**(values | overrides))


# -- health and reflection ----------------------------------------------------------------------

@async_test
async def test_health_service_and_reflection_over_tls(tmp_path):
    async with running_server(tmp_path, 3) as h:
        async with _channel(h) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "secagg.v1.SecAgg"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
            assert err.value.code() is grpc.StatusCode.NOT_FOUND

            reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
            call = reflect.ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = await call.read()
            names = {s.name for s in listed.list_services_response.service}
            assert {"secagg.v1.SecAgg", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
            await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="secagg.v1.SecAgg"))
            files = (await call.read()).file_descriptor_response.file_descriptor_proto
            assert files and any(b"Participate" in f for f in files)   # the real service descriptor
            await call.done_writing()

            watch = health.Watch(health_pb2.HealthCheckRequest(service="secagg.v1.SecAgg"))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.create_task(h.srv.stop(grace=1.0))
            assert (await asyncio.wait_for(watch.read(), 5)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            await stopping


# -- metrics ------------------------------------------------------------------------------------

def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


@async_test
async def test_metrics_endpoint_counts_a_real_round(tmp_path):
    async with running_server(tmp_path, 4, registered=["intruder"], metrics_port=0) as h:
        assert h.srv.metrics_port
        before = await asyncio.to_thread(_scrape, h.srv.metrics_port)
        assert before['secagg_rounds_total{outcome="completed"}'] == 0
        assert before["secagg_model_version"] == 1

        # a refused stream (a hello signed with the wrong key), then a round where c3 leaves after joining
        bad = await h.raw("intruder", key=new_identity_key())
        code, _ = await bad.status()
        assert code is grpc.StatusCode.UNAUTHENTICATED
        quitter = await h.raw("c3")
        await h.wait_in_lobby("c3")
        lobby = await asyncio.to_thread(_scrape, h.srv.metrics_port)
        assert lobby["secagg_lobby_clients"] == 1 and lobby["secagg_connected_clients"] == 1

        async def leave_after_joining() -> None:
            await quitter.join()
            await quitter.close()

        outs, _ = await asyncio.gather(h.participate(["c0", "c1", "c2"]), leave_after_joining())
        assert all(o.ok for o in outs.values()), outs
        await h.rounds_finished()
        after = await asyncio.to_thread(_scrape, h.srv.metrics_port)
        record = h.record()

    assert record.outcome == "completed" and [d["client"] for d in record.dropouts] == ["c3"]
    assert after['secagg_rounds_total{outcome="completed"}'] == 1
    assert after['secagg_rounds_total{outcome="aborted"}'] == 0
    assert after["secagg_round_clients_total"] == 4
    assert after["secagg_model_version"] == 2
    assert after['secagg_group_checks_total{result="accepted"}'] == 1
    d = record.dropouts[0]
    assert after[f'secagg_dropouts_total{{phase="{d["phase"]}",reason="{d["reason"]}"}}'] == 1
    assert after['secagg_rejections_total{kind="rejected",status="UNAUTHENTICATED"}'] == 1
    assert after['secagg_rejections_total{kind="dropped",status="CANCELLED"}'] == 1
    for phase in ("advertise_keys", "share_keys", "masked_input", "unmasking"):
        assert after[f'secagg_phase_duration_seconds_count{{phase="{phase}"}}'] == 1, phase
    assert after["secagg_round_duration_seconds_count"] == 1
    assert 0 < after["secagg_round_duration_seconds_sum"] < 60


@async_test
async def test_metrics_port_in_use_is_refused_and_releases_everything(tmp_path):
    async with running_server(tmp_path, 3, metrics_port=0) as h:
        taken = h.srv.metrics_port
        other = tmp_path / "other.db"
        with pytest.raises(ConfigError, match=rf"cannot serve metrics on 127\.0\.0\.1:{taken}: .*choose another --metrics-port"):
            await start(_cfg(h, db=str(other), metrics_port=taken))
        srv = await start(_cfg(h, db=str(other)))   # the failed start left neither the lock nor a port behind
        await srv.stop(grace=0.1)


@pytest.mark.parametrize("module", ["prometheus_client", "grpc_health.v1.health", "grpc_reflection.v1alpha.reflection"])
def test_a_server_without_the_server_extra_names_it(tmp_path, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)   # as if that package were not installed

    async def go() -> None:
        async with running_server(tmp_path, 3, metrics_port=0):
            pass

    with pytest.raises(ConfigError, match=re.escape("pip install 'secagg[server]'")):
        asyncio.run(go())


# -- one server per database and port -----------------------------------------------------------

@async_test
async def test_a_second_server_on_the_same_database_is_refused_and_the_first_keeps_its_round(tmp_path):
    async with running_server(tmp_path, 3, phase_seconds=30.0) as h:
        raws = [await h.raw(c) for c in ("c0", "c1", "c2")]
        for r in raws:
            await r.join()                       # a round is running
        round_id = h.srv.coordinator.round_id
        with pytest.raises(ConfigError) as err:
            await start(_cfg(h))
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"database {h.cfg.db} is in use by another secagg server (pid {os.getpid()}")
        assert f"listening on 127.0.0.1:{h.port}" in message
        assert h.store.round(round_id).outcome == "running"   # the second start did not touch it
        assert not any("found at restart" in (r.error or "") for r in h.store.rounds())
        # read-only commands still work beside the running server
        code = await asyncio.to_thread(main, ["rounds", "--db", h.cfg.db])
        assert code == 0
    srv = await start(_cfg(h))   # the lock went with the first server
    await srv.stop(grace=0.1)


def test_second_server_processes_are_refused_naming_the_port_or_the_database(tmp_path):
    async def go() -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
        async with running_server(tmp_path, 3) as h:
            base = [sys.executable, "-m", "secagg.cli", "serve", "--tls-cert", h.cfg.tls_cert, "--tls-key", h.cfg.tls_key,
                    "--dim", str(h.cfg.dim), "--min-clients", "3", "--rounds", "1"]
            same_db = await asyncio.to_thread(subprocess.run, [*base, "--db", h.cfg.db, "--address", "127.0.0.1:0"],
                                              capture_output=True, text=True, timeout=60)
            same_port = await asyncio.to_thread(subprocess.run, [*base, "--db", str(tmp_path / "b.db"), "--address", h.address],
                                                capture_output=True, text=True, timeout=60)
            assert h.srv.coordinator.sessions == {} and not h.srv.task.done()   # the first one is unharmed
            return same_db, same_port

    same_db, same_port = asyncio.run(go())
    port = same_port.args[same_port.args.index("--address") + 1].rsplit(":", 1)[1]
    assert same_db.returncode == 2, same_db.stderr
    assert re.search(rf"^secagg serve: error: database \S+secagg\.db is in use by another secagg server \(pid {os.getpid()}\b",
                     same_db.stderr, re.M), same_db.stderr
    assert same_port.returncode == 2, same_port.stderr
    assert re.search(rf"^secagg serve: error: cannot listen on 127\.0\.0\.1:{port}: port {port} is already in use "
                     rf"\(by pid {os.getpid()}\b", same_port.stderr, re.M), same_port.stderr
    assert len(same_port.stderr.strip().splitlines()) == 1, same_port.stderr   # one line, nothing created
    assert len(same_db.stderr.strip().splitlines()) == 1, same_db.stderr
    assert not (tmp_path / "b.db").exists()
    assert "Traceback" not in same_db.stderr + same_port.stderr


# -- secagg status / secagg events --------------------------------------------------------------

@async_test
async def test_secagg_status_asks_the_running_server(tmp_path, capsys):
    async with running_server(tmp_path, 4) as h:
        key = tmp_path / "c0.identity"
        save_identity_key(key, h.keys["c0"])
        waiting = await h.raw("c1")
        await h.wait_in_lobby("c1")
        argv = ["status", "--server", h.address, "--ca", str(h.pki.ca_cert), "--client-id", "c0", "--key", str(key)]
        assert await asyncio.to_thread(main, argv) == 0
        out = capsys.readouterr().out
        fields = dict(line.split(None, 1) for line in out.splitlines())
        assert fields["server"] == h.address and fields["model_version"] == "1" and fields["waiting_clients"] == "1"
        assert fields["phase"] == "lobby" and fields["dim"] == str(h.cfg.dim) and fields["round_id"] == "-"

        assert await asyncio.to_thread(main, [*argv, "--json", "-"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["waiting_clients"] == 1 and status["model_version"] == 1

        # without a registered key the server refuses (no public reads), and the CLI says what to pass
        code = await asyncio.to_thread(main, ["status", "--server", h.address, "--ca", str(h.pki.ca_cert)])
        err = capsys.readouterr().err
        assert code == EXIT_REJECTED and "UNAUTHENTICATED" in err and "pass --client-id and --key of a registered client" in err
        await waiting.close()


@async_test
async def test_secagg_status_with_the_server_down_is_a_connection_error(tmp_path, capsys):
    async with running_server(tmp_path, 3) as h:
        address, ca = h.address, str(h.pki.ca_cert)
    code = await asyncio.to_thread(main, ["status", "--server", address, "--ca", ca, "--timeout", "2"])
    assert code == EXIT_CONNECTION, capsys.readouterr()


@async_test
async def test_secagg_events_lists_and_filters_the_events_table_beside_a_running_server(tmp_path, capsys):
    async with running_server(tmp_path, 3, registered=["intruder"]) as h:
        bad = await h.raw("intruder", key=new_identity_key())
        assert (await bad.status())[0] is grpc.StatusCode.UNAUTHENTICATED
        quitter = await h.raw("c2")

        async def leave_after_joining() -> None:
            await quitter.join()
            await quitter.close()

        outs, _ = await asyncio.gather(h.participate(["c0", "c1"], ), leave_after_joining())
        round_id = h.record().round_id

        # the server still runs (and holds the database lock) while the CLI reads
        def events(*args: str) -> tuple[int, str]:
            code = main(["events", "--db", h.cfg.db, *args])
            return code, capsys.readouterr().out

        code, out = await asyncio.to_thread(events)
        assert code == 0
        lines = out.splitlines()
        assert lines[0].split() == ["ID", "AT", "ROUND", "CLIENT", "KIND", "STATUS", "REASON"]
        assert any("intruder" in line and "UNAUTHENTICATED" in line for line in lines)
        assert any("c2" in line and round_id in line for line in lines)

        code, out = await asyncio.to_thread(events, "--client", "intruder", "--kind", "rejected", "--json", "-")
        rows = json.loads(out)
        assert code == 0 and rows and {r["client_id"] for r in rows} == {"intruder"}
        assert {r["kind"] for r in rows} == {"rejected"} and rows[0]["status"] == "UNAUTHENTICATED" and rows[0]["round_id"] is None

        code, out = await asyncio.to_thread(events, "--round", round_id, "--json", "-")
        rows = json.loads(out)
        assert rows and {r["round_id"] for r in rows} == {round_id} and {r["client_id"] for r in rows} == {"c2"}

        code, out = await asyncio.to_thread(events, "--kind", "rejected", "--client", "c0")
        assert code == 0 and out.startswith("no events recorded in") and "client c0, kind rejected" in out

        target = tmp_path / "events.json"
        code, out = await asyncio.to_thread(events, "--limit", "1", "--json", str(target))
        assert code == 0 and len(json.loads(target.read_text())) == 1


# -- the documented Python API --------------------------------------------------------------------

def _doc_example() -> str:
    text = (ROOT / "docs/operating.md").read_text()
    match = re.search(r"<!-- example: python-api -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/operating.md lost its Python API example"
    return match.group(1)


def test_the_python_api_example_in_operating_md_runs_as_written(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_doc_example())
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^round-\S+: completed, model v2$", res.stdout, re.M), res.stdout
    assert re.search(r"^metrics: secagg_rounds_total\{outcome=\"completed\"\} 1\.0$", res.stdout, re.M), res.stdout


@async_test
async def test_metrics_count_every_rejection_before_authentication_even_when_rows_are_suppressed(tmp_path):
    async with running_server(tmp_path, 3, registered=["intruder"], metrics_port=0) as h:
        h.srv.coordinator.preauth.burst = 3          # record 3 rows one by one, summarise the rest
        for _ in range(7):
            bad = await h.raw("intruder", key=new_identity_key())
            assert (await bad.status())[0] is grpc.StatusCode.UNAUTHENTICATED
            await bad.close()
        h.srv.coordinator.preauth.flush()            # what the end of the window does
        samples = await asyncio.to_thread(_scrape, h.srv.metrics_port)
        rows = [e for e in h.store.events() if e.kind in ("rejected", "suppressed")]
    assert samples['secagg_rejections_total{kind="rejected",status="UNAUTHENTICATED"}'] == 3
    assert samples['secagg_rejections_total{kind="suppressed",status="UNAUTHENTICATED"}'] == 4
    assert [e.kind for e in rows] == ["rejected"] * 3 + ["suppressed"]   # the table stays small


@async_test
async def test_rejections_still_counted_at_shutdown_are_recorded(tmp_path):
    from secagg.server.store import Store
    from secagg.server.tls import new_identity_key as fresh_key

    async with running_server(tmp_path, 3, registered=["intruder"]) as h:
        h.srv.coordinator.preauth.burst = 1           # one row, the rest counted for the window's summary
        for _ in range(4):
            bad = await h.raw("intruder", key=fresh_key())
            assert (await bad.status())[0] is grpc.StatusCode.UNAUTHENTICATED
            await bad.close()
        # the 10 s window has not ended: the server stops first (running_server stops it on exit)
    with Store(tmp_path / "secagg.db") as store:
        rows = [e for e in store.events() if e.kind in ("rejected", "suppressed")]
    assert [e.kind for e in rows] == ["rejected", "suppressed"], rows
    assert rows[1].status == "UNAUTHENTICATED" and "3 more UNAUTHENTICATED" in rows[1].reason
