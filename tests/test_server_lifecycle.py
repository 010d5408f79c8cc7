"""Server lifecycle: a stop mid-round and a restart leave truthful records; settings fail early."""

from __future__ import annotations

import asyncio

import pytest
from grpc_harness import async_test, running_server

from secagg.server.config import ConfigError, ServerConfig
from secagg.server.store import Store


@async_test
async def test_stopping_mid_round_records_the_round_as_failed(tmp_path):
    async with running_server(tmp_path, 3, phase_seconds=30.0) as h:
        raws = [await h.raw(c) for c in ("c0", "c1", "c2")]
        for r in raws:
            await r.join()                       # the round waits in advertise_keys
        round_id = h.srv.coordinator.round_id
        assert h.store.round(round_id).outcome == "running"
        h.srv.task.cancel()                      # what SIGINT/SIGTERM do in `secagg serve`
        with pytest.raises(asyncio.CancelledError):
            await h.srv.task
        rec = h.store.round(round_id)
        assert rec.outcome == "failed" and "stopped during the round" in rec.error


def test_a_restart_closes_rounds_left_running(tmp_path):
    db = tmp_path / "secagg.db"
    with Store(db) as st:
        st.begin_round("round-crashed", {}, [], [])

    async def go() -> str:
        async with running_server(tmp_path, 3) as h:
            return h.store.round("round-crashed").error

    assert "found at restart" in asyncio.run(go())


@pytest.mark.parametrize(("overrides", "message"), [
    ({"threshold": 0.4, "mode": "semi-honest"}, "unsafe in semi-honest mode"),
    ({"threshold": 0.6, "mode": "active"}, "unsafe in active mode"),
    ({"threshold": 0.6}, "unsafe in active mode"),           # the default mode is active
    ({"threshold": 2, "min_clients": 6}, "does not fit groups of 6"),
    ({"address": "127.0.0.1:99999"}, "port in 0..65535"),
    ({"groups": 0}, "groups must be at least 1"),
    ({"chunk_words": 1 << 20}, "chunk_words must be in"),
    ({"max_inflight": 0}, "max_inflight must be >= 1"),
])
def test_settings_that_cannot_work_fail_at_start(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ServerConfig(tls_cert="c", tls_key="k", **overrides).validate()
