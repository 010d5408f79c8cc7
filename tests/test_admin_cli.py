"""`secagg rounds / rollback / models / register / certs`, run in-process on real files."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from secagg.cli.main import main
from secagg.server.ledger import default_key_path, new_key, write_key
from secagg.server.store import Store
from secagg.server.tls import identity_public_key, load_identity_key


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A store with two model versions and two rounds, one finished; its ledger key at the default path."""
    path = tmp_path / "server.db"
    key = new_key()
    write_key(default_key_path(path), key)
    with Store(path, ledger_key=key) as s:
        s.append_model(np.arange(3, dtype=np.float32), round_id=None, reason="initial model")
        s.begin_round("r-001", {"group_size": 3}, ["a", "b", "c", "d", "e", "f"], [["a", "b", "c"], ["d", "e", "f"]])
        s.update_round("r-001", survivors={"advertise": {"0": ["a", "b", "c"], "1": ["d", "e", "f"]},
                                           "masked": {"0": ["a", "b"], "1": ["d", "e", "f"]}})
        v = s.append_model(np.arange(3, dtype=np.float32) * 2, round_id="r-001", reason="round r-001")
        s.finish_round("r-001", "completed", model_version=v, aggregate_digest="cd" * 32)
        s.begin_round("r-002", {}, ["a"], [["a"]])
    return path


@pytest.mark.parametrize("command", [["rounds"], ["models"], ["rollback", "--to", "1", "--reason", "x"]])
def test_missing_db_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "nope.db"
    code, out, err = run(capsys, *command, "--db", str(missing))
    assert code == 2 and out == ""
    assert err.strip() == (
        f"secagg {command[0]}: error: no database at {missing}; "
        f"start a server with `secagg serve --db {missing}` first"
    )
    assert not missing.exists()  # a read command never creates the file


def test_rounds_table(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    code, out, err = run(capsys, "rounds", "--db", str(db))
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["ROUND", "STARTED", "OUTCOME", "GROUPS", "SURVIVORS", "MODEL", "PLAN", "EPSILON"]
    assert lines[1].split()[0] == "r-002" and lines[1].split()[-6:] == ["running", "1", "-/1", "-", "-", "-"]
    assert lines[2].split()[0] == "r-001" and lines[2].split()[-6:] == ["completed", "2", "5/6", "2", "-", "-"]
    assert lines[0].index("OUTCOME") == lines[1].index("running") == lines[2].index("completed")  # aligned

    code, out, _ = run(capsys, "rounds", "--db", str(db), "--limit", "1")
    assert code == 0 and len(out.splitlines()) == 2


def test_rounds_show_and_json(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    code, out, _ = run(capsys, "rounds", "--db", str(db), "--show", "r-001", "--json")
    assert code == 0
    record = json.loads(out)
    assert record["round_id"] == "r-001" and record["outcome"] == "completed"
    assert record["survivors"]["masked"] == {"0": ["a", "b"], "1": ["d", "e", "f"]}
    assert record["model_version"] == 2 and record["aggregate_digest"] == "cd" * 32

    code, out, _ = run(capsys, "rounds", "--db", str(db), "--show", "r-001")
    assert code == 0
    assert "outcome" in out and "completed" in out and "survivors" in out and '"masked"' in out

    code, out, _ = run(capsys, "rounds", "--db", str(db), "--json")
    assert [r["round_id"] for r in json.loads(out)] == ["r-002", "r-001"]

    code, out, err = run(capsys, "rounds", "--db", str(db), "--show", "r-999")
    assert code == 2 and out == ""
    assert "no round 'r-999'" in err and "secagg rounds --db" in err and len(err.strip().splitlines()) == 1


def test_rounds_on_empty_db(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    Store(path).close()
    code, out, _ = run(capsys, "rounds", "--db", str(path))
    assert code == 0 and out.strip() == f"no rounds recorded in {path} yet"
    code, out, _ = run(capsys, "models", "--db", str(path))
    assert code == 0 and out.strip() == f"no model versions in {path} yet"


def test_rollback_and_models(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    code, out, err = run(capsys, "rollback", "--db", str(db), "--to", "1", "--reason", "r-001 looked poisoned")
    assert code == 0 and err == ""
    assert out.startswith("appended model version 3 (restores version 1")
    with Store(db) as s:
        latest = s.model()
        assert latest.version == 3 and latest.restores == 1
        assert latest.params.tobytes() == s.model(1).params.tobytes()
        digest1 = s.model(1).digest

    code, out, _ = run(capsys, "models", "--db", str(db))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["VERSION", "CREATED", "DIGEST", "SHAPE", "RESTORES", "ROUND", "REASON"]
    assert len(lines) == 4
    assert lines[3].split()[0] == "3" and digest1[:12] in lines[3] and "r-001 looked poisoned" in lines[3]
    assert lines[2].split()[0] == "2" and "r-001" in lines[2]

    code, out, _ = run(capsys, "models", "--db", str(db), "--json")
    infos = json.loads(out)
    assert [i["version"] for i in infos] == [1, 2, 3] and infos[2]["restores"] == 1

    code, out, err = run(capsys, "rollback", "--db", str(db), "--to", "9", "--reason", "x")
    assert code == 2 and "no model version 9" in err and "1..3" in err
    code, out, err = run(capsys, "rollback", "--db", str(db), "--to", "1", "--reason", " ")
    assert code == 2 and "needs a reason" in err


def test_register_from_public_key_file_and_identity_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"  # register may create the database
    private = ed25519.Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes_raw()
    pem = tmp_path / "alice.pub"
    pem.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    code, out, err = run(capsys, "register", "--db", str(db), "--client-id", "alice", "--public-key-file", str(pem))
    assert code == 0 and err == "" and public.hex() in out

    # certs writes an identity key; register derives its public key
    pki_dir = tmp_path / "pki"
    assert run(capsys, "certs", "--out", str(pki_dir), "--client", "bob")[0] == 0
    code, out, _ = run(capsys, "register", "--db", str(db), "--client-id", "bob", "--key", str(pki_dir / "bob.identity"))
    assert code == 0
    bob_public = identity_public_key(load_identity_key(pki_dir / "bob.identity"))
    with Store(db) as s:
        assert s.identities() == {"alice": public, "bob": bob_public}

    # one key under a second id is refused: one party, two votes
    code, out, err = run(capsys, "register", "--db", str(db), "--client-id", "bob2", "--key", str(pki_dir / "bob.identity"))
    assert code == 2 and "already registered as 'bob'" in err

    # a different key for alice needs --replace
    assert run(capsys, "certs", "--out", str(pki_dir), "--client", "carol")[0] == 0
    code, out, err = run(capsys, "register", "--db", str(db), "--client-id", "alice", "--key", str(pki_dir / "carol.identity"))
    assert code == 2 and "--replace" in err
    code, _, _ = run(capsys, "register", "--db", str(db), "--client-id", "alice", "--key",
                     str(pki_dir / "carol.identity"), "--replace")
    assert code == 0
    with Store(db) as s:
        assert s.identity("alice") == identity_public_key(load_identity_key(pki_dir / "carol.identity"))


def test_register_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    code, _, err = run(capsys, "register", "--db", db, "--client-id", "a", "--key", str(tmp_path / "missing"))
    assert code == 2 and "no identity key at" in err
    bad = tmp_path / "bad.pub"
    bad.write_bytes(b"\x00" * 5)
    code, _, err = run(capsys, "register", "--db", db, "--client-id", "a", "--public-key-file", str(bad))
    assert code == 2 and "not an Ed25519 public key" in err
    good = tmp_path / "good.pub"
    good.write_bytes(bytes(range(32)))
    code, _, err = run(capsys, "register", "--db", db, "--client-id", "no spaces", "--public-key-file", str(good))
    assert code == 2 and "invalid client id" in err
    with pytest.raises(SystemExit) as exc:  # argparse: exactly one key source
        main(["register", "--db", db, "--client-id", "a"])
    assert exc.value.code == 2


def test_certs_writes_pki_and_identity_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "certs"
    code, out, err = run(capsys, "certs", "--out", str(out_dir), "--client", "alice", "--client", "bob")
    assert code == 0 and err == ""
    expected = ["ca.pem", "ca.key", "server.pem", "server.key",
                "alice.pem", "alice.key", "alice.identity", "alice.pub", "bob.pem", "bob.key", "bob.identity", "bob.pub"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(expected)
    for name in expected:
        assert str(out_dir / name) in out
    for name in ("ca.key", "server.key", "alice.key", "alice.identity"):
        assert stat.S_IMODE((out_dir / name).stat().st_mode) == 0o600
    alice_key = load_identity_key(out_dir / "alice.identity")
    assert identity_public_key(alice_key).hex() in out
    assert "secagg register --db DB --client-id alice" in out

    # running again keeps the CA and the identity keys (registrations stay valid)
    ca_before = (out_dir / "ca.pem").read_bytes()
    code, out, _ = run(capsys, "certs", "--out", str(out_dir), "--client", "alice", "--client", "carol")
    assert code == 0
    assert (out_dir / "ca.pem").read_bytes() == ca_before
    assert load_identity_key(out_dir / "alice.identity") == alice_key
    assert f"kept   {out_dir / 'alice.identity'}" in out
    assert (out_dir / "carol.identity").exists()

    code, out, err = run(capsys, "certs", "--out", str(out_dir), "--client", "../x")
    assert code == 2 and "invalid client name" in err
    code, out, err = run(capsys, "certs", "--out", str(out_dir), "--client", "ca")
    assert code == 2 and "reserved" in err


def test_certs_writes_the_pub_file_register_documents(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """docs/operating.md registers with `--public-key-file pki/bob.pub`: certs writes that file."""
    pki_dir, db = tmp_path / "pki", tmp_path / "secagg.db"
    code, out, err = run(capsys, "certs", "--out", str(pki_dir), "--client", "bob")
    assert code == 0 and err == ""
    pub = pki_dir / "bob.pub"
    assert f"wrote  {pub}" in out and "identity public key for bob" in out
    assert f"secagg register --db DB --client-id bob --public-key-file {pub}" in out
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644 and pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    code, out, err = run(capsys, "register", "--db", str(db), "--client-id", "bob", "--public-key-file", str(pub))
    assert code == 0 and err == ""
    with Store(db) as s:
        assert s.identity("bob") == identity_public_key(load_identity_key(pki_dir / "bob.identity"))
    # the kept identity key still gets its (same) .pub on a second run
    before = pub.read_bytes()
    pub.unlink()
    assert run(capsys, "certs", "--out", str(pki_dir), "--client", "bob")[0] == 0
    assert pub.read_bytes() == before
