"""docs/client-api.md's examples run as written against a real server, and print what the doc shows.

Each example is a ```python block after ``<!-- example: NAME -->``; the output the doc shows is
the ```text block after ``<!-- output: NAME -->``.  The test writes ``ca.pem`` and
``alice.identity`` into a fresh directory, starts a real server (TLS on loopback, SQLite) with
``alice`` and four peers registered, replaces the doc's address ``aggregator.example:50051``
by the server's, runs the example in its own Python process while the peers take part from
this process, and compares the output line by line: numbers, round ids and hex digests may
differ, the words may not.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from grpc_harness import TEST_POLICY, async_test, running_server
from secagg.client import AsyncClient
from secagg.wire.identity import save_identity_key

DOC = Path(__file__).resolve().parents[1] / "docs" / "client-api.md"
DOC_ADDRESS = "aggregator.example:50051"
PEERS = ["c0", "c1", "c2", "c3"]
DIM = 7850   # the doc's model: shapes [(784, 10), (10,)]


def _block(kind: str, name: str) -> str:
    lang = "python" if kind == "example" else "text"
    match = re.search(rf"<!-- {kind}: {name} -->\s*```{lang}\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"docs/client-api.md lost its {kind} block {name!r}"
    return match.group(1)


_VARIABLE = re.compile(r"round-\d+-[0-9a-f]+|[0-9a-f]{16,}|-?\d+(?:\.\d*)?(?:e[+-]?\d+)?")


def _shape(line: str) -> str:
    """A line with its round ids, digests and numbers blanked: what must match the doc."""
    return _VARIABLE.sub("#", " ".join(line.split()))


async def _run_example(tmp_path: Path, name: str, *, peer_rounds: int | None, **server: object) -> str:
    """``peer_rounds=None``: the peers keep joining rounds until the example has finished."""
    async with running_server(tmp_path, len(PEERS), registered=["alice"], dim=DIM, mode=server.pop("mode", "active"),
                              min_clients=5, max_clients=5, lobby_seconds=0.2, phase_seconds=10.0, **server) as h:
        work = tmp_path / "app"
        work.mkdir()
        (work / "ca.pem").write_bytes(h.pki.ca_cert.read_bytes())
        save_identity_key(work / "alice.identity", h.keys["alice"])
        script = work / f"{name}.py"
        script.write_text(_block("example", name).replace(DOC_ADDRESS, f"localhost:{h.srv.port}"))

        async def peer(client_id: str) -> None:
            async with AsyncClient(f"127.0.0.1:{h.srv.port}", ca_cert=h.pki.ca_cert, identity_key=h.keys[client_id],
                                   client_id=client_id, server_name="localhost", policy=TEST_POLICY) as c:
                await c.run(lambda model, info: np.full(info.dim, 0.001), rounds=peer_rounds)

        app = asyncio.create_subprocess_exec(sys.executable, str(script), cwd=work,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        proc = await app
        peers = asyncio.gather(*(peer(c) for c in PEERS))
        out, err = await asyncio.wait_for(proc.communicate(), 50)
        assert proc.returncode == 0, out.decode() + err.decode()
        if peer_rounds:
            await asyncio.wait_for(peers, 20)
        else:
            peers.cancel()
            await asyncio.gather(peers, return_exceptions=True)
        return out.decode()


def _assert_prints_what_the_doc_shows(name: str, out: str) -> None:
    shown = [_shape(line) for line in _block("output", name).splitlines() if line.strip()]
    got = [_shape(line) for line in out.splitlines() if line.strip()]
    assert got == shown, f"example {name!r} printed:\n{out}"


@pytest.mark.parametrize("name, rounds", [("sync", 1), ("async", 1), ("run", 3)])
@async_test
async def test_client_api_example_runs_as_written(tmp_path, name, rounds):
    out = await _run_example(tmp_path, name, peer_rounds=rounds, rounds=rounds)
    _assert_prints_what_the_doc_shows(name, out)


@async_test
async def test_client_api_policy_example_refuses_a_semi_honest_round(tmp_path):
    out = await _run_example(tmp_path, "policy", peer_rounds=None, mode="semi-honest")
    _assert_prints_what_the_doc_shows("policy", out)
    assert "refused (mode)" in out and "ClientPolicy.semi_honest()" in out   # says what to do


def test_the_documented_option_defaults_are_the_code_defaults():
    """The options table quotes defaults; a change in the code must show up in the doc."""
    import dataclasses

    from secagg.client.api import ClientSettings

    defaults = {f.name: f.default for f in dataclasses.fields(ClientSettings) if f.default is not dataclasses.MISSING}
    rows = dict(re.findall(r"^\| `(\w+)`[^|]*\| ([^|]+) \|", DOC.read_text(), re.M))
    for option in ("connect_timeout", "retries", "wait_seconds"):
        number = re.match(r"[\d.]+", rows[option].strip())
        assert number and float(number.group()) == defaults[option], (option, rows[option], defaults[option])
