"""The SQLite store: durability, append-only model history, digests, rounds, concurrency."""

from __future__ import annotations

import hashlib
import io
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from secagg.server.ledger import new_key
from secagg.server.store import SCHEMA_VERSION, Store, StoreError


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "secagg.db"


@pytest.fixture
def ledger_key():
    """The ledger signing key: chained writes (models, finished rounds) need it."""
    return new_key()


@pytest.fixture
def store(db: Path, ledger_key):
    with Store(db, ledger_key=ledger_key) as s:
        yield s


def _raw(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# -- opening --------------------------------------------------------------------------------


def test_new_file_has_wal_schema_version_and_foreign_keys(store: Store, db: Path) -> None:
    assert db.exists()
    conn = _raw(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    conn.close()


def test_newer_schema_is_refused(db: Path) -> None:
    Store(db).close()
    conn = _raw(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this secagg supports"):
        Store(db)


def test_foreign_sqlite_file_and_garbage_file_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE stuff (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a secagg store"):
        Store(other)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable secagg database"):
        Store(garbage)


def test_missing_directory_gives_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open database"):
        Store(tmp_path / "nope" / "x.db")


def test_closed_store_says_so(db: Path) -> None:
    s = Store(db)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.identities()


# -- identities -----------------------------------------------------------------------------


def test_identities_register_replace_revoke(store: Store) -> None:
    k1, k2, k3 = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))
    store.register_identity("alice", k1)
    store.register_identity("alice", k1)  # same key again: no-op
    store.register_identity("bob.1_x-y", k2)
    assert store.identity("alice") == k1
    assert store.identities() == {"alice": k1, "bob.1_x-y": k2}
    with pytest.raises(StoreError, match="already registered as 'alice'.*two votes"):
        store.register_identity("mallory", k1)   # one key, two ids: one party, two votes
    assert "mallory" not in store.identities()

    with pytest.raises(StoreError, match="different public key.*replace=True"):
        store.register_identity("alice", k3)
    assert store.identity("alice") == k1
    store.register_identity("alice", k3, replace=True)
    assert store.identity("alice") == k3

    store.revoke_identity("alice")
    store.revoke_identity("alice")  # twice: no-op
    assert store.identity("alice") is None
    assert store.identities() == {"bob.1_x-y": k2}
    with pytest.raises(StoreError, match="revoked"):
        store.register_identity("alice", k3)
    row = store._conn.execute("SELECT revoked_at FROM identities WHERE client_id='alice'").fetchone()
    assert row[0] is not None  # kept for the record

    kinds = [(e.client_id, e.kind) for e in store.events()]
    assert kinds == [
        ("alice", "registered"),
        ("bob.1_x-y", "registered"),
        ("alice", "replaced"),
        ("alice", "revoked"),
    ]
    store.register_identity("alice", k1, replace=True)  # reinstated
    assert store.identity("alice") == k1


@pytest.mark.parametrize("bad", ["", "a b", "x" * 65, "../etc", "é", "a\n"])
def test_bad_client_ids_are_refused(store: Store, bad: str) -> None:
    with pytest.raises(StoreError, match="invalid client id"):
        store.register_identity(bad, bytes(32))


def test_bad_key_length_and_unknown_revoke(store: Store) -> None:
    with pytest.raises(StoreError, match="32 raw bytes"):
        store.register_identity("alice", bytes(31))
    with pytest.raises(StoreError, match="no such registered client"):
        store.revoke_identity("ghost")
    assert store.identity("ghost") is None


# -- model versions -------------------------------------------------------------------------


def test_models_append_and_read_back_bit_identical(store: Store) -> None:
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal(1000).astype(np.float32),
        rng.standard_normal((3, 4)),
        rng.integers(0, 2**63, 17, dtype=np.uint64),
        np.array([np.nan, -0.0, np.inf], dtype=np.float64),
    ]
    assert store.latest_version() is None
    with pytest.raises(StoreError, match="no model versions yet"):
        store.model()
    for i, arr in enumerate(arrays, start=1):
        assert store.append_model(arr, round_id=None if i == 1 else f"r{i}", reason=f"v{i}") == i
    for i, arr in enumerate(arrays, start=1):
        mv = store.model(i)
        assert mv.params.dtype == arr.dtype and mv.params.shape == arr.shape
        assert mv.params.tobytes() == arr.tobytes()
        assert mv.digest == hashlib.sha256(_npy(arr)).hexdigest()
        assert mv.reason == f"v{i}" and mv.restores is None
        assert mv.created_at.endswith("+00:00")
    assert store.model().version == 4 == store.latest_version()
    infos = store.models()
    assert [i.version for i in infos] == [1, 2, 3, 4]
    assert infos[1].shape == (3, 4) and infos[0].dtype == "float32"
    assert infos[1].round_id == "r2"
    with pytest.raises(StoreError, match=r"no model version 9 .*1\.\.4"):
        store.model(9)


def test_append_model_refuses_objects_and_empty_reason(store: Store) -> None:
    with pytest.raises(ValueError, match="numeric"):
        store.append_model(np.array([object()]), round_id=None, reason="x")
    with pytest.raises(StoreError, match="needs a reason"):
        store.append_model(np.zeros(3), round_id=None, reason="  ")
    with pytest.raises(StoreError, match="no model version 5"):
        store.append_model(np.zeros(3), round_id=None, reason="x", restores=5)
    assert store.models() == []


def test_update_and_delete_of_model_versions_are_refused_in_sql(store: Store, db: Path) -> None:
    store.append_model(np.arange(5.0), round_id=None, reason="init")
    conn = _raw(db)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE model_versions SET params = x'00' WHERE version = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE model_versions SET reason = 'tampered'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM model_versions")
    with pytest.raises(sqlite3.IntegrityError, match="without gaps"):
        conn.execute(
            "INSERT INTO model_versions (version, params, digest, dtype, shape, created_at, reason)"
            " VALUES (7, x'00', ?, 'f8', '[]', 'now', 'gap')",
            ("0" * 64,),
        )
    conn.close()
    mv = store.model(1)
    assert np.array_equal(mv.params, np.arange(5.0)) and mv.reason == "init"


def test_corrupt_row_is_reported_not_served(store: Store, db: Path) -> None:
    good = np.arange(4, dtype=np.float64)
    store.append_model(good, round_id=None, reason="good")
    tampered = _npy(good + 1)
    conn = _raw(db)
    conn.execute(
        "INSERT INTO model_versions (version, params, digest, dtype, shape, created_at, reason)"
        " VALUES (2, ?, ?, 'float64', '[4]', '2024-01-01T00:00:00+00:00', 'evil')",
        (tampered, hashlib.sha256(_npy(good)).hexdigest()),
    )
    conn.close()
    with pytest.raises(StoreError, match="model version 2 .* is corrupt"):
        store.model()
    with pytest.raises(StoreError, match="corrupt"):
        store.model(2)
    with pytest.raises(StoreError, match="corrupt"):
        store.rollback(2, "copy the bad one")
    assert store.latest_version() == 2  # the failed rollback appended nothing
    # recovery: roll back to the good version
    assert store.rollback(1, "v2 is corrupt") == 3
    assert np.array_equal(store.model().params, good)


def test_rollback_appends_and_restores_exactly(store: Store) -> None:
    v1 = np.linspace(-1, 1, 33, dtype=np.float32)
    store.append_model(v1, round_id=None, reason="init")
    store.append_model(v1 * 100, round_id="r1", reason="round r1")
    new = store.rollback(1, "r1 was poisoned")
    assert new == 3
    latest = store.model()
    assert latest.version == 3 and latest.restores == 1 and latest.reason == "r1 was poisoned"
    assert latest.params.tobytes() == v1.tobytes() and latest.params.dtype == np.float32
    assert latest.digest == store.model(1).digest
    assert latest.round_id is None
    assert store.model(2).params.tobytes() == (v1 * 100).tobytes()  # history untouched
    with pytest.raises(StoreError, match="no model version 42"):
        store.rollback(42, "nope")
    with pytest.raises(StoreError, match="needs a reason"):
        store.rollback(1, "")
    assert store.latest_version() == 3


# -- rounds ---------------------------------------------------------------------------------


def test_round_lifecycle_round_trips_json(store: Store) -> None:
    cohort = [f"c{i}" for i in range(6)]
    groups = [cohort[:3], cohort[3:]]
    settings = {"group_size": 3, "threshold": 2, "bound": 1.5, "rule": "median", "k": np.int64(32)}
    store.begin_round("r-001", settings, cohort, groups)
    rec = store.round("r-001")
    assert rec.outcome == "running" and rec.finished_at is None
    assert rec.settings == {**settings, "k": 32}
    assert rec.cohort == cohort and rec.groups == groups
    assert rec.survivors == {} and rec.dropouts == [] and rec.checks == [] and rec.timings == {}
    assert rec.rule is None and rec.model_version is None

    survivors = {"advertise": {"0": cohort[:3], "1": cohort[3:]}, "masked": {"0": cohort[:2], "1": cohort[3:]}}
    dropouts = [{"client": "c2", "group": 0, "phase": "masked", "reason": "stream closed"}]
    store.update_round("r-001", survivors=survivors, dropouts=dropouts, timings={"advertise": 0.01})
    checks = [{"group": 0, "ok": True, "norm": 1.2}, {"group": 1, "ok": False, "reason": "count"}]
    store.update_round("r-001", checks=checks, rule={"name": "median", "accepted": [0]})
    version = store.append_model(np.zeros(3), round_id="r-001", reason="round r-001")
    store.finish_round(
        "r-001", "completed", aggregate_digest="ab" * 32, model_version=version,
        timings={"advertise": 0.01, "unmask": 0.2},
    )
    rec = store.round("r-001")
    assert rec.outcome == "completed" and rec.finished_at is not None
    assert rec.survivors == survivors and rec.dropouts == dropouts and rec.checks == checks
    assert rec.rule == {"name": "median", "accepted": [0]}
    assert rec.timings == {"advertise": 0.01, "unmask": 0.2}
    assert rec.aggregate_digest == "ab" * 32 and rec.model_version == version
    assert rec.error is None
    assert list(rec.survivors) == ["advertise", "masked"]  # phase order kept

    with pytest.raises(StoreError, match="already finished"):
        store.update_round("r-001", error="late")
    with pytest.raises(StoreError, match="already finished"):
        store.finish_round("r-001", "failed")


def test_round_field_validation(store: Store) -> None:
    store.begin_round("r", {}, ["a", "b"], [["a", "b"]])
    with pytest.raises(ValueError, match="unknown round field.*bogus"):
        store.update_round("r", bogus=1)
    with pytest.raises(ValueError, match="outcome must be one of"):
        store.update_round("r", outcome="won")
    with pytest.raises(ValueError, match="finishes as one of"):
        store.finish_round("r", "running")
    with pytest.raises(ValueError, match="JSON"):
        store.update_round("r", rule={"x": object()})
    with pytest.raises(StoreError, match="no model version 3"):
        store.update_round("r", model_version=3)
    with pytest.raises(StoreError, match="no round 'nope'"):
        store.update_round("nope", error="x")
    with pytest.raises(StoreError, match="no round 'nope'"):
        store.round("nope")
    with pytest.raises(ValueError, match="not in the cohort"):
        store.begin_round("r2", {}, ["a"], [["a", "z"]])
    with pytest.raises(ValueError, match="more than one group"):
        store.begin_round("r2", {}, ["a", "b"], [["a"], ["a", "b"]])
    store.finish_round("r", "aborted", error="too few clients")
    rec = store.round("r")
    assert rec.outcome == "aborted" and rec.error == "too few clients"


def test_duplicate_round_refused_first_record_intact(store: Store) -> None:
    store.begin_round("r1", {"m": 3}, ["a", "b", "c"], [["a", "b", "c"]])
    store.update_round("r1", timings={"advertise": 1.0})
    with pytest.raises(StoreError, match="already exists"):
        store.begin_round("r1", {"m": 99}, ["x"], [["x"]])
    rec = store.round("r1")
    assert rec.settings == {"m": 3} and rec.cohort == ["a", "b", "c"]
    assert rec.timings == {"advertise": 1.0} and rec.outcome == "running"


def test_rounds_newest_first_with_limit(store: Store) -> None:
    for i in range(5):
        store.begin_round(f"r{i}", {}, [], [])
    assert [r.round_id for r in store.rounds()] == ["r4", "r3", "r2", "r1", "r0"]
    assert [r.round_id for r in store.rounds(limit=2)] == ["r4", "r3"]


# -- events ---------------------------------------------------------------------------------


def test_events_record_and_filter(store: Store) -> None:
    store.record_event("r1", "alice", "rejected", "INVALID_ARGUMENT", "vector has 9 chunks, expected 8")
    store.record_event("r1", "bob", "dropped", "DEADLINE_EXCEEDED", "no masked input by deadline")
    store.record_event(None, "?? bad id", "rejected", "UNAUTHENTICATED", "unknown identity")
    assert [e.kind for e in store.events()] == ["rejected", "dropped", "rejected"]
    r1 = store.events("r1")
    assert [(e.client_id, e.status) for e in r1] == [("alice", "INVALID_ARGUMENT"), ("bob", "DEADLINE_EXCEEDED")]
    assert r1[0].reason == "vector has 9 chunks, expected 8"
    assert [e.client_id for e in store.events(kind="rejected")] == ["alice", "?? bad id"]
    assert [e.kind for e in store.events(client_id="bob")] == ["dropped"]
    with pytest.raises(ValueError, match="gRPC status name"):
        store.record_event("r1", "a", "rejected", "BAD_THING", "x")


# -- concurrency and durability -------------------------------------------------------------


def test_concurrent_writes_from_threads_and_two_connections_all_land(db: Path, ledger_key) -> None:
    a, b = Store(db, ledger_key=ledger_key), Store(db, ledger_key=ledger_key)  # two connections, like a server and the CLI
    errors: list[BaseException] = []
    per_thread = 10

    def work(store: Store, t: int) -> None:
        try:
            for i in range(per_thread):
                store.append_model(np.full(4, t * 100 + i, dtype=np.int64), round_id=None, reason=f"t{t}-{i}")
                store.record_event(f"r{t}", f"c{i}", "dropped", "CANCELLED", "stream closed")
                store.register_identity(f"t{t}-c{i}", bytes([t, i]) * 16)
            store.begin_round(f"round-{t}", {"t": t}, [], [])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(a if t % 2 else b, t)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    infos = a.models()
    assert [i.version for i in infos] == list(range(1, 4 * per_thread + 1))
    assert sorted(i.reason for i in infos) == sorted(f"t{t}-{i}" for t in range(4) for i in range(per_thread))
    for info in infos:  # every version's params match what its writer appended
        t, i = map(int, info.reason[1:].split("-"))
        assert b.model(info.version).params.tolist() == [t * 100 + i] * 4
    assert len(b.events(kind="dropped")) == 4 * per_thread
    assert len(a.identities()) == 4 * per_thread
    assert {r.round_id for r in b.rounds()} == {f"round-{t}" for t in range(4)}
    a.close()
    b.close()


def test_reopen_keeps_everything(db: Path, ledger_key) -> None:
    params = np.arange(10, dtype=np.float32)
    with Store(db, ledger_key=ledger_key) as s:
        s.register_identity("alice", bytes(range(32)))
        s.revoke_identity("alice")
        s.register_identity("bob", bytes(32))
        s.append_model(params, round_id=None, reason="init")
        s.begin_round("r1", {"m": 2}, ["bob"], [["bob"]])
        s.finish_round("r1", "failed", error="boom", dropouts=[{"client": "bob"}])
        s.rollback(1, "again")
        s.record_event("r1", "bob", "dropped", "UNAVAILABLE", "gone")
    with Store(db) as s:
        assert s.identities() == {"bob": bytes(32)}
        assert s.identity("alice") is None
        assert [m.version for m in s.models()] == [1, 2]
        assert s.model().params.tobytes() == params.tobytes() and s.model().restores == 1
        rec = s.round("r1")
        assert rec.outcome == "failed" and rec.error == "boom" and rec.dropouts == [{"client": "bob"}]
        assert [e.kind for e in s.events()] == ["registered", "revoked", "registered", "dropped"]
