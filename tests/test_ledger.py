"""The tamper-evident ledger: honest history verifies, every kind of tampering is caught and named.

Real SQLite files in tmp_path; tampering goes through a raw sqlite3 connection, as an attacker
holding only the database file would do it (dropping the append-only triggers first).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from secagg.cli.main import main
from secagg.server import ledger
from secagg.server.config import ConfigError, ServerConfig
from secagg.server.ledger import (
    LedgerError,
    LedgerKeyError,
    default_key_path,
    load_private_key,
    load_public_key,
    new_key,
    open_for_server,
    verify_ledger,
    write_key,
)
from secagg.server.service import start
from secagg.server.store import _SCHEMA_V1, SCHEMA_VERSION, Store, StoreError
from secagg.server.tls import write_dev_pki

# -- helpers --------------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "secagg.db"


@pytest.fixture
def key(db: Path):
    """The ledger key, written where the server and the CLI look by default."""
    k = new_key()
    write_key(default_key_path(db), k)
    return k


@pytest.fixture
def store(db: Path, key):
    with Store(db, ledger_key=key) as s:
        yield s


def populate(s: Store) -> None:
    """Five entries: model 1, model 2, round r1 (completed), round r2 (aborted), model 3 (rollback)."""
    s.append_model(np.arange(4.0), round_id=None, reason="initial model")
    s.begin_round("r1", {"rule": "mean"}, ["a", "b", "c"], [["a", "b", "c"]])
    s.update_round("r1", survivors={"advertise": {"0": ["a", "b", "c"]}})
    v = s.append_model(np.arange(4.0) * 2, round_id="r1", reason="round r1")
    s.finish_round("r1", "completed", model_version=v, aggregate_digest="ab" * 32,
                   checks=[{"group": 0, "ok": True, "norm": 1.5}], rule={"name": "mean", "accepted": [0]},
                   timings={"total": 0.25})
    s.begin_round("r2", {}, ["a", "b", "c"], [["a", "b", "c"]])
    s.finish_round("r2", "aborted", error="too few clients")
    s.rollback(1, "r1 looked poisoned")


def raw(db: Path) -> sqlite3.Connection:
    """What an attacker with write access to the file gets: no triggers, no foreign keys."""
    conn = sqlite3.connect(db, isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f'DROP TRIGGER "{name}"')
    return conn


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def broken(s: Store, key) -> LedgerError:
    with pytest.raises(LedgerError) as info:
        verify_ledger(s, key.public_key())
    return info.value


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- honest history -----------------------------------------------------------------------------


def test_honest_appends_rounds_and_rollback_verify(store: Store, key) -> None:
    populate(store)
    summary = verify_ledger(store, key.public_key())
    entries = store.ledger_entries()
    assert (summary.entries, summary.models, summary.rounds, summary.adoptions) == (5, 3, 2, 0)
    assert [(e.seq, e.kind, e.ref) for e in entries] == [
        (1, "model", "1"), (2, "model", "2"), (3, "round", "r1"), (4, "round", "r2"), (5, "model", "3")]
    assert entries[0].prev_hash == ledger.GENESIS
    assert all(b.prev_hash == a.entry_hash for a, b in zip(entries, entries[1:]))
    assert summary.head == entries[-1].entry_hash
    # the formula is what the docs say, and the signature is over the entry hash
    e = entries[2]
    assert e.entry_hash == ledger.entry_hash(e.prev_hash, e.seq, e.kind, e.ref, e.content_digest)
    key.public_key().verify(e.signature, bytes.fromhex(e.entry_hash))
    # still verifies after reopening, from a public key file
    pub = Path(store.path + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with Store(store.path) as reader:
        assert verify_ledger(reader, load_public_key(pub)).head == summary.head


def test_a_round_is_chained_when_it_finishes_not_while_running(store: Store, key) -> None:
    store.begin_round("r1", {}, ["a"], [["a"]])
    store.update_round("r1", timings={"x": 1.0})
    assert store.ledger_size() == 0
    verify_ledger(store, key.public_key())           # a running round needs no entry
    store.finish_round("r1", "failed", error="boom")
    assert [(e.kind, e.ref) for e in store.ledger_entries()] == [("round", "r1")]
    verify_ledger(store, key.public_key())
    store.begin_round("r2", {}, [], [])
    with pytest.raises(ValueError, match="only through finish_round"):
        store.update_round("r2", outcome="completed")


def test_chained_writes_without_the_key_are_refused_and_write_nothing(db: Path, key) -> None:
    with Store(db, ledger_key=key) as s:
        s.append_model(np.zeros(2), round_id=None, reason="init")
    with Store(db) as s:                              # read-only use needs no key
        assert s.model().version == 1 and len(s.models()) == 1
        with pytest.raises(StoreError, match="needs the ledger key"):
            s.append_model(np.ones(2), round_id=None, reason="unsigned")
        with pytest.raises(StoreError, match="needs the ledger key"):
            s.rollback(1, "unsigned")
        s.begin_round("r1", {}, [], [])               # not chained: allowed
        s.register_identity("alice", bytes(32))
        with pytest.raises(StoreError, match="needs the ledger key"):
            s.finish_round("r1", "failed", error="x")
        assert s.latest_version() == 1 and s.round("r1").outcome == "running"
        verify_ledger(s, key.public_key())


def test_concurrent_writers_keep_one_chain(db: Path, key) -> None:
    import threading

    a, b = Store(db, ledger_key=key), Store(db, ledger_key=key)

    def work(s: Store, t: int) -> None:
        for i in range(8):
            s.append_model(np.full(3, float(t * 10 + i)), round_id=None, reason=f"t{t}-{i}")
            s.begin_round(f"r{t}-{i}", {}, [], [])
            s.finish_round(f"r{t}-{i}", "aborted", error="x")

    threads = [threading.Thread(target=work, args=(a if t % 2 else b, t)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    summary = verify_ledger(a, key.public_key())
    assert (summary.entries, summary.models, summary.rounds) == (64, 32, 32)
    a.close()
    b.close()


# -- tampering ----------------------------------------------------------------------------------


def test_rewritten_model_params_and_digest_are_caught(store: Store, key, db: Path) -> None:
    populate(store)
    evil = npy(np.full(4, 1e6))
    conn = raw(db)
    conn.execute("UPDATE model_versions SET params = ?, digest = ? WHERE version = 2",
                 (evil, hashlib.sha256(evil).hexdigest()))
    conn.close()
    assert store.model(2).params[0] == 1e6            # the store's own digest check is fooled...
    err = broken(store, key)                          # ...the ledger is not
    assert (err.seq, err.kind, err.ref) == (2, "model", "2")
    assert str(err).startswith("ledger entry 2 (model 2): wrong content digest")


def test_rewritten_params_alone_and_other_model_columns_are_caught(store: Store, key, db: Path) -> None:
    populate(store)
    conn = raw(db)
    conn.execute("UPDATE model_versions SET params = ? WHERE version = 3", (npy(np.ones(4)),))
    conn.close()
    err = broken(store, key)
    assert err.seq == 5 and "no longer hash to its digest column" in str(err)

    conn = raw(db)
    conn.execute("UPDATE model_versions SET params = ? WHERE version = 3", (npy(np.arange(4.0)),))  # restored
    conn.execute("UPDATE model_versions SET reason = 'routine' WHERE version = 3")
    conn.close()
    err = broken(store, key)
    assert (err.seq, err.ref) == (5, "3") and "wrong content digest" in str(err)


@pytest.mark.parametrize(("column", "value"), [
    ("outcome", "failed"),
    ("checks", json.dumps([{"group": 0, "ok": False, "norm": 1.5}])),
    ("error", "nothing to see"),
    ("started_at", "2020-01-01T00:00:00+00:00"),
])
def test_rewritten_round_record_is_caught(store: Store, key, db: Path, column: str, value: str) -> None:
    populate(store)
    conn = raw(db)
    conn.execute(f'UPDATE rounds SET "{column}" = ? WHERE round_id = ?', (value, "r1"))
    conn.close()
    err = broken(store, key)
    assert (err.seq, err.kind, err.ref) == (3, "round", "r1")
    assert "wrong content digest: round 'r1' was changed after it was signed" in str(err)


def test_round_turned_back_to_running_is_caught(store: Store, key, db: Path) -> None:
    populate(store)
    conn = raw(db)
    conn.execute("UPDATE rounds SET outcome = 'running', finished_at = NULL WHERE round_id = 'r2'")
    conn.close()
    err = broken(store, key)
    assert err.seq == 4 and "recorded as running" in str(err)


def test_deleted_ledger_row_is_caught(store: Store, key, db: Path) -> None:
    populate(store)
    conn = raw(db)
    conn.execute("DELETE FROM ledger WHERE seq = 3")
    conn.close()
    err = broken(store, key)
    assert err.seq == 4 and "broken link: entry 3 is missing" in str(err)


def test_deleted_last_ledger_row_leaves_its_row_without_entry(store: Store, key, db: Path) -> None:
    populate(store)
    conn = raw(db)
    conn.execute("DELETE FROM ledger WHERE seq = 5")
    conn.close()
    err = broken(store, key)
    assert (err.seq, err.kind, err.ref) == (None, "model", "3")
    assert str(err) == "model version 3: missing entry: this model version has no ledger entry"


def test_unchained_round_is_caught(store: Store, key, db: Path) -> None:
    populate(store)
    conn = raw(db)
    conn.execute("""INSERT INTO rounds (round_id, started_at, finished_at, outcome, settings, cohort, "groups")
                    VALUES ('r9', 'x', 'y', 'completed', '{}', '[]', '[]')""")
    conn.close()
    err = broken(store, key)
    assert (err.kind, err.ref) == ("round", "r9") and "finished round has no ledger entry" in str(err)


def test_deleted_model_version_row_is_caught(store: Store, key, db: Path) -> None:
    populate(store)
    conn = raw(db)
    conn.execute("DELETE FROM model_versions WHERE version = 3")
    conn.close()
    err = broken(store, key)
    assert (err.seq, err.kind, err.ref) == (5, "model", "3")
    assert "entry for a row that no longer exists: model version 3 was deleted" in str(err)


def test_history_re_signed_with_another_key_is_caught(store: Store, key, db: Path) -> None:
    """The attacker rewrites a model and rebuilds the whole chain, perfectly, with their own key."""
    populate(store)
    other = new_key()
    evil = npy(np.full(4, 7.0))
    conn = raw(db)
    conn.execute("UPDATE model_versions SET params = ?, digest = ? WHERE version = 2", (evil, hashlib.sha256(evil).hexdigest()))
    conn.execute("DELETE FROM ledger")
    conn.close()
    with Store(db, ledger_key=other) as forger:
        assert forger.adopt_unchained() == 5          # the attacker's own Store, signing everything anew
        assert verify_ledger(forger, other.public_key()).entries == 6
    err = broken(store, key)
    assert (err.seq, err.kind) == (1, "adopt") and "bad signature" in str(err)


def test_swapped_entries_are_caught(store: Store, key, db: Path) -> None:
    populate(store)
    conn = raw(db)
    conn.execute("UPDATE ledger SET seq = 100 WHERE seq = 2")
    conn.execute("UPDATE ledger SET seq = 2 WHERE seq = 3")
    conn.execute("UPDATE ledger SET seq = 3 WHERE seq = 100")
    conn.close()
    err = broken(store, key)
    assert (err.seq, err.kind, err.ref) == (2, "round", "r1") and "broken link" in str(err)


def test_swapped_entry_fields_are_caught(store: Store, key, db: Path) -> None:
    """Relabelling an entry (its ref) keeps the link intact but not the entry hash."""
    populate(store)
    conn = raw(db)
    conn.execute("UPDATE ledger SET ref = 'r2' WHERE seq = 3")
    conn.close()
    err = broken(store, key)
    assert err.seq == 3 and "wrong entry hash" in str(err)


def test_forged_entry_is_caught(store: Store, key, db: Path) -> None:
    """A forged model version with a well-linked entry, signed by a key that is not the ledger's."""
    populate(store)
    head = store.ledger_entries()[-1]
    evil = npy(np.full(4, 3.0))
    conn = raw(db)
    conn.execute("INSERT INTO model_versions (version, params, digest, dtype, shape, created_at, reason) "
                 "VALUES (4, ?, ?, 'float64', '[4]', '2030-01-01T00:00:00+00:00', 'forged')",
                 (evil, hashlib.sha256(evil).hexdigest()))
    row = conn.execute("SELECT version, params, digest, dtype, shape, created_at, round_id, reason, restores "
                       "FROM model_versions WHERE version = 4").fetchone()
    from secagg.server.store import _model_row

    _, content = _model_row(row)
    h = ledger.entry_hash(head.entry_hash, 6, "model", "4", content.content_digest)
    conn.execute("INSERT INTO ledger VALUES (6, 'model', '4', ?, ?, ?, ?, NULL)",
                 (content.content_digest, head.entry_hash, h, ledger.sign(new_key(), h)))
    conn.close()
    err = broken(store, key)
    assert (err.seq, err.kind, err.ref) == (6, "model", "4") and "bad signature" in str(err)


def test_deleted_tail_is_only_caught_against_a_recorded_head(store: Store, key, db: Path) -> None:
    populate(store)
    recorded = verify_ledger(store, key.public_key()).head
    store.append_model(np.zeros(4), round_id=None, reason="later")
    assert verify_ledger(store, key.public_key(), expect_head=recorded).entries == 6   # growth is fine
    conn = raw(db)                                    # drop the last two entries *and* their rows
    conn.execute("DELETE FROM ledger WHERE seq >= 5")
    conn.execute("DELETE FROM model_versions WHERE version >= 3")
    conn.close()
    assert verify_ledger(store, key.public_key()).entries == 4   # the documented limit
    with pytest.raises(LedgerError, match="recorded head .* is not in the chain"):
        verify_ledger(store, key.public_key(), expect_head=recorded)


# -- keys ---------------------------------------------------------------------------------------


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    k = new_key()
    write_key(path, k)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(tmp_path.iterdir()) == [path]         # no temp file left behind
    assert load_private_key(path).public_key() == k.public_key()
    with pytest.raises(LedgerKeyError, match="never overwritten"):
        write_key(path, new_key())
    assert load_private_key(path).public_key() == k.public_key()
    pub = tmp_path / "k.pub"
    pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert load_public_key(pub) == load_public_key(path) == k.public_key()
    with pytest.raises(LedgerKeyError, match="only a public key"):
        load_private_key(pub)
    (tmp_path / "junk").write_bytes(b"not a key")
    with pytest.raises(LedgerKeyError, match="not a PEM Ed25519 private key"):
        load_public_key(tmp_path / "junk")
    with pytest.raises(LedgerKeyError, match="no ledger key at"):
        load_public_key(tmp_path / "missing")


def test_server_key_is_created_only_for_an_empty_ledger(db: Path) -> None:
    path = default_key_path(db)
    assert path == str(db) + ".ledger-key"
    with Store(db) as s:
        summary = open_for_server(s, path)            # creates the key, nothing to adopt
        assert summary.entries == 0 and stat.S_IMODE(Path(path).stat().st_mode) == 0o600
        s.append_model(np.zeros(2), round_id=None, reason="init")   # the store now signs
    Path(path).rename(db.parent / "elsewhere")
    with Store(db) as s, pytest.raises(LedgerKeyError, match="no ledger key at .* has 1 entries"):
        open_for_server(s, path)
    assert not Path(path).exists()                    # never a second, unrelated key


# -- migration ----------------------------------------------------------------------------------


def make_v1_database(db: Path) -> None:
    """A database as schema 1 wrote it: two model versions, a finished and a running round."""
    conn = sqlite3.connect(db, isolation_level=None)
    for statement in _SCHEMA_V1:
        conn.execute(statement)
    for v in (1, 2):
        blob = npy(np.full(3, float(v)))
        conn.execute("INSERT INTO model_versions VALUES (?, ?, ?, 'float64', '[3]', ?, ?, ?, NULL)",
                     (v, blob, hashlib.sha256(blob).hexdigest(), f"2024-01-0{v}T00:00:00+00:00",
                      None if v == 1 else "old-1", "initial model" if v == 1 else "round old-1"))
    conn.execute("""INSERT INTO rounds (round_id, started_at, finished_at, outcome, settings, cohort, "groups",
                    checks, model_version) VALUES ('old-1', 's', 'f', 'completed', '{"m":3}', '["a"]', '[["a"]]',
                    '[{"ok":true}]', 2)""")
    conn.execute("""INSERT INTO rounds (round_id, started_at, outcome, settings, cohort, "groups")
                    VALUES ('old-2', 's', 'running', '{}', '[]', '[]')""")
    conn.execute("PRAGMA user_version = 1")
    conn.close()


def test_schema_1_database_is_upgraded_and_its_rows_adopted(db: Path) -> None:
    make_v1_database(db)
    with Store(db) as s:                              # any open upgrades the schema in place
        assert s.model(2).params.tolist() == [2.0] * 3 and s.round("old-1").outcome == "completed"
        assert s.ledger_size() == 0
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()
    key_path = default_key_path(db)
    with Store(db) as s:
        with pytest.raises(LedgerError, match="adopted at the server's first start"):
            verify_ledger(s, new_key().public_key())
        summary = open_for_server(s, key_path)        # first start: key created, old rows adopted
        assert (summary.entries, summary.models, summary.rounds, summary.adoptions) == (4, 2, 1, 1)
        entries = s.ledger_entries()
        assert [(e.kind, e.ref) for e in entries] == [
            ("adopt", ledger.ADOPT_REF), ("model", "1"), ("model", "2"), ("round", "old-1")]
        note = json.loads(entries[0].detail)
        assert note["models"] == [1, 2] and note["rounds"] == ["old-1"] and "schema 1" in note["why"]
        s.finish_round("old-2", "failed", error="found at restart")   # the running one is chained when it ends
    with Store(db) as s:
        again = open_for_server(s, key_path)          # second start: nothing adopted again
        assert (again.entries, again.adoptions) == (5, 1)
        s.append_model(np.zeros(3), round_id=None, reason="next")
        assert verify_ledger(s, load_public_key(key_path)).entries == 6


def test_wiped_ledger_is_not_re_adopted_while_the_key_exists(store: Store, key, db: Path) -> None:
    populate(store)
    conn = raw(db)
    conn.execute("DELETE FROM ledger")
    conn.close()
    with pytest.raises(LedgerError, match="model version 1: missing entry"):
        open_for_server(store, default_key_path(db))
    assert store.ledger_size() == 0


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_verify_ok_and_broken(capsys: pytest.CaptureFixture[str], store: Store, key, db: Path) -> None:
    populate(store)
    head = store.ledger_entries()[-1].entry_hash
    code, out, err = cli(capsys, "verify", "--db", str(db))
    assert (code, err) == (0, "")
    assert out == f"ledger OK: 5 entries (3 models, 2 rounds), head {head}\n"
    code, out, _ = cli(capsys, "verify", "--db", str(db), "--expect-head", store.ledger_entries()[1].entry_hash)
    assert code == 0 and out.startswith("ledger OK: 5 entries")

    # rollback signs with the key (default path), and the chain still verifies
    code, out, _ = cli(capsys, "rollback", "--db", str(db), "--to", "2", "--reason", "undo")
    assert code == 0 and out.startswith("appended model version 4")
    code, out, _ = cli(capsys, "verify", "--db", str(db), "--expect-head", head)
    assert code == 0 and out.startswith("ledger OK: 6 entries (4 models, 2 rounds), head ")

    conn = raw(db)
    conn.execute("UPDATE rounds SET outcome = 'completed' WHERE round_id = 'r2'")
    conn.close()
    code, out, err = cli(capsys, "verify", "--db", str(db))
    assert code == 1 and out == ""
    assert err == ("secagg verify: error: ledger entry 4 (round r2): wrong content digest: "
                   "round 'r2' was changed after it was signed\n")

    code, _, err = cli(capsys, "verify", "--db", str(db), "--key", str(db) + ".nope")
    assert code == 2 and err.startswith("secagg verify: error: no ledger key at") and err.count("\n") == 1
    code, _, err = cli(capsys, "verify", "--db", str(db), "--expect-head", "abc")
    assert code == 2 and "64 hex characters" in err


def test_cli_verify_with_a_public_key_and_expect_head(capsys: pytest.CaptureFixture[str], store: Store, key, db: Path,
                                                      tmp_path: Path) -> None:
    populate(store)
    pub = tmp_path / "ledger.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    code, out, _ = cli(capsys, "verify", "--db", str(db), "--key", str(pub))
    assert code == 0 and out.startswith("ledger OK: 5 entries (3 models, 2 rounds)")
    code, out, err = cli(capsys, "verify", "--db", str(db), "--key", str(pub), "--expect-head", "ab" * 32)
    assert code == 1 and out == "" and "recorded head abababababababab... is not in the chain" in err
    other = tmp_path / "other.pem"
    write_key(other, new_key())
    code, _, err = cli(capsys, "verify", "--db", str(db), "--key", str(other))
    assert code == 1 and err.startswith("secagg verify: error: ledger entry 1 (model 1): bad signature")


def test_cli_rollback_without_the_key_is_refused(capsys: pytest.CaptureFixture[str], store: Store, db: Path) -> None:
    populate(store)
    Path(default_key_path(db)).unlink()
    code, out, err = cli(capsys, "rollback", "--db", str(db), "--to", "1", "--reason", "x")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "no ledger key at" in err and "--key" in err
    assert store.latest_version() == 3


def test_cli_verify_as_a_real_process(store: Store, db: Path) -> None:
    populate(store)
    cmd = [sys.executable, "-m", "secagg.cli", "verify", "--db", str(db)]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("ledger OK: 5 entries (3 models, 2 rounds), head ")
    conn = raw(db)
    conn.execute("DELETE FROM ledger WHERE seq = 1")
    conn.close()
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == "secagg verify: error: ledger entry 2 (model 2): broken link: entry 1 is missing (the chain jumps from 0 to 2)\n"


# -- the server ---------------------------------------------------------------------------------


def server_config(tmp_path: Path, db: Path, **overrides) -> ServerConfig:
    pki = write_dev_pki(tmp_path / "pki")
    settings = {"address": "127.0.0.1:0", "db": str(db), "tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key),
                "dim": 4, "rounds": 1, "min_clients": 6, "max_clients": 6, "lobby_seconds": 0.05}
    return ServerConfig(**(settings | overrides))


def test_server_start_refuses_a_tampered_database(tmp_path: Path, store: Store, db: Path) -> None:
    populate(store)
    evil = npy(np.full(4, 9.0))
    conn = raw(db)
    conn.execute("UPDATE model_versions SET params = ?, digest = ? WHERE version = 3", (evil, hashlib.sha256(evil).hexdigest()))
    conn.close()
    cfg = server_config(tmp_path, db)
    with pytest.raises(ConfigError) as info:
        asyncio.run(start(cfg))
    assert str(info.value) == (f"refusing to start: the ledger of {db} does not verify: ledger entry 5 (model 3): "
                               "wrong content digest: model version 3 was changed after it was signed")
    assert store.latest_version() == 3                # nothing was appended on top


def test_server_start_refuses_without_its_key_and_uses_ledger_key(tmp_path: Path, store: Store, db: Path, key) -> None:
    populate(store)
    kept = tmp_path / "keys" / "ledger.pem"
    kept.parent.mkdir()
    Path(default_key_path(db)).rename(kept)
    with pytest.raises(ConfigError, match=r"cannot open the ledger: no ledger key at .*\.ledger-key, but the ledger .* has 5 entries"):
        asyncio.run(start(server_config(tmp_path, db)))

    async def go() -> None:                           # with ledger_key pointing at it, it starts and signs
        srv = await start(server_config(tmp_path, db, ledger_key=str(kept)))
        await srv.stop(grace=0.1)

    asyncio.run(go())
    assert not Path(default_key_path(db)).exists()
    assert verify_ledger(store, load_public_key(kept)).entries == 5
    with pytest.raises(ConfigError, match="ledger_key must be its own file"):
        server_config(tmp_path, db, ledger_key=str(db)).validate()


def test_server_first_start_creates_the_key_and_chains_what_it_writes(tmp_path: Path, db: Path) -> None:
    with Store(db) as s:
        s.begin_round("crashed", {}, [], [])          # left running by a crash

    async def go() -> None:
        srv = await start(server_config(tmp_path, db))
        await srv.stop(grace=0.1)

    asyncio.run(go())
    path = Path(default_key_path(db))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with Store(db) as s:
        summary = verify_ledger(s, load_public_key(path))
        assert [(e.kind, e.ref) for e in s.ledger_entries()] == [("round", "crashed"), ("model", "1")]
        assert summary.adoptions == 0 and s.round("crashed").outcome == "failed"
