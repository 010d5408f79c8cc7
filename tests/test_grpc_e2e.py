"""End to end over real gRPC: real client processes with dropouts at every phase, aborted
rounds, rollback, bit-identical aggregates against the in-memory driver, and the sync API."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
from grpc_harness import (
    DIM,
    TEST_POLICY,
    async_test,
    check_round,
    running_server,
    seed_of,
    update_of,
)
from secagg.cli.main import main as cli_main
from secagg.client import Client, RoundOutcome
from secagg.protocol.aggregation import sums_digest
from secagg.protocol.driver import run_group
from secagg.protocol.encoding import encode
from secagg.protocol.messages import GroupConfig, Mode, Phase
from secagg.server.tls import save_identity_key
from secagg.simulation.simulate import PHASES, SimConfig, run_simulation


class Vanish(Exception):
    """Raised from on_phase: the client disappears before sending that phase's message."""


def vanish_before(label: str):
    def hook(phase: Phase) -> None:
        if phase.label == label:
            raise Vanish(label)

    return hook


def inputs_of(ids, round_no: int = 0):
    return {c: (update_of(c, DIM, round_no), seed_of(c, round_no)) for c in ids}


# ---- real processes: dropouts at every phase ---------------------------------------------------
SIM_CASES = [("semi-honest", p) for p in PHASES if p != "consistency_check"] + [("active", p) for p in PHASES]


@pytest.mark.parametrize("mode, phase", SIM_CASES, ids=[f"{m}-{p}" for m, p in SIM_CASES])
def test_simulation_with_dropouts_at_every_phase(tmp_path, mode, phase):
    """A server process and two worker processes; the server's recorded aggregate digest equals
    the simulator's oracle over the survivors' inputs, and the survivors drop at that phase."""
    if mode == "semi-honest":   # 2 groups of 5, threshold 3: two dropouts anywhere are survivable
        clients, groups, dropped = 10, 2, 2
    else:                       # 3 groups of 4, threshold 3: one dropout
        clients, groups, dropped = 12, 3, 1
    cfg = SimConfig(clients=clients, dim=200, rounds=2, dropout=dropped / clients, dropout_phase=phase, groups=groups,
                    mode=mode, processes=2, phase_seconds=10, seed=11, workdir=str(tmp_path / "sim"))
    s = run_simulation(cfg)
    assert s["correct"], s["rounds"]
    labels = [p for p in PHASES if mode == "active" or p != "consistency_check"]
    at = labels.index(phase)
    for r, rnd in enumerate(s["rounds"]):
        assert rnd["outcome"] == "completed", rnd
        assert rnd["model_version"] == r + 2
        assert rnd["dropouts"] == dropped
        expected = {p: clients - (dropped if i >= at else 0) for i, p in enumerate(labels)}
        assert rnd["survivors"] == expected, rnd["survivors"]
        assert rnd["rejected_groups"] == []


# ---- an aborted round, then a good one ----------------------------------------------------------
@async_test
async def test_round_below_threshold_aborts_cleanly_and_the_next_round_succeeds(tmp_path):
    ids = ["c0", "c1", "c2", "c3"]
    async with running_server(tmp_path, 4, rounds=2) as h:   # 4 holders: threshold 3
        v1 = h.store.model()
        outs = await h.participate(ids, on_phase={"c2": vanish_before("masked_input"), "c3": vanish_before("masked_input")})
        assert isinstance(outs["c2"], Vanish) and isinstance(outs["c3"], Vanish)
        for c in ("c0", "c1"):
            o = outs[c]
            assert isinstance(o, RoundOutcome) and o.outcome == "aborted" and not o.ok, o
            assert "threshold is 3" in o.reason and o.model_version == 1 and o.aggregate_digest == ""
        first = h.record()   # written before the results go out
        assert first.outcome == "aborted", first
        assert "only 2 clients completed masked_input, threshold is 3" in first.error
        assert first.aggregate_digest is None and first.model_version == 1
        assert sorted((d["client"], d["phase"], d["reason"]) for d in first.dropouts) == [
            ("c2", "masked_input", "disconnected"), ("c3", "masked_input", "disconnected")]
        assert first.survivors["masked_input"] == {"0": sorted(["c0", "c1"], key=first.groups[0].index)}
        assert h.store.latest_version() == 1
        assert {e.client_id for e in h.store.events(first.round_id, kind="dropped")} == {"c2", "c3"}

        outs = await h.participate(ids, round_no=1)
        await h.rounds_finished()
        assert all(isinstance(o, RoundOutcome) and o.ok and o.model_version == 2 for o in outs.values()), outs
        second = h.record()
        assert second.round_id != first.round_id and not second.dropouts
        check_round(h, second, inputs_of(ids, 1), v1.params, h.store.model().params)
        assert h.store.latest_version() == 2


async def _one_group_aborts(h):
    """8 clients in 2 groups of 4 (threshold 3); members 1 and 2 of group 0 vanish before their
    masked input, so group 0 aborts and group 1 completes."""
    infos = {}

    async def one(c):
        def make(info):
            infos[c] = info
            return update_of(c)

        def hook(phase):
            i = infos[c]
            if i.group == 0 and i.index in (1, 2) and phase is Phase.MASKED_INPUT:
                raise Vanish(phase.label)

        return await h.client(c).participate(make, on_phase=hook, rounding_seed=seed_of(c))

    ids = [f"c{i}" for i in range(8)]
    outs = dict(zip(ids, await asyncio.gather(*(one(c) for c in ids), return_exceptions=True)))
    await h.rounds_finished()
    return ids, infos, outs, h.record()


@async_test
async def test_one_group_aborts_the_other_completes(tmp_path):
    async with running_server(tmp_path, 8, groups=2) as h:
        old = h.store.model().params
        ids, infos, outs, rec = await _one_group_aborts(h)
        assert rec.outcome == "completed" and rec.model_version == 2
        assert rec.timings["group_errors"] == {"0": "only 2 clients completed masked_input, threshold is 3"}
        assert [c["group"] for c in rec.checks] == [1]
        assert sorted(d["client"] for d in rec.dropouts) == sorted(c for c in ids if infos[c].group == 0 and infos[c].index in (1, 2))
        group1 = [c for c in ids if infos[c].group == 1]
        assert sorted(check_round(h, rec, inputs_of(ids), old, h.store.model().params)) == sorted(group1)
        for c in group1:
            assert outs[c].ok and outs[c].group_accepted
        for c in ids:
            if infos[c].group == 0 and infos[c].index not in (1, 2):
                assert not outs[c].group_accepted


@async_test
async def test_members_of_an_aborted_group_are_told_why(tmp_path):
    async with running_server(tmp_path, 8, groups=2) as h:
        ids, infos, outs, _ = await _one_group_aborts(h)
        for c in ids:
            if infos[c].group == 0 and infos[c].index not in (1, 2):
                assert "threshold is 3" in outs[c].reason, outs[c]


# ---- rollback ------------------------------------------------------------------------------------
@async_test
async def test_rollback_then_next_round_builds_on_the_restored_version(tmp_path):
    ids = ["c0", "c1", "c2", "c3"]
    init = np.linspace(-1, 1, DIM)
    np.save(tmp_path / "init.npy", init)
    async with running_server(tmp_path, 4, rounds=3, init_model=str(tmp_path / "init.npy")) as h:
        for r in range(2):
            outs = await h.participate(ids, round_no=r)
            assert all(o.ok and o.model_version == r + 2 for o in outs.values()), outs
        v1, v3 = h.store.model(1).params, h.store.model(3).params
        assert np.array_equal(v1, init) and not np.allclose(v3, v1)

        # the operator's command, against the live server's database (another connection)
        assert cli_main(["rollback", "--db", h.cfg.db, "--to", "1", "--reason", "bad rounds 1-2"]) == 0
        v4 = h.store.model(4)
        assert v4.restores == 1 and v4.reason == "bad rounds 1-2" and np.array_equal(v4.params, v1)

        seen: dict[str, int] = {}

        def update_for(c):
            def make(info):
                seen[c] = info.model_version
                return update_of(c, DIM, 2)
            return make

        tasks = [h.client(c).participate(update_for(c), rounding_seed=seed_of(c, 2), fetch_model=True) for c in ids]
        results = await asyncio.gather(*tasks)
        await h.rounds_finished()
        assert seen == {c: 4 for c in ids}
        rec = h.record()
        assert rec.settings["model_version"] == 4 and rec.model_version == 5
        for o in results:
            assert o.ok and o.model_version == 5
            assert np.array_equal(o.model, h.store.model(5).params)
        check_round(h, rec, inputs_of(ids, 2), v1, results[0].model)


# ---- gRPC vs the in-memory driver ---------------------------------------------------------------
BIT_CASES = [
    pytest.param(8, 2, "semi-honest", 0, "masked_input", id="semi-honest-complete-drop-masked_input"),
    pytest.param(10, 2, "active", 0, "share_keys", id="active-complete-drop-share_keys"),
    pytest.param(12, 2, "semi-honest", 4, "masked_input", id="semi-honest-secagg+-k4-drop-masked_input"),
]


@pytest.mark.parametrize("n, groups, mode, neighbors, drop_phase", BIT_CASES)
@async_test
async def test_grpc_and_in_memory_driver_give_bit_identical_aggregates(tmp_path, n, groups, mode, neighbors, drop_phase):
    ids = [f"c{i}" for i in range(n)]
    async with running_server(tmp_path, n, groups=groups, mode=mode, neighbors=neighbors) as h:
        outs = await h.participate(ids, on_phase={"c0": vanish_before(drop_phase)})
        await h.rounds_finished()
        rec = h.record()
        assert rec.outcome == "completed", rec.error
        assert all(o.ok for c, o in outs.items() if c != "c0"), outs
        assert [(d["client"], d["phase"]) for d in rec.dropouts] == [("c0", drop_phase)]

        totals = {}
        for g, members in enumerate(rec.groups):
            gs = rec.settings["group_configs"][g]
            assert gs["group"] == g and gs["members"] == len(members) and gs["neighbors"] == (neighbors or None)
            config = GroupConfig(session=os.urandom(32), members=len(members), threshold=gs["threshold"], dim=DIM + 2,
                                 modulus_bits=gs["modulus_bits"], mode=Mode(mode), neighbors=gs["neighbors"])
            index = {c: i + 1 for i, c in enumerate(members)}
            inputs = {index[c]: encode(update_of(c), h.params, len(members), rounding_seed=seed_of(c)) for c in members}
            drops = {Phase[d["phase"].upper()]: {index[d["client"]]} for d in rec.dropouts if d["group"] == g}
            keys = {index[c]: h.keys[c] for c in members} if mode == "active" else None
            run = run_group(config, inputs, drops=drops, identity_keys=keys)
            assert run.result is not None, run.aborted
            assert sorted(run.survivors[Phase.MASKED_INPUT]) == sorted(index[c] for c in rec.survivors["masked_input"][str(g)])
            totals[g] = run.result.total
        assert sums_digest(totals) == rec.aggregate_digest
        assert all(o.aggregate_digest == rec.aggregate_digest for c, o in outs.items() if c != "c0")


# ---- the synchronous API, from plain threads --------------------------------------------------
def app_round(address: str, ca_cert: str, key_file: str, client_id: str, update: np.ndarray) -> tuple[RoundOutcome, int, np.ndarray]:
    """What an app writes: no asyncio anywhere."""
    client = Client(address, ca_cert=ca_cert, identity_key=key_file, client_id=client_id)
    outcome = client.participate(update)
    version, model = client.get_model()
    return outcome, version, model


@async_test
async def test_sync_client_from_threads(tmp_path):
    """An app with every default: the client's default policy and the server's default active mode."""
    ids = ["c0", "c1", "c2", "c3", "c4"]
    async with running_server(tmp_path, 5, mode="active") as h:
        old = h.store.model().params
        files = {}
        for c in ids:
            files[c] = str(tmp_path / f"{c}.identity")
            save_identity_key(files[c], h.keys[c])
        status = await asyncio.to_thread(lambda: Client(h.address, ca_cert=str(h.pki.ca_cert), identity_key=files["c0"],
                                                        client_id="c0").status())
        assert status.model_version == 1 and status.dim == DIM
        updates = {c: np.full(DIM, 0.01 * (i + 1)) for i, c in enumerate(ids)}
        results = await asyncio.gather(*(asyncio.to_thread(app_round, h.address, str(h.pki.ca_cert), files[c], c, updates[c])
                                         for c in ids))
        for outcome, version, model in results:
            assert outcome.ok and outcome.model_version == version == 2
            assert np.array_equal(model, h.store.model(2).params)
        np.testing.assert_allclose(results[0][2] - old, np.mean(list(updates.values()), axis=0), atol=1.01 / h.params.scale)


def test_sync_client_from_a_plain_thread_against_a_server_thread(tmp_path):
    """The server in its own thread and event loop; the test body is ordinary sync code."""
    import threading

    ready = threading.Event()
    stop = threading.Event()
    box: dict = {}

    def serve() -> None:
        async def run() -> None:
            async with running_server(tmp_path, 3) as h:
                box["h"] = h
                ready.set()
                while not stop.is_set():
                    await asyncio.sleep(0.02)

        asyncio.run(run())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(20)
    h = box["h"]
    try:
        outs: dict[str, RoundOutcome] = {}

        def one(c: str) -> None:
            outs[c] = Client(h.address, ca_cert=h.pki.ca_cert, identity_key=h.keys[c], client_id=c, policy=TEST_POLICY).participate(
                update_of(c), rounding_seed=seed_of(c))

        threads = [threading.Thread(target=one, args=(c,)) for c in ("c0", "c1", "c2")]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert sorted(outs) == ["c0", "c1", "c2"] and all(o.ok for o in outs.values()), outs
        assert len({o.aggregate_digest for o in outs.values()}) == 1
    finally:
        stop.set()
        t.join(20)


# ---- the SecAgg+ ring is checkable from the round record ------------------------------------------
@async_test
async def test_round_record_lets_anyone_recompute_the_secagg_ring(tmp_path):
    """Active SecAgg+ over gRPC: from the record alone (settings, groups, ring) one rebuilds each
    group's configuration to its recorded digest, checks every opened contribution against its
    commitment, and recomputes the ring the members masked over."""
    from secagg.protocol import graph
    from secagg.v1 import secagg_pb2 as pb
    from secagg.wire import convert

    ids = [f"c{i}" for i in range(12)]
    async with running_server(tmp_path, 12, mode="active", neighbors=4) as h:
        outs = await h.participate(ids)
        await h.rounds_finished()
        rec = h.record()
        assert rec.outcome == "completed" and all(o.ok for o in outs.values()), (rec.error, outs)
        st = rec.settings
        for g, members in enumerate(rec.groups):
            gs = st["group_configs"][g]
            assert gs["neighbors"] == graph.recommended_degree(12)   # 4 was raised to the clients' floor
            plan = st["plan"]
            rc = pb.RoundConfig(round_id=rec.round_id, group=g, model_version=st["model_version"], chunk_words=st["chunk_words"],
                                encoding=convert.encoding_to_pb(h.params), round_number=plan["round_number"], epoch=plan["epoch"],
                                epoch_rounds=1 if plan["grouping"] == "reshuffle" else plan["epoch_rounds"], grouping=plan["grouping"])
            cfg = GroupConfig(session=bytes.fromhex(gs["session"]), members=gs["members"], threshold=gs["threshold"], dim=DIM + 2,
                              modulus_bits=gs["modulus_bits"], mode=Mode.ACTIVE, neighbors=gs["neighbors"],
                              commitments=tuple(bytes.fromhex(c) for c in gs["commitments"]), member_ids=tuple(members),
                              context=convert.round_context(rc))
            assert cfg.digest.hex() == gs["config_digest"]
            opened = {i + 1: bytes.fromhex(v) for i, v in enumerate(rec.ring[str(g)]) if v}
            assert len(opened) == len(members)   # nobody dropped: every member opened its contribution
            assert all(graph.commit_contribution(v) == cfg.commitments[i - 1] for i, v in opened.items())
            ring = graph.for_group(cfg, opened)
            assert all(len(nb) == gs["neighbors"] for nb in ring.values())
            forged = {**opened, 1: bytes(32)}   # one different opening re-draws the ring
            assert graph.for_group(cfg, forged) != ring
