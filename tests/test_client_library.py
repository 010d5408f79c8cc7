"""The embeddable client library and server settings: mutual TLS, retries, secret hygiene, TOML."""

from __future__ import annotations

import asyncio
import logging
import socket

import numpy as np
import pytest
from grpc_harness import DIM, TEST_POLICY, async_test, running_server, update_of

from secagg.client import AsyncClient, Client, ClientError, ConnectionFailed, Rejected
from secagg.server.config import ConfigError, load
from secagg.server.store import Store
from secagg.server.tls import write_dev_pki
from secagg.wire.identity import identity_public_key, new_identity_key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@async_test
async def test_mutual_tls_admits_a_client_certificate_and_refuses_none(tmp_path):
    pki = write_dev_pki(tmp_path / "mtls", client_names=["c0", "c1", "c2"])
    async with running_server(tmp_path, 3, client_ca=str(pki.ca_cert), tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)) as h:
        # no client certificate: the TLS handshake fails, so the connection never becomes ready
        bare = AsyncClient(h.address, ca_cert=pki.ca_cert, identity_key=h.keys["c0"], client_id="c0", retries=0, connect_timeout=2, policy=TEST_POLICY)
        with pytest.raises(ConnectionFailed, match="requires a client certificate") as exc:
            await bare.status()
        assert not exc.value.retryable
        await bare.close()

        async def one(c: str):
            async with AsyncClient(h.address, ca_cert=pki.ca_cert, identity_key=h.keys[c], client_id=c, retries=0, policy=TEST_POLICY,
                                   client_cert=pki.clients[c].cert, client_key=pki.clients[c].key) as cl:
                return await cl.participate(update_of(c))

        outs = await asyncio.gather(*(one(c) for c in ("c0", "c1", "c2")))
        assert all(o.ok for o in outs), outs


@async_test
async def test_connection_setup_is_retried_until_the_server_appears(tmp_path):
    """The clients start first; the server comes up about a second later on their port."""
    port = _free_port()
    pki = write_dev_pki(tmp_path / "late")
    ids = ["late0", "late1", "late2"]
    keys = {c: new_identity_key() for c in ids}
    with Store(tmp_path / "secagg.db") as st:   # the database the server will open
        for c, k in keys.items():
            st.register_identity(c, identity_public_key(k))
    clients = [AsyncClient(f"127.0.0.1:{port}", ca_cert=pki.ca_cert, identity_key=keys[c], client_id=c, retries=8, backoff=0.2, policy=TEST_POLICY,
                           connect_timeout=0.5) for c in ids]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks = [asyncio.create_task(c.participate(update_of(f"c{i}"))) for i, c in enumerate(clients)]
    await asyncio.sleep(1.0)
    assert not any(t.done() for t in tasks)
    async with running_server(tmp_path, 3, min_clients=3, max_clients=3, address=f"127.0.0.1:{port}",
                              tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)) as h:
        outs = await asyncio.gather(*tasks)
        assert h.store.round(outs[0].round_id).cohort and set(h.store.round(outs[0].round_id).cohort) == set(ids)
    for c in clients:
        await c.close()
    assert all(o.ok for o in outs)
    assert loop.time() - t0 >= 1.0


@async_test
async def test_unreachable_server_gives_connection_failed_with_advice(tmp_path):
    pki = write_dev_pki(tmp_path / "none")
    c = AsyncClient(f"127.0.0.1:{_free_port()}", ca_cert=pki.ca_cert, identity_key=bytes(32), client_id="c0", retries=1,
                    backoff=0.05, connect_timeout=0.3)
    with pytest.raises(ConnectionFailed, match="after 2 attempts: connection refused .*is the server running"):
        await c.participate(np.zeros(3))
    await c.close()


@async_test
async def test_no_secret_reaches_logs_errors_or_reprs(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    async with running_server(tmp_path, 3) as h:
        outs = await h.participate(["c0", "c1", "c2"])
        assert all(o.ok for o in outs.values())
        wrong = h.client("c0", key=h.keys["c1"])
        with pytest.raises(Rejected) as exc:
            await wrong.participate(update_of("c0"))
    texts = [caplog.text, str(exc.value), repr(exc.value), repr(wrong), repr(wrong.settings),
             repr(Client(h.address, ca_cert=h.pki.ca_cert, identity_key=h.keys["c2"], client_id="c2"))]
    for key in h.keys.values():
        for form in (key.hex(), repr(key), key.hex().upper()):
            assert all(form not in t for t in texts)


def test_sync_client_rejects_a_wrong_length_update_with_the_needed_length(tmp_path):
    async def go():
        async with running_server(tmp_path, 3, registered=["bad"]) as h:   # refused before its hello: never seated
            loop = asyncio.get_running_loop()
            good = [loop.run_in_executor(None, lambda c=c: Client(h.address, ca_cert=h.pki.ca_cert, identity_key=h.keys[c],
                                                                  client_id=c, policy=TEST_POLICY).participate(update_of(c))) for c in ("c0", "c1", "c2")]
            bad = loop.run_in_executor(None, lambda: Client(h.address, ca_cert=h.pki.ca_cert, identity_key=h.keys["bad"],
                                                            client_id="bad", policy=TEST_POLICY).participate(np.zeros(DIM + 1)))
            return await asyncio.gather(*good, bad, return_exceptions=True)

    *good, bad = asyncio.run(go())
    assert all(o.ok for o in good), good
    assert f"needs {DIM}" in str(bad)


def test_toml_settings_and_flag_overrides(tmp_path):
    f = tmp_path / "server.toml"
    f.write_text('[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\ndim = 42\ngroups = 2\nmin_clients = 6\nrule = "median"\n')
    cfg = load(f, {"dim": 7, "mode": None})
    assert (cfg.dim, cfg.groups, cfg.rule, cfg.mode) == (7, 2, "median", "active")   # active is the default
    f.write_text('dim = 5\nbogus = 1\n')
    with pytest.raises(ConfigError, match="unknown setting"):
        load(f, {})
    with pytest.raises(ConfigError, match="TLS is required"):
        load(None, {})
    with pytest.raises(ConfigError, match="groups need at least"):
        load(None, {"tls_cert": "c", "tls_key": "k", "groups": 2, "min_clients": 4})
    with pytest.raises(ConfigError, match="unknown rule"):
        load(None, {"tls_cert": "c", "tls_key": "k", "rule": "mode"})


@async_test
async def test_wrong_ca_fails_at_once_and_says_so(tmp_path):
    """A certificate our CA does not verify cannot be fixed by retrying: no backoff, a precise cause."""
    other = write_dev_pki(tmp_path / "other")
    async with running_server(tmp_path, 3) as h:
        c = AsyncClient(h.address, ca_cert=other.ca_cert, identity_key=h.keys["c0"], client_id="c0", retries=5, backoff=5.0,
                        policy=TEST_POLICY)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ConnectionFailed, match="certificate our CA does not verify") as exc:
            await c.status()
        assert not exc.value.retryable and loop.time() - t0 < 4.0   # far below one 5 s backoff: no retry happened
        await c.close()


@pytest.mark.parametrize("option, value", [("connect_timeout", float("nan")), ("connect_timeout", -1.0), ("wait_seconds", 0),
                                           ("backoff", float("inf")), ("retries", -1), ("retries", 1.5)])
def test_nonsense_timeouts_are_refused(tmp_path, option, value):
    pki = write_dev_pki(tmp_path / "p")
    with pytest.raises(ClientError, match=option):
        AsyncClient("127.0.0.1:1", ca_cert=pki.ca_cert, identity_key=bytes(32), client_id="c0", **{option: value})


def test_unusable_identity_key_is_a_client_error(tmp_path):
    from secagg.client import CredentialsError

    pki = write_dev_pki(tmp_path / "p")
    bad = tmp_path / "bad.identity"
    bad.write_text("not a key")
    for key in (bad, tmp_path / "missing.identity", b"short"):
        with pytest.raises(CredentialsError):
            AsyncClient("127.0.0.1:1", ca_cert=pki.ca_cert, identity_key=key, client_id="c0")
    with pytest.raises(CredentialsError, match="CA certificate"):
        AsyncClient("127.0.0.1:1", ca_cert=tmp_path / "no-ca.pem", identity_key=bytes(32), client_id="c0")
