"""The round plan over real gRPC: records recompute to what the server ran and to the in-memory
federation's plan, stable groups sit out when a member is absent, the privacy budget refuses a
round, and the server settings are validated by name."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from grpc_harness import async_test, running_server, seed_of, update_of
from secagg.cli.main import main
from secagg.client import ClientError, Rejected
from secagg.protocol.plan import recompute
from secagg.server.budget import Privacy
from secagg.server.config import ConfigError, ServerConfig, load
from secagg.server.store import Store
from secagg.simulation.fl import Federation, FLConfig

NAMES = [str(i) for i in range(12)]


def groups_of(record: Any) -> list[list[str]]:
    return [sorted(g) for g in record.groups]


@async_test
async def test_records_recompute_to_what_the_server_ran_and_equal_the_in_memory_plan(tmp_path: Path) -> None:
    """Three rounds, stable groups of 4 with epochs of 2 rounds: each record's plan recomputes to its
    groups; Federation.plan with the record's epoch seed gives the same groups; the groups stay for
    rounds 0-1 and are redrawn (new recorded seed) at round 2."""
    async with running_server(tmp_path, 0, registered=NAMES, min_clients=12, max_clients=12, groups=3, rounds=3,
                              grouping="stable", epoch_rounds=2, lobby_seconds=1.0) as h:
        for r in range(3):
            outs = await h.participate(NAMES, round_no=r)
            assert all(getattr(o, "ok", False) for o in outs.values()), outs
        await h.rounds_finished()
        records = list(reversed(h.store.rounds(limit=3)))
    plans = [rec.settings["plan"] for rec in records]
    assert [p["round_number"] for p in plans] == [0, 1, 2] and [p["epoch"] for p in plans] == [0, 0, 1]
    fed = Federation(FLConfig(clients=12, groups=3, grouping="stable", epoch_rounds=2, rounds=3))
    for rec, p in zip(records, plans):
        assert rec.outcome == "completed", rec.error
        assert [list(g) for g in recompute(p).groups] == groups_of(rec)
        in_memory = fed.plan(p["round_number"], epoch_seed=bytes.fromhex(p["epoch_seed"]))
        assert [list(g) for g in in_memory.groups] == groups_of(rec)
        assert sorted(rec.cohort) == sorted(NAMES)
    assert plans[0]["epoch_seed"] == plans[1]["epoch_seed"] != plans[2]["epoch_seed"]
    assert groups_of(records[0]) == groups_of(records[1])
    assert {tuple(g) for g in groups_of(records[2])} != {tuple(g) for g in groups_of(records[0])}


@async_test
async def test_a_stable_group_missing_a_member_sits_out_and_its_members_get_no_round(tmp_path: Path) -> None:
    """Round 1 of an epoch with one client away: its group does not run (its other members wait in
    the lobby, told nothing), the other groups run, and the record names the absentee."""
    names = NAMES[:8]
    async with running_server(tmp_path, 0, registered=names, min_clients=6, max_clients=8, groups=2, rounds=2,
                              grouping="stable", epoch_rounds=5, lobby_seconds=1.0) as h:
        outs = await h.participate(names, round_no=0)
        assert all(getattr(o, "ok", False) for o in outs.values()), outs
        first = h.record()
        away = first.groups[0][0]
        mates = [c for c in first.groups[0] if c != away]
        here = [c for c in names if c != away]

        async def one(c: str) -> Any:
            client = h.client(c, wait_seconds=3.0 if c in mates else 15.0)
            return await client.participate(update_of(c, h.cfg.dim, 1), rounding_seed=seed_of(c, 1))

        outs = dict(zip(here, await asyncio.gather(*(one(c) for c in here), return_exceptions=True)))
        await h.rounds_finished()
        rec = h.record()
    plan = rec.settings["plan"]
    assert list(plan["sat_out"].values()) == [[away]]
    assert sorted(map(tuple, groups_of(rec))) == sorted(tuple(g) for g in groups_of(first) if away not in g)
    assert [list(g) for g in recompute(plan).groups] == groups_of(rec)
    for c in mates:
        assert isinstance(outs[c], ClientError) and "no round configuration" in str(outs[c]), outs[c]
    assert all(getattr(outs[c], "ok", False) for c in here if c not in mates)


def dp_epsilon(rounds: int, z: float, delta: float) -> float:
    """The cumulative epsilon of ``rounds`` Gaussian releases with multiplier z, straight from dp_accounting."""
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return float(acc.get_epsilon(delta))


@async_test
async def test_a_round_over_the_privacy_budget_is_refused_over_grpc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Budget between the epsilon of one and of two rounds: round 0 runs and records its epsilon;
    the clients waiting for round 1 are refused with RESOURCE_EXHAUSTED and the reason; the refusal
    is recorded (event + a failed round record); a restarted account still knows round 0's charge."""
    z, delta = 1.5, 1e-5
    one, two = dp_epsilon(1, z, delta), dp_epsilon(2, z, delta)
    names = NAMES[:4]
    async with running_server(tmp_path, 0, registered=names, min_clients=4, max_clients=4, rounds=2, noise_multiplier=z,
                              dp_mechanism="continuous-gaussian", epsilon_budget=(one + two) / 2, delta=delta) as h:
        outs = await h.participate(names, round_no=0)
        assert all(getattr(o, "ok", False) for o in outs.values()), outs
        charged = h.record().settings["privacy"]
        assert charged["epsilon"] == pytest.approx(one, rel=1e-9)
        assert charged["epsilon_round"] == pytest.approx(one, rel=1e-9)
        assert charged["mechanism"] == "continuous-gaussian" and charged["noise_multiplier"] == z and charged["delta"] == delta
        assert charged["sampling_rate"] == 1.0 and charged["clip_norm"] == h.cfg.clip_norm and charged["bits"]
        outs = await h.participate(names, round_no=1)
        await h.rounds_finished()
        refused = h.record()
        events = [e for e in h.store.events() if e.kind == "budget_refused"]
    for c in names:
        exc = outs[c]
        assert isinstance(exc, Rejected) and exc.code == "RESOURCE_EXHAUSTED", exc
        assert "privacy budget exhausted" in str(exc) and f"{two:.4g}" in str(exc), exc
    assert refused.outcome == "failed" and "privacy budget exhausted" in (refused.error or "") and refused.cohort == []
    assert refused.settings["plan"]["started"] is False
    assert len(events) == 1 and events[0].status == "RESOURCE_EXHAUSTED"
    cfg = ServerConfig(**{**h.cfg.__dict__})
    with Store(h.cfg.db) as st:
        rebuilt = Privacy(cfg, st)
    assert rebuilt.rounds == 1 and rebuilt.epsilon == pytest.approx(one, rel=1e-9)
    assert main(["rounds", "--db", h.cfg.db]) == 0     # the operator's view of the account
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0][-2:] == ["PLAN", "EPSILON"]
    assert rows[1][-1] == f"{one:.3g}@{delta:g}" and "failed" in rows[1]          # the refused round: nothing charged
    assert rows[2][-1] == f"{one:.3g}(+{one:.3g})@{delta:g}" and rows[2][-2] == "0/e0/stable"


def test_sampling_amplifies_only_the_released_models_epsilon() -> None:
    """With Poisson rate q the released-model total is the amplified one; the server's is not."""
    from secagg.protocol.plan import PlanSettings, make_plan

    cfg = ServerConfig(noise_multiplier=1.2, dp_mechanism="continuous-gaussian", sample_rate=0.2, grouping="reshuffle",
                       min_clients=5, groups=1)
    plan = make_plan(cfg.plan_settings, 0, bytes(32), present=[f"c{i}" for i in range(40)])
    assert plan.accounting_rate == 0.2

    class NoRecords:
        def rounds(self, limit: int) -> list[Any]:
            return []

    p = Privacy(cfg, NoRecords())  # type: ignore[arg-type]
    rec = p.charge(plan, [type("C", (), {"threshold": 3, "modulus_bits": 32})()])  # type: ignore[list-item]
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.2)))
    assert rec["epsilon_released"] == pytest.approx(float(acc.get_epsilon(cfg.delta)), rel=1e-9)
    assert rec["epsilon"] == pytest.approx(dp_epsilon(1, 1.2, cfg.delta), rel=1e-9)
    assert rec["epsilon_released"] < rec["epsilon"]


@pytest.mark.parametrize(("overrides", "match"), [
    ({"grouping": "random"}, "grouping must be one of 'stable', 'reshuffle', got 'random'"),
    ({"epoch_rounds": 0}, "epoch_rounds must be at least 1, got 0"),
    ({"epoch_rounds": 2.5}, "epoch_rounds must be an integer"),
    ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\] \(0: no Poisson sampling\), got 1.5"),
    ({"sample_size": -1}, "sample_size must be >= 0"),
    ({"sample_rate": 0.5, "sample_size": 4}, "two sampling modes: set one"),
    ({"sample_size": 2000}, "sample_size 2000 exceeds max_clients 1000"),
    ({"epsilon_budget": 3.0}, "epsilon_budget 3 needs DP noise: set noise_multiplier > 0"),
    ({"delta": 1.0}, r"delta must be in \(0, 1\), got 1.0"),
    ({"delta": 0}, r"delta must be in \(0, 1\)"),
    ({"dp_mechanism": "laplace"}, "dp_mechanism must be one of 'gaussian', 'skellam', 'continuous-gaussian'"),
    ({"epsilon_budget": -1.0}, "epsilon_budget must be >= 0"),
])
def test_plan_and_budget_settings_are_validated_by_name(tmp_path: Path, overrides: dict, match: str) -> None:
    from secagg.server.tls import write_dev_pki

    pki = write_dev_pki(tmp_path / "pki")
    with pytest.raises(ConfigError, match=match):
        load(None, {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), **overrides})


@pytest.mark.parametrize("field", ["epoch_seed", "population", "epsilon"])
def test_a_rewritten_plan_or_privacy_charge_fails_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str) -> None:
    """The plan and the charge live in the chained record: rewriting the epoch seed (to claim other
    groups), the population or the epsilon in the SQLite file is caught by `secagg verify`."""
    import json
    import sqlite3

    import numpy as np
    from secagg.protocol.plan import PlanSettings, make_plan
    from secagg.server.ledger import default_key_path, new_key, write_key

    db = tmp_path / "secagg.db"
    key = new_key()
    write_key(default_key_path(db), key)
    plan = make_plan(PlanSettings(groups=2), 0, bytes(range(32)), present=NAMES)
    settings = {"plan": plan.record(), "privacy": {"epsilon": 1.25, "delta": 1e-6, "epsilon_round": 1.25}}
    with Store(db, ledger_key=key) as st:
        st.append_model(np.zeros(3), round_id=None, reason="initial model")
        st.begin_round("r0", settings, plan.cohort, [list(g) for g in plan.groups])
        st.finish_round("r0", "completed")
    assert main(["verify", "--db", str(db)]) == 0
    capsys.readouterr()
    if field == "epsilon":
        settings["privacy"]["epsilon"] = 0.01
    elif field == "epoch_seed":
        settings["plan"]["epoch_seed"] = bytes(32).hex()
    else:
        settings["plan"]["population"] = NAMES[:-1]
    conn = sqlite3.connect(db, isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f'DROP TRIGGER "{name}"')
    conn.execute("UPDATE rounds SET settings = ? WHERE round_id = 'r0'", (json.dumps(settings),))
    conn.close()
    assert main(["verify", "--db", str(db)]) == 1
    assert "round 'r0' was changed after it was signed" in capsys.readouterr().err


@pytest.mark.parametrize("grouping", ["stable", "reshuffle"])
def test_the_process_simulator_runs_each_grouping(tmp_path: Path, grouping: str) -> None:
    """`secagg simulate --grouping`: a server process and worker processes with the real client
    library; stable keeps the groups for the epoch, reshuffle redraws them (its clients opt in)."""
    from secagg.simulation.simulate import SimConfig, run_simulation

    cfg = SimConfig(clients=9, dim=50, rounds=3, dropout=0.0, groups=3, grouping=grouping, epoch_rounds=5, mode="semi-honest",
                    processes=2, phase_seconds=10, seed=3, workdir=str(tmp_path / "sim"))
    s = run_simulation(cfg)
    assert s["correct"] and all(r["outcome"] == "completed" for r in s["rounds"]), s["rounds"]
    with Store(tmp_path / "sim" / "secagg.db") as st:
        records = list(reversed(st.rounds(limit=3)))
    assert [r.settings["plan"]["grouping"] for r in records] == [grouping] * 3
    partitions = {frozenset(tuple(sorted(g)) for g in r.groups) for r in records}
    # reshuffle: three draws of one of 280 partitions all equal has probability 1/280^2
    assert (len(partitions) == 1) == (grouping == "stable")


@async_test
async def test_fixed_size_sampling_over_grpc_takes_exactly_that_many(tmp_path: Path) -> None:
    """Reshuffle with sample_size 4 of 6 waiting clients: exactly 4 get a round configuration (the
    record recomputes to them), the other 2 wait in the lobby and are told nothing."""
    names = NAMES[:6]
    async with running_server(tmp_path, 0, registered=names, min_clients=6, max_clients=6, groups=1, rounds=1,
                              grouping="reshuffle", sample_size=4, lobby_seconds=1.0) as h:
        async def one(c: str) -> Any:
            client = h.client(c, wait_seconds=4.0)
            return await client.participate(update_of(c, h.cfg.dim, 0), rounding_seed=seed_of(c, 0))

        outs = dict(zip(names, await asyncio.gather(*(one(c) for c in names), return_exceptions=True)))
        await h.rounds_finished()
        rec = h.record()
    assert rec.outcome == "completed" and len(rec.cohort) == 4
    assert [list(g) for g in recompute(rec.settings["plan"]).groups] == groups_of(rec)
    assert {c for c, o in outs.items() if getattr(o, "ok", False)} == set(rec.cohort)
    assert all(isinstance(outs[c], ClientError) for c in names if c not in rec.cohort)
