"""What lets a round grow: lazy client inputs, deadlines that scale with the round's work,
words on the wire at the modulus width, and the per-phase bound ratios ``secagg simulate`` reports."""

from __future__ import annotations

import asyncio
import json

import pytest

from grpc_harness import async_test, running_server, seed_of, update_of
from secagg.protocol.deadlines import PhaseBudget
from secagg.protocol.errors import DropReason, RemoteProtocolError
from secagg.protocol.messages import Mode, Phase
from secagg.protocol.server import ServerMachine
from secagg.v1 import secagg_pb2 as pb
from secagg.wire import convert
from test_protocol import Round, machine, make_config


# ---- lazy inputs -------------------------------------------------------------------------------
@async_test
async def test_lazy_inputs_give_the_same_aggregate_as_eager_ones_for_the_same_seeds(tmp_path):
    """Round 0: vectors handed over up front.  Round 1: the same vectors, built by callables only when
    the masked input is due, one client at a time (one shared slot).  Same inputs and rounding seeds,
    so the two aggregates must be bit-identical, whatever the fresh masks of each round."""
    n = 5
    async with running_server(tmp_path, n, rounds=2) as h:
        ids = [f"c{i}" for i in range(n)]
        eager = await h.participate(ids)
        assert all(o.ok for o in eager.values()), eager
        first = h.record()

        slots = asyncio.Semaphore(1)
        holding = 0
        seen_phases: dict[str, list[Phase]] = {c: [] for c in ids}
        built_after: dict[str, list[Phase]] = {}

        def lazy_update(c: str):
            async def build(info):
                nonlocal holding
                built_after[c] = list(seen_phases[c])
                holding += 1
                assert holding == 1, "two clients built their vectors while holding one slot"
                await asyncio.sleep(0)   # let the others run: they must wait for the slot
                holding -= 1
                return update_of(c, info.dim)
            return build

        async def one(c: str):
            return await h.client(c).participate(lazy_update(c), rounding_seed=seed_of(c), vector_slots=slots,
                                                 on_phase=seen_phases[c].append)

        lazy = dict(zip(ids, await asyncio.gather(*(one(c) for c in ids))))
        assert all(o.ok for o in lazy.values()), lazy
        second = h.record()
        assert second.round_id != first.round_id
        assert second.aggregate_digest == first.aggregate_digest
        # each vector was built after its client had sent both key messages, never before
        assert all(built_after[c] == [Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS] for c in ids), built_after
        assert {o.aggregate_digest for o in (*eager.values(), *lazy.values())} == {first.aggregate_digest}


# ---- deadlines that scale with the round ---------------------------------------------------------
def test_phase_budget_grows_with_members_neighbours_and_vector_size():
    b = PhaseBudget(base_seconds=30.0, member_seconds=0.01, pair_seconds=0.001, ingest_bytes_per_second=16 << 20)
    small = b.seconds(Phase.MASKED_INPUT, members=10, degree=9, dim=1_002, word_bytes=4)
    big = b.seconds(Phase.MASKED_INPUT, members=1000, degree=30, dim=1_000_002, word_bytes=4)
    assert 30.0 < small < 30.5                  # a small round keeps the default it was meant for
    assert big > 240.0                          # 4 GB of masked input at 16 MiB/s: 30 s could never fit it
    assert b.seconds(Phase.ADVERTISE_KEYS, members=1000, degree=30, dim=1_000_002, word_bytes=4) == 30.0 + 10.0
    assert b.seconds(Phase.SHARE_KEYS, members=1000, degree=30, dim=1_000_002, word_bytes=4) == 30.0 + 10.0 + 30.0
    grow = [b.seconds(Phase.MASKED_INPUT, members=m, degree=k, dim=d, word_bytes=w)
            for m, k, d, w in [(100, 10, 10**5, 4), (200, 10, 10**5, 4), (200, 20, 10**5, 4), (200, 20, 10**6, 4), (200, 20, 10**6, 8)]]
    assert grow == sorted(grow) and len(set(grow)) == len(grow)
    fixed = PhaseBudget.fixed(30.0)
    assert {fixed.seconds(p, members=1000, degree=30, dim=10**6, word_bytes=8) for p in Phase} == {30.0}


def test_server_machine_deadlines_follow_the_budget_on_injected_time():
    """No sleeps: the machine is told the time, says when each phase is due, and drops who missed it."""
    m, dim = 6, (1 << 18) + 2
    cfg = make_config(m, Mode.SEMI_HONEST, dim=dim)
    b = PhaseBudget(base_seconds=1.0, member_seconds=0.5, pair_seconds=0.25, ingest_bytes_per_second=float(1 << 20))
    server = ServerMachine(cfg, phase_seconds=b, now=100.0)
    clients = {i: machine(cfg, i) for i in range(1, m + 1)}
    assert server.deadline == 100.0 + 1.0 + m * 0.5                       # advertise: base + members
    assert not server.ready_to_close(103.99) and server.ready_to_close(104.0)
    for c in clients.values():
        server.receive(c.advertise_keys())
    assert server.ready_to_close(101.0)                                    # everyone answered: no need to wait
    out = server.close_phase(now=101.0)
    share_deadline = 101.0 + 1.0 + m * 0.5 + m * (m - 1) * 0.25            # + members x neighbours
    assert server.deadline == share_deadline
    for i in range(1, m):                                                   # member m never shares its keys
        server.receive(clients[i].share_keys(out[i]))
    assert not server.ready_to_close(share_deadline - 0.01)
    assert server.ready_to_close(share_deadline)
    server.close_phase(now=share_deadline)
    assert server.dropouts[m][1] is DropReason.TIMEOUT
    vector_bytes = dim * 4
    assert server.deadline == share_deadline + 1.0 + m * 0.5 + m * (m - 1) * 0.25 + m * vector_bytes / (1 << 20)
    # the same group with one fixed deadline: the masked input would get 1 s for 6 MiB at 1 MiB/s
    fixed = ServerMachine(cfg, phase_seconds=1.0, now=100.0)
    assert fixed.deadline == 101.0 and fixed.budget == PhaseBudget.fixed(1.0)


# ---- words on the wire -------------------------------------------------------------------------
@pytest.mark.parametrize("precision_bits, word_bytes", [(16, 4), (40, 8)])
@async_test
async def test_masked_input_bytes_per_coordinate_are_the_modulus_width(tmp_path, precision_bits, word_bytes):
    """What the server received in the masked-input phase, over real gRPC: each survivor's d + 2
    words at the modulus width (4 bytes at 32 bits, never 8) plus a few bytes of framing per chunk."""
    n, dim, chunk = 4, 3000, 1024
    async with running_server(tmp_path, n, dim=dim, chunk_words=chunk, precision_bits=precision_bits) as h:
        outs = await h.participate([f"c{i}" for i in range(n)])
        assert all(o.ok for o in outs.values()), outs
        rec = h.record()
        assert rec.settings["group_configs"][0]["modulus_bits"] == 8 * word_bytes
        received = rec.timings["bytes_in"]["0"]["masked_input"]
        words = n * (dim + 2)
        chunks = n * -(-(dim + 2) // chunk)
        assert words * word_bytes <= received <= words * word_bytes + 16 * chunks
        assert received < words * (word_bytes + 1)


# ---- what simulate --json reports ----------------------------------------------------------------
def test_simulate_json_reports_server_work_beside_its_bound_and_peak_rss(tmp_path, capsys):
    from secagg.cli.main import main

    out = tmp_path / "summary.json"
    code = main(["simulate", "--clients", "6", "--groups", "1", "--dim", "5000", "--rounds", "1", "--dropout", "0",
                 "--processes", "2", "--json", str(out)])
    capsys.readouterr()
    assert code == 0
    summary = json.loads(out.read_text())
    server = summary["rounds"][0]["server"]
    for phase in ("masked_input", "unmasking"):
        row = server[phase]
        assert row["bound_seconds"] > 0 and row["work_seconds"] > 0
        assert row["ratio"] == pytest.approx(row["work_seconds"] / row["bound_seconds"])
        assert row["work_seconds"] <= row["seconds"] + 0.05   # the work happened while the phase was open
    assert set(server) >= {"advertise_keys", "share_keys", "masked_input", "unmasking"}
    unit = summary["unit_costs"]
    # the bound is the one secagg bench uses: one addition per survivor, one PRG+add per expansion
    assert server["masked_input"]["bound_seconds"] == pytest.approx(6 * unit["add_seconds"])
    assert server["unmasking"]["bound_seconds"] == pytest.approx(6 * (unit["prg_seconds"] + unit["add_seconds"]))
    assert summary["server_peak_rss_mb"] > 10
    assert len(summary["worker_peak_rss_mb"]) == 2 and min(summary["worker_peak_rss_mb"]) > 10
    assert summary["vector_mb"] == pytest.approx(5002 * 4 / 2**20)


# ---- the masked-input chunk read in place ------------------------------------------------------
@pytest.mark.parametrize("offset, words, last", [(0, b"", False), (0, bytes(range(8)), True), (123_456, b"\xff" * 4096, False),
                                                 ((1 << 64) - 1, b"\x01\x02\x03\x04", True)])
def test_chunk_view_reads_exactly_what_the_full_parse_reads(offset, words, last):
    data = pb.ClientMessage(masked_input=pb.MaskedInputChunk(offset=offset, words=words, last=last)).SerializeToString()
    view = convert.masked_chunk_view(data)
    full = pb.ClientMessage.FromString(data).masked_input
    assert view is not None
    assert (view.offset, bytes(view.words), view.last) == (full.offset, full.words, full.last)


def test_chunk_view_leaves_every_other_layout_to_the_full_parser():
    """Other messages, unknown or repeated fields, fields out of order, trailing bytes, truncation:
    the in-place reader declines (None) and the service parses the message in full, as before."""
    chunk = pb.MaskedInputChunk(offset=7, words=b"\x00" * 8, last=True)
    canonical = pb.ClientMessage(masked_input=chunk).SerializeToString()
    inner = chunk.SerializeToString()
    unknown = inner + b"\x20\x01"                              # field 4 of MaskedInputChunk does not exist
    repeated = inner + b"\x08\x09"                             # offset again (protobuf: the last one wins)
    reordered = b"\x18\x01" + b"\x12\x08" + b"\x00" * 8 + b"\x08\x07"
    def wrap(body: bytes) -> bytes:
        return b"\x22" + bytes([len(body)]) + body
    cases = [pb.ClientMessage(advertise_keys=pb.AdvertiseKeys(c_public=b"x" * 32)).SerializeToString(),
             wrap(unknown), wrap(repeated), wrap(reordered), canonical + b"\x00", canonical[:-1],
             wrap(inner.replace(b"\x18\x01", b"\x18\x02")), b"\x22\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"]
    for data in cases:
        assert convert.masked_chunk_view(data) is None, data[:16]
    assert pb.ClientMessage.FromString(wrap(repeated)).masked_input.offset == 9   # what the full parse makes of it


# ---- masked input summed on arrival ---------------------------------------------------------------
def test_parts_summed_on_arrival_and_retracted_leave_the_exact_sum():
    """Client 1 streams half its vector and breaks off (its part is retracted); client 3 sends a
    part past the end (refused before anything is added, and dropped); the others arrive in three
    parts each.  The unmasked sum is exactly the inputs of 2, 4, 5 and 6."""
    cfg = make_config(6, Mode.SEMI_HONEST, dim=1000)
    r = Round(cfg)
    r.run_until(Phase.SHARE_KEYS)
    server = r.server
    vectors = {i: r.clients[i].masked_input(r.inbox[i], r.inputs[i]).vector for i in r.clients}
    half = vectors[1][:500]
    server.add_masked_part(1, 0, half)
    server.retract_masked_part(0, half)
    server.drop(1, DropReason.DISCONNECTED, "stream broke mid-vector")
    with pytest.raises(RemoteProtocolError, match="does not fit 1000 words"):
        server.add_masked_part(3, 990, vectors[3][:20])
    assert server.dropouts[3][1] is DropReason.WRONG_LENGTH
    for i in (2, 4, 5, 6):
        for lo, hi in ((0, 300), (300, 301), (301, 1000)):
            server.add_masked_part(i, lo, vectors[i][lo:hi])
        server.complete_masked_input(i, 1000)
    with pytest.raises(RemoteProtocolError, match="already sent"):
        server.add_masked_part(2, 0, vectors[2][:10])
    r.inbox = dict(server.close_phase())
    r.resume()
    r.assert_exact({2, 4, 5, 6})


@async_test
async def test_a_stream_that_breaks_mid_vector_leaves_the_sum_exactly_as_it_was(tmp_path):
    """Over real gRPC: c3 streams 3 of its 5 chunks (summed on arrival, so the running sum is no
    longer zero), then cancels its call.  Its chunks are subtracted again: before any honest
    vector arrives the sum is exactly zero, and the round's aggregate is exactly the honest
    clients' (digest and model), with c3 recorded as dropped in the masked input."""
    from grpc_harness import check_round
    from test_grpc_bad_input import BAD, HONEST, N, inputs_of

    async with running_server(tmp_path, N, chunk_words=50, phase_seconds=5.0) as h:
        old = h.store.model().params
        broken = await h.raw(BAD)
        honest = [await h.raw(c) for c in HONEST]
        gone = asyncio.Event()
        tasks = [asyncio.create_task(r.follow(before_masked_input=gone.wait)) for r in honest]
        await broken.join()
        await broken.advertise()
        await broken.share_keys()
        chunks = await broken.masked_chunks()
        assert len(chunks) == 5
        for c in chunks[:3]:
            await broken.send(c)
        group = h.srv.coordinator.sessions[BAD].group
        i = broken.config.index
        while i not in group.assembly or group.assembly[i].filled < 150:   # the server took all three
            await asyncio.sleep(0.005)
        assert group.machine._sum.any(), "the parts were not summed on arrival"
        await broken.close()
        while i in group.machine.alive:   # the server saw the call end
            await asyncio.sleep(0.005)
        assert i not in group.assembly and not group.machine._sum.any(), "a broken stream's parts stayed in the sum"
        gone.set()
        results = await asyncio.gather(*tasks)
        await h.rounds_finished()
        rec = h.record()
        assert [(d["client"], d["phase"]) for d in rec.dropouts] == [(BAD, "masked_input")], rec.dropouts
        assert all(r.outcome == "completed" for r in results), results
        check_round(h, rec, inputs_of(HONEST), old, h.store.model().params)


def test_unaligned_parts_read_in_place_sum_and_retract_like_aligned_ones():
    """Words read in place from a message start at any byte: the sum of unaligned parts (and
    their retraction) is bit-identical to that of aligned ones."""
    import numpy as np

    cfg = make_config(4, Mode.SEMI_HONEST, dim=1000)
    r = Round(cfg)
    r.run_until(Phase.SHARE_KEYS)
    server = r.server
    vectors = {i: r.clients[i].masked_input(r.inbox[i], r.inputs[i]).vector for i in r.clients}

    def unaligned(v: np.ndarray, shift: int) -> np.ndarray:
        raw = b"\0" * shift + v.astype("<u4").tobytes()
        w = np.frombuffer(memoryview(raw)[shift:], dtype="<u4").astype(v.dtype, copy=False)
        assert not w.flags.aligned
        return w

    broken = unaligned(vectors[1][:700], 3)
    server.add_masked_part(1, 0, broken)
    server.retract_masked_part(0, broken)
    server.drop(1, DropReason.DISCONNECTED, "stream broke mid-vector")
    for i in (2, 3, 4):
        server.add_masked_part(i, 0, unaligned(vectors[i][:600], i - 1))
        server.add_masked_part(i, 600, vectors[i][600:])
        server.complete_masked_input(i, 1000)
    r.inbox = dict(server.close_phase())
    r.resume()
    r.assert_exact({2, 3, 4})


def test_combining_one_group_holds_at_most_three_float_vectors():
    """Server memory at the end of a round: decoding, checking and averaging one group's sum of
    D words allocates at most 3 float64 D-vectors (the decoded sum divided in place, the rule's
    output and numpy's weighted-average temporary), not a copy per step."""
    import tracemalloc

    import numpy as np

    from secagg.protocol.aggregation import combine_groups
    from secagg.protocol.encoding import EncodingParams

    d = 1_000_000
    words = np.zeros(d + 2, dtype=np.uint32)
    words[-2] = 3   # three contributors, all-zero updates: the checks accept it
    tracemalloc.start()
    try:
        decision = combine_groups({1: (words, 3)}, EncodingParams())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decision.update is not None and not decision.update.any()
    assert peak <= 3 * 8 * d + (1 << 20), f"{peak / 8 / d:.2f} float vectors"


def test_expects_and_ready_to_close_agree_with_the_waiting_set():
    """The O(1) checks the transport makes per message say what ``waiting_for`` says."""
    cfg = make_config(6, Mode.SEMI_HONEST, dim=10)
    r = Round(cfg)
    server = r.server
    assert all(server.expects(i) for i in range(1, 7)) and not server.ready_to_close(0.0)
    server.drop(2, DropReason.DISCONNECTED, "gone")
    for i in (1, 3, 4, 5):
        server.receive(r.clients[i].advertise_keys())
        assert {i for i in range(1, 7) if server.expects(i)} == server.waiting_for()
        assert not server.ready_to_close(0.0)
    server.receive(r.clients[6].advertise_keys())
    assert not server.waiting_for() and not any(server.expects(i) for i in range(1, 7))
    assert server.ready_to_close(0.0)
