"""Bad input on the wire, over real gRPC on loopback (issue 8, "Bad input on the wire"): each gets a
precise status, is recorded once (aggregated before authentication), logs no traceback, and the
round goes on for the honest clients."""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
import pytest
from grpc_harness import DIM, RawClient, async_test, check_round, running_server, seed_of, update_of
from secagg.client import ClientError
from secagg.v1 import secagg_pb2 as pb
from secagg.v1 import secagg_pb2_grpc as pb_grpc

Code = grpc.StatusCode
N = 4
ALL = ["c0", "c1", "c2", "c3"]


def inputs_of(ids):
    return {c: (update_of(c), seed_of(c)) for c in ids}


def no_tracebacks(caplog) -> None:
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()], caplog.text


async def honest_round(h, ids=ALL):
    old = h.store.model().params
    outs = await h.participate(ids)
    await h.rounds_finished()
    assert all(not isinstance(o, BaseException) and o.ok for o in outs.values()), outs
    rec = h.record()
    check_round(h, rec, inputs_of(ids), old, h.store.model().params)
    return rec


def raw_channel(h) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(h.address, grpc.ssl_channel_credentials(h.pki.ca_cert.read_bytes()),
                                   options=[("grpc.max_send_message_length", 64 << 20)])


async def first_message(h, ch, data: bytes) -> tuple[Code, str]:
    """Open Participate, read the challenge, send ``data`` as the first message; the final status."""
    call = ch.stream_stream("/secagg.v1.SecAgg/Participate", request_serializer=lambda b: b,
                            response_deserializer=pb.ServerMessage.FromString)()
    await call.read()
    await call.write(data)
    try:
        while (await asyncio.wait_for(call.read(), 10)) is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError:
        pass
    return await call.code(), await call.details()


# ---- 1. unparseable messages and requests ---------------------------------------------------
@async_test
async def test_unparseable_first_message_and_requests_are_invalid_argument_without_tracebacks(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with running_server(tmp_path, N, public_reads=True) as h:
        ch = raw_channel(h)
        code, details = await first_message(h, ch, b"\xff\xff\xff\xff not a protobuf")
        assert code == Code.INVALID_ARGUMENT and "does not parse as secagg.v1.ClientMessage" in details, (code, details)
        for method in ("GetModel", "GetStatus"):
            f = ch.unary_unary(f"/secagg.v1.SecAgg/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await f(b"\xff\xff\xff\xff garbage")
            assert exc.value.code() == Code.INVALID_ARGUMENT and "does not parse" in exc.value.details(), exc.value
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in pb_grpc.SecAggStub(ch).GetModel(pb.GetModelRequest(version=2**63)):
                pass
        assert exc.value.code() == Code.NOT_FOUND and str(2**63) in exc.value.details(), exc.value
        evs = [e for e in h.store.events() if e.kind == "rejected"]
        assert [e.status for e in evs] == ["INVALID_ARGUMENT"] * 3, evs
        await honest_round(h)
        await ch.close()
    no_tracebacks(caplog)
    assert caplog.text.count("does not parse as secagg.v1.ClientMessage") == 1, caplog.text


# ---- 2. size limits before the hello --------------------------------------------------------
@async_test
async def test_oversized_hello_is_resource_exhausted_and_never_reaches_the_lobby(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with running_server(tmp_path, N) as h:
        ch = raw_channel(h)
        raw = RawClient(h, "c0", h.keys["c0"])
        call = ch.stream_stream("/secagg.v1.SecAgg/Participate", request_serializer=lambda b: b,
                                response_deserializer=pb.ServerMessage.FromString)()
        raw.nonce = (await call.read()).challenge.nonce
        hello = raw.hello()
        hello.hello.library_version = "x" * (23 << 19)   # a valid, signed hello padded to 11.5 MiB
        await call.write(hello.SerializeToString())
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await asyncio.wait_for(call.read(), 10)
        assert exc.value.code() == Code.RESOURCE_EXHAUSTED and "exceeds the 65536 byte limit" in exc.value.details(), exc.value
        assert "c0" not in h.srv.coordinator.sessions
        (ev,) = [e for e in h.store.events() if e.kind == "rejected"]
        assert ev.status == "RESOURCE_EXHAUSTED" and ev.client_id is None
        await honest_round(h)
        await ch.close()
    no_tracebacks(caplog)


# ---- 3. slow-loris --------------------------------------------------------------------------
@async_test
async def test_trickler_holding_the_only_slot_is_dropped_by_the_minimum_rate(tmp_path):
    """max_inflight=1: one word every 0.6 x the stall limit dodges the stall timer, but not the
    whole-vector deadline (stall limit + 808 bytes / 2000 bytes/s, between two words); the queued honest members complete."""
    async with running_server(tmp_path, N, chunk_words=1, phase_seconds=4.0, max_inflight=1, min_upload_rate=2000.0) as h:
        old = h.store.model().params
        bad, honest_ids = "c3", ["c0", "c1", "c2"]
        trickler = await h.raw(bad)
        honest = [await h.raw(c) for c in honest_ids]
        slot_taken = asyncio.Event()
        tasks = [asyncio.create_task(r.follow(before_masked_input=slot_taken.wait)) for r in honest]
        await trickler.join()
        await trickler.advertise()
        await trickler.share_keys()
        chunks = await trickler.masked_chunks()

        async def trickle() -> None:
            for c in chunks:
                await trickler.send(c)
                slot_taken.set()
                await asyncio.sleep(0.6 * h.cfg.stall_limit)

        t = asyncio.create_task(trickle())
        code, details = await trickler.status()
        t.cancel()
        assert code == Code.DEADLINE_EXCEEDED and "minimum upload rate is 2000 bytes/s" in details, (code, details)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await h.rounds_finished()
        rec = h.record()
        assert all(isinstance(x, pb.RoundResult) and x.outcome == "completed" for x in results), results
        assert [(d["client"], d["phase"]) for d in rec.dropouts] == [(bad, "masked_input")], rec.dropouts
        (ev,) = h.events(bad)
        assert ev.status == "DEADLINE_EXCEEDED" and "minimum upload rate" in ev.reason
        check_round(h, rec, inputs_of(honest_ids), old, h.store.model().params)


# ---- 4. records say what happened -----------------------------------------------------------
@async_test
async def test_a_timed_out_client_gets_one_event(tmp_path):
    async with running_server(tmp_path, N, phase_seconds=1.0) as h:
        raw = await h.raw("c3")
        outs = asyncio.create_task(h.participate(["c0", "c1", "c2"]))
        await raw.join()   # then silent
        code, _ = await raw.status()
        assert code == Code.DEADLINE_EXCEEDED
        assert all(o.ok for o in (await outs).values())
        await h.rounds_finished()
        evs = h.events("c3")
        assert [(e.kind, e.status) for e in evs] == [("rejected", "DEADLINE_EXCEEDED")], evs


@async_test
async def test_shutdown_ends_the_round_with_a_server_side_reason_and_unavailable(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with running_server(tmp_path, N) as h:
        raws = [await h.raw(c) for c in ALL]
        for r in raws:
            await r.join()   # the round waits in advertise_keys
        rid = h.srv.coordinator.round_id
        await h.srv.stop(grace=0.5)
        for r in raws:
            code, details = await r.status()
            assert code == Code.UNAVAILABLE and "the server stopped during the round" in details, (code, details)
        with __import__("secagg.server.store", fromlist=["Store"]).Store(h.cfg.db) as st:
            rec = st.round(rid)
            assert rec.outcome == "failed" and "the server stopped" in rec.error
            evs = [e for e in st.events() if e.kind != "registered"]
        assert [(e.kind, e.client_id, e.status) for e in evs] == [("round_failed", None, "UNAVAILABLE")], evs
        h.srv.stop = _noop   # already stopped: the harness must not stop it twice
    no_tracebacks(caplog)


async def _noop(*args, **kwargs) -> None:
    return None


# ---- 5. pre-auth rows aggregated; client id full match --------------------------------------
@async_test
async def test_preauth_rejections_are_aggregated_and_the_client_id_pattern_is_a_full_match(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with running_server(tmp_path, N) as h:
        limiter = h.srv.coordinator.preauth
        ch = raw_channel(h)
        flood = 60
        codes = await asyncio.gather(*(first_message(h, ch, b"\xff garbage") for _ in range(flood)))
        assert all(c == Code.INVALID_ARGUMENT for c, _ in codes), codes
        limiter.flush()
        rejected = [e for e in h.store.events() if e.kind == "rejected"]
        (summary,) = [e for e in h.store.events() if e.kind == "suppressed"]
        assert len(rejected) == limiter.burst, len(rejected)
        assert summary.status == "INVALID_ARGUMENT" and summary.reason.startswith(f"{flood - limiter.burst} more INVALID_ARGUMENT")
        assert caplog.text.count("refused a peer before authentication") == limiter.burst
        raw = RawClient(h, "c0", h.keys["c0"])
        call = ch.stream_stream("/secagg.v1.SecAgg/Participate", request_serializer=pb.ClientMessage.SerializeToString,
                                response_deserializer=pb.ServerMessage.FromString)()
        raw.nonce = (await call.read()).challenge.nonce
        await call.write(raw.hello(client_id="c0\n"))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await asyncio.wait_for(call.read(), 10)
        assert exc.value.code() == Code.INVALID_ARGUMENT and "client_id must match" in exc.value.details()
        await ch.close()
    no_tracebacks(caplog)


# ---- 6. a wrong-length update never takes a seat ----------------------------------------------
@async_test
async def test_wrong_length_update_is_refused_before_the_hello_and_the_others_complete(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with running_server(tmp_path, N, registered=["wrong"]) as h:
        with pytest.raises(ClientError) as exc:
            await h.client("wrong").participate(np.zeros(DIM + 5))
        assert f"{DIM + 5} values" in str(exc.value) and f"needs {DIM}" in str(exc.value), exc.value
        assert not h.events("wrong") and "wrong" not in h.srv.coordinator.sessions
        rec = await honest_round(h)
        assert sorted(rec.cohort) == ALL and not rec.dropouts
    assert "of 4 clients waiting" in caplog.text and "advertise_keys closed" in caplog.text


@async_test
async def test_message_over_the_grpc_limit_in_a_round_is_recorded_as_resource_exhausted(tmp_path, caplog):
    """gRPC itself refuses a 13 MiB message (over its 12 MiB limit): recorded as RESOURCE_EXHAUSTED,
    not as a client disconnect, and the round completes for the others."""
    caplog.set_level(logging.INFO)
    async with running_server(tmp_path, N) as h:
        old = h.store.model().params
        raw = await h.raw("c3")
        await h.wait_in_lobby("c3")
        outs = asyncio.create_task(h.participate(["c0", "c1", "c2"]))
        await raw.join()
        await raw.send(pb.ClientMessage(masked_input=pb.MaskedInputChunk(offset=0, words=bytes(13 << 20), last=True)))
        code, details = await raw.status()
        assert code == Code.RESOURCE_EXHAUSTED, (code, details)
        assert all(o.ok for o in (await outs).values())
        await h.rounds_finished()
        rec = h.record()
        evs = h.events("c3")
        assert [(e.kind, e.status) for e in evs] == [("rejected", "RESOURCE_EXHAUSTED")], evs
        assert "12582912 byte transport limit" in evs[0].reason and evs[0].round_id == rec.round_id
        assert [(d["client"], d["reason"]) for d in rec.dropouts] == [("c3", "oversized")], rec.dropouts
        check_round(h, rec, inputs_of(["c0", "c1", "c2"]), old, h.store.model().params)
    no_tracebacks(caplog)
