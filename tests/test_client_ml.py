"""The client as ML code uses it, over real gRPC on loopback: arrays of any shapes in and out,
``__array__`` objects, ``Client.run`` round after round, and a sync client that leaves no
"Event loop is closed" tracebacks."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from grpc_harness import DIM, TEST_POLICY, async_test, running_server

from secagg.client import AsyncClient, Client, ClientError, Layout, RoundInfo, flatten, unflatten
from secagg.protocol.encoding import bound

SHAPES = [(10, 10), (4, 20), (20,)]          # 200 values: the harness's DIM
assert sum(int(np.prod(s)) for s in SHAPES) == DIM


def arrays_of(i: int, round_no: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(100 * round_no + i)
    return [(rng.standard_normal(s) * 0.05).astype(np.float32) for s in SHAPES]


class Tensor:
    """The least a CPU tensor offers: ``__array__``."""

    def __init__(self, values: np.ndarray) -> None:
        self._values = values

    def __array__(self, dtype=None, copy=None):  # noqa: ANN001, ANN204
        return self._values if dtype is None else self._values.astype(dtype)


def test_flatten_and_unflatten_keep_shapes_and_float_dtypes():
    parts = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4), Tensor(np.full((2, 2), 7.0))]
    vec, layout = flatten(parts)
    assert vec.dtype == np.float64 and vec.size == 14 and layout.shapes == ((2, 3), (4,), (2, 2))
    back = layout.unflatten(vec)
    assert [b.shape for b in back] == [(2, 3), (4,), (2, 2)] and back[0].dtype == np.float32
    np.testing.assert_array_equal(back[0], parts[0])
    assert unflatten(vec, [(2, 3), (8,)])[1].shape == (8,)
    assert flatten([1.0, 2.0])[1].kind == "array"             # a list of numbers stays one vector
    assert flatten(np.zeros((3, 4)))[1].unflatten(np.ones(12)).shape == (3, 4)
    with pytest.raises(ClientError, match="cannot take the shapes"):
        Layout.of(SHAPES).unflatten(np.zeros(5))
    with pytest.raises(ClientError, match="real numbers"):
        flatten([np.zeros(2, dtype=complex)])


async def _model(h) -> np.ndarray:
    return (await h.client("c0").get_model())[1]


@async_test
async def test_arrays_of_any_shapes_go_through_a_round_and_come_back_in_their_shapes(tmp_path):
    async with running_server(tmp_path, 3) as h:
        before = await _model(h)
        updates = {f"c{i}": arrays_of(i) for i in range(3)}
        updates["c2"] = [Tensor(a) for a in updates["c2"]]   # objects exposing __array__ work as well
        outs = await asyncio.gather(*(h.client(c).participate(u, fetch_model=True) for c, u in updates.items()))
        assert all(o.ok for o in outs), outs
        model = outs[0].model_as()                              # the shapes of the update we gave
        assert [m.shape for m in model] == SHAPES and model[0].dtype == np.float32
        flat = {c: flatten(u)[0] for c, u in updates.items()}
        mean = np.mean([bound(v, h.params.clip_norm, h.params.clip_value) for v in flat.values()], axis=0)
        expected = Layout.of(SHAPES).unflatten(before + h.cfg.server_lr * mean)
        for got, want in zip(model, expected):
            np.testing.assert_allclose(got, want, rtol=0, atol=1.01 / h.params.scale + 1e-6)
        # get_model(shapes=...) gives the same, in shapes taken from example arrays
        ver, shaped = await h.client("c1").get_model(shapes=arrays_of(9))
        assert ver == outs[0].model_version and [m.shape for m in shaped] == SHAPES
        np.testing.assert_allclose(shaped[1], model[1], rtol=1e-6)


@async_test
async def test_a_single_array_like_object_is_an_update(tmp_path):
    async with running_server(tmp_path, 3) as h:
        ups = [Tensor(np.full((20, 10), 0.01 * (i + 1))) for i in range(3)]
        outs = await asyncio.gather(*(h.client(f"c{i}").participate(u, fetch_model=True) for i, u in enumerate(ups)))
        assert all(o.ok for o in outs)
        assert outs[0].model_as().shape == (20, 10)
        np.testing.assert_allclose(outs[0].model_as(), 0.02, atol=1.01 / h.params.scale)


def test_client_run_takes_part_in_three_rounds_and_the_model_advances(tmp_path):
    seen: dict[str, list[tuple[int, list[np.ndarray]]]] = {f"c{i}": [] for i in range(3)}

    def worker(h, c: str):
        i = int(c[1:])

        def train(model, info: RoundInfo):
            assert isinstance(info, RoundInfo) and info.dim == DIM
            assert threading.current_thread().name != f"secagg-client-{c}"   # user code runs in the caller's thread
            seen[c].append((info.model_version, model))
            return [np.full(s, 0.01 * (i + 1)) for s in SHAPES]

        with Client(h.address, ca_cert=h.pki.ca_cert, identity_key=h.keys[c], client_id=c, policy=TEST_POLICY) as client:
            return client.run(train, rounds=3, shapes=SHAPES)

    async def go():
        async with running_server(tmp_path, 3, rounds=3, lobby_seconds=0.2) as h:
            loop = asyncio.get_running_loop()
            outs = await asyncio.gather(*(loop.run_in_executor(None, worker, h, c) for c in seen))
            return outs, await _model(h)

    outs, final = asyncio.run(go())
    for c, got in zip(seen, outs):
        assert [o.outcome for o in got] == ["completed"] * 3, got
        versions = [v for v, _ in seen[c]]
        assert versions == sorted(versions) and len(set(versions)) == 3, versions
        assert all([m.shape for m in model] == SHAPES for _, model in seen[c])
        firsts = [float(model[0].ravel()[0]) for _, model in seen[c]]
        np.testing.assert_allclose(np.diff(firsts), 0.02, atol=1e-3)      # +mean(0.01, 0.02, 0.03) each round
    np.testing.assert_allclose(final[0] - float(seen["c0"][0][1][0].ravel()[0]), 0.06, atol=1e-3)


@async_test
async def test_async_run_goes_on_round_after_round_and_stops_when_cancelled(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="secagg.client")
    async with running_server(tmp_path, 3, rounds=0, lobby_seconds=0.2) as h:
        calls = {"n": 0}

        def train(model, info):
            calls["n"] += 1
            return np.zeros(DIM)

        runner = asyncio.create_task(h.client("c0", wait_seconds=1.0).run(train))
        # c1 takes its seat and drops out of the round (its training step fails)
        broken = asyncio.gather(h.client("c1").participate(lambda info: 1 / 0), h.client("c2").participate(np.zeros(DIM)),
                                return_exceptions=True)
        await broken
        outs = await asyncio.gather(h.client("c1").participate(np.zeros(DIM)), h.client("c2").participate(np.zeros(DIM)))
        assert all(o.ok for o in outs)
        assert calls["n"] >= 2 and not runner.done()            # it went on to the next round
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    lines = [r.getMessage() for r in caplog.records if r.name == "secagg.client"]
    assert sum("completed; model" in m or "joining the next one" in m for m in lines) >= 2, lines


SYNC_SCRIPT = textwrap.dedent("""
    import sys, threading, numpy as np
    from secagg.client import Client, ClientError, ClientPolicy
    address, ca, key, cid = sys.argv[1:5]
    def client(**kw):
        return Client(address, ca_cert=ca, identity_key=bytes.fromhex(key), client_id=cid, retries=0,
                      policy=ClientPolicy.lenient(), **kw)
    c = client()
    print(c.status().dim, c.get_model()[0])
    try:
        c.get_model(99)
    except ClientError as e:
        print("refused:", e)
    def lobby():   # the calls that used to leave a cancelled read behind a closed loop
        for _ in range(10):
            try:
                client(wait_seconds=0.05).participate([np.zeros((10, 20))])
            except ClientError:
                pass
    ts = [threading.Thread(target=lobby) for _ in range(8)]
    [t.start() for t in ts]; [t.join() for t in ts]
    print("done")
""")


@async_test
async def test_the_sync_client_leaves_no_event_loop_tracebacks(tmp_path):
    async with running_server(tmp_path, 2, min_clients=3, max_clients=3) as h:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SYNC_SCRIPT, h.address, str(h.pki.ca_cert), h.keys["c0"].hex(), "c0",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 50)
    text = err.decode()
    assert proc.returncode == 0, text
    assert out.decode().split()[:2] == [str(DIM), "1"] and "done" in out.decode()
    assert "Event loop is closed" not in text and "Traceback" not in text, text


def test_rounds_must_be_positive(tmp_path):
    c = AsyncClient("127.0.0.1:1", ca_cert=b"x", identity_key=bytes(32), client_id="c0")
    with pytest.raises(ClientError, match="rounds must be"):
        asyncio.run(c.run(lambda m, i: m, rounds=0))


@async_test
async def test_run_records_an_aborted_round_and_completes_the_next(tmp_path):
    """Both peers fail their training step in round 1, so it aborts for want of survivors;
    ``run`` reports that round as aborted and the second round completes."""
    async with running_server(tmp_path, 3, rounds=0, lobby_seconds=0.2) as h:
        seen: list[str] = []
        runner = asyncio.create_task(h.client("c0").run(lambda model, info: np.full(DIM, 0.01), rounds=2,
                                                         on_round=lambda o: seen.append(o.outcome)))
        failed = await asyncio.gather(*(h.client(c).participate(lambda info: 1 / 0) for c in ("c1", "c2")), return_exceptions=True)
        assert all(isinstance(e, ZeroDivisionError) for e in failed), failed   # the app's own error, unwrapped
        while not seen:                       # round 1 ends for c0 before the peers join round 2
            await asyncio.sleep(0.05)
        ok = await asyncio.gather(*(h.client(c).participate(np.zeros(DIM)) for c in ("c1", "c2")))
        outs = await asyncio.wait_for(runner, 30)
    assert all(o.ok for o in ok)
    assert [o.outcome for o in outs] == ["aborted", "completed"] == seen, outs
    assert outs[0].reason and outs[1].model_version == 2


CTRL_C_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from secagg.client import Client, ClientPolicy
    address, ca, key = sys.argv[1:4]
    with Client(address, ca_cert=ca, identity_key=bytes.fromhex(key), client_id="c0", policy=ClientPolicy.lenient()) as c:
        print("waiting", flush=True)
        try:
            c.run(lambda model, info: np.zeros(model.size))     # no round ever starts: 1 of 3 clients
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            raise
""")


@async_test
async def test_ctrl_c_stops_a_sync_run_cleanly_and_leaves_the_lobby(tmp_path):
    import signal

    async with running_server(tmp_path, 3, rounds=0) as h:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CTRL_C_SCRIPT, h.address, str(h.pki.ca_cert), h.keys["c0"].hex(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"waiting"
        coordinator = h.srv.coordinator
        while "c0" not in coordinator.lobby:
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        while "c0" in coordinator.lobby:      # the server saw the stream end
            await asyncio.sleep(0.05)
    text = err.decode()
    assert proc.returncode != 0 and b"interrupted" in out
    assert text.rstrip().endswith("KeyboardInterrupt"), text
    assert "Event loop is closed" not in text and "CancelledError" not in text, text
