"""The durable record of a secagg server: identities, model versions, rounds and events.

One SQLite file in WAL mode, so the CLI (``secagg rounds``, ``secagg rollback``...) can read and
write it while a server runs. Every write is a single ``BEGIN IMMEDIATE`` transaction, so a crash
never leaves a half-written record and two processes never interleave a read-then-write. Model
versions are append-only, enforced by SQL triggers rather than by convention, and each one carries
the SHA-256 of its bytes, checked on every read: corruption is reported, never silently served.

Triggers only stop accidents, so model versions and finished rounds are also chained into a
signed ledger (see ``ledger.py``) in the same transaction that writes them. Those writes need
the ledger signing key (``Store(path, ledger_key=...)``); reads do not.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from . import ledger

__all__ = [
    "CLIENT_ID_PATTERN",
    "GRPC_STATUS_NAMES",
    "OUTCOMES",
    "ROUND_FIELDS",
    "SCHEMA_VERSION",
    "Event",
    "ModelVersion",
    "ModelVersionInfo",
    "RoundRecord",
    "Store",
    "StoreError",
]

SCHEMA_VERSION = 2
"""1: identities, model versions, rounds, events. 2: adds the ledger (migrated in place)."""
BUSY_TIMEOUT_MS = 5000

CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""Client ids double as file names (``NAME.identity``) and log fields, hence the narrow alphabet."""

OUTCOMES = ("running", "completed", "aborted", "failed")
FINAL_OUTCOMES = ("completed", "aborted", "failed")

# The canonical gRPC status code names; kept here so the store does not import grpc.
GRPC_STATUS_NAMES = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)

_ROUND_JSON_FIELDS = ("survivors", "dropouts", "checks", "rule", "timings", "ring")
_ROUND_SCALAR_FIELDS = ("aggregate_digest", "model_version", "outcome", "error")
ROUND_FIELDS = frozenset(_ROUND_JSON_FIELDS + _ROUND_SCALAR_FIELDS)
"""The fields ``update_round`` / ``finish_round`` accept."""

# Empty value a JSON column decodes to before anything was written to it.
_JSON_EMPTY: dict[str, Any] = {
    "settings": dict,
    "cohort": list,
    "groups": list,
    "survivors": dict,
    "dropouts": list,
    "checks": list,
    "rule": lambda: None,
    "timings": dict,
    "ring": dict,
}

_SCHEMA_V1 = (
    """
    CREATE TABLE identities (
        client_id     TEXT PRIMARY KEY,
        public_key    BLOB NOT NULL CHECK (length(public_key) = 32),
        registered_at TEXT NOT NULL,
        revoked_at    TEXT
    )
    """,
    """
    CREATE TABLE model_versions (
        version    INTEGER PRIMARY KEY CHECK (version >= 1),
        params     BLOB NOT NULL,
        digest     TEXT NOT NULL CHECK (length(digest) = 64),
        dtype      TEXT NOT NULL,
        shape      TEXT NOT NULL,
        created_at TEXT NOT NULL,
        round_id   TEXT,
        reason     TEXT NOT NULL,
        restores   INTEGER REFERENCES model_versions(version)
    )
    """,
    # Versions are numbered 1, 2, 3... with no gaps, whoever inserts them.
    """
    CREATE TRIGGER model_versions_sequential BEFORE INSERT ON model_versions
    WHEN NEW.version IS NULL
      OR NEW.version <> (SELECT COALESCE(MAX(version), 0) + 1 FROM model_versions)
    BEGIN
        SELECT RAISE(ABORT, 'model versions are numbered 1, 2, 3... without gaps');
    END
    """,
    """
    CREATE TRIGGER model_versions_no_update BEFORE UPDATE ON model_versions
    BEGIN
        SELECT RAISE(ABORT, 'model_versions is append-only: roll back by appending a version');
    END
    """,
    """
    CREATE TRIGGER model_versions_no_delete BEFORE DELETE ON model_versions
    BEGIN
        SELECT RAISE(ABORT, 'model_versions is append-only: roll back by appending a version');
    END
    """,
    """
    CREATE TABLE rounds (
        round_id         TEXT PRIMARY KEY,
        started_at       TEXT NOT NULL,
        finished_at      TEXT,
        outcome          TEXT NOT NULL DEFAULT 'running'
                         CHECK (outcome IN ('running', 'completed', 'aborted', 'failed')),
        settings         TEXT NOT NULL,
        cohort           TEXT NOT NULL,
        "groups"         TEXT NOT NULL,
        survivors        TEXT,
        dropouts         TEXT,
        checks           TEXT,
        rule             TEXT,
        aggregate_digest TEXT,
        timings          TEXT,
        model_version    INTEGER REFERENCES model_versions(version),
        error            TEXT
    )
    """,
    """
    CREATE TABLE events (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        at        TEXT NOT NULL,
        round_id  TEXT,
        client_id TEXT,
        kind      TEXT NOT NULL,
        status    TEXT NOT NULL,
        reason    TEXT NOT NULL
    )
    """,
    "CREATE INDEX events_by_round ON events(round_id, id)",
)

# Schema 2: the hash chain over model versions and finished rounds. The triggers stop accidents
# only; tampering by someone who drops them is caught by verification (the signing key is not here).
_SCHEMA_V2 = (
    # the values that fix each group's SecAgg+ ring (opened contributions), so anyone can recheck it
    "ALTER TABLE rounds ADD COLUMN ring TEXT",
    """
    CREATE TABLE ledger (
        seq            INTEGER PRIMARY KEY CHECK (seq >= 1),
        kind           TEXT NOT NULL CHECK (kind IN ('model', 'round', 'adopt')),
        ref            TEXT NOT NULL,
        content_digest TEXT NOT NULL CHECK (length(content_digest) = 64),
        prev_hash      TEXT NOT NULL CHECK (length(prev_hash) = 64),
        entry_hash     TEXT NOT NULL CHECK (length(entry_hash) = 64),
        signature      BLOB NOT NULL CHECK (length(signature) = 64),
        detail         TEXT
    )
    """,
    """
    CREATE TRIGGER ledger_sequential BEFORE INSERT ON ledger
    WHEN NEW.seq IS NULL OR NEW.seq <> (SELECT COALESCE(MAX(seq), 0) + 1 FROM ledger)
    BEGIN
        SELECT RAISE(ABORT, 'ledger entries are numbered 1, 2, 3... without gaps');
    END
    """,
    """
    CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
    BEGIN
        SELECT RAISE(ABORT, 'the ledger is append-only');
    END
    """,
    """
    CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
    BEGIN
        SELECT RAISE(ABORT, 'the ledger is append-only');
    END
    """,
)


class StoreError(Exception):
    """A store failure a user can cause or fix: bad id, unknown version, corrupt or busy file."""


@dataclass(frozen=True)
class ModelVersionInfo:
    """One model version without its parameters, for listings that must stay cheap."""

    version: int
    digest: str
    created_at: str
    round_id: str | None
    reason: str
    restores: int | None
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class ModelVersion:
    """One model version with its parameters (a fresh array per read, safe to mutate)."""

    version: int
    params: np.ndarray
    digest: str
    created_at: str
    round_id: str | None
    reason: str
    restores: int | None


@dataclass(frozen=True)
class RoundRecord:
    """Everything recorded about one round; JSON fields come back decoded.

    JSON turns dict keys into strings, so ``survivors[phase]`` is keyed by ``str(group)``.
    """

    round_id: str
    started_at: str
    finished_at: str | None
    outcome: str
    settings: dict[str, Any]
    cohort: list[str]
    groups: list[list[str]]
    survivors: dict[str, dict[str, list[str]]]
    dropouts: list[dict[str, Any]]
    checks: list[dict[str, Any]]
    rule: dict[str, Any] | None
    aggregate_digest: str | None
    timings: dict[str, float]
    model_version: int | None
    error: str | None
    ring: dict[str, Any] = dataclasses.field(default_factory=dict)   # group -> opened contributions (hex, "" if none)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, ready for ``json.dumps``."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Event:
    """Bad input or a drop, recorded as it happened (with the gRPC status that was sent)."""

    id: int
    at: str
    round_id: str | None
    client_id: str | None
    kind: str
    status: str
    reason: str


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _check_client_id(client_id: object) -> str:
    if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise StoreError(
            f"invalid client id {client_id!r}: use 1-64 characters from A-Z a-z 0-9 . _ -"
        )
    return client_id


def _check_round_id(round_id: object) -> str:
    if not isinstance(round_id, str) or not round_id or len(round_id) > 200:
        raise StoreError(f"invalid round id {round_id!r}: use a non-empty string of at most 200 chars")
    if any(ord(ch) < 32 for ch in round_id):
        raise StoreError(f"invalid round id {round_id!r}: control characters are not allowed")
    return round_id


def _check_reason(reason: object) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise StoreError("a model version needs a reason: say why it is being added (e.g. --reason)")
    return reason


def _json_default(obj: Any) -> Any:
    """Let numpy scalars, arrays, sets, enums, paths and dataclasses go into round records."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _encode_json(name: str, value: Any) -> str:
    try:
        return json.dumps(value, default=_json_default, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"round field {name!r} cannot be stored as JSON: {exc}") from None


def _decode_json(name: str, text: str | None) -> Any:
    if text is None:
        return _JSON_EMPTY[name]()
    return json.loads(text)


def _encode_params(params: np.ndarray) -> bytes:
    buf = io.BytesIO()
    try:
        np.save(buf, params, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"model parameters must be a numeric array: {exc}") from None
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_or_raw(text: Any) -> Any:
    """A JSON column decoded for the ledger digest (NULL stays None; unparseable text stays text)."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return {"unparseable": text}


_MODEL_LEDGER_COLUMNS = "version, params, digest, dtype, shape, created_at, round_id, reason, restores"
_ROUND_LEDGER_JSON = ("settings", "cohort", "groups", *_ROUND_JSON_FIELDS)


def _model_row(row: Sequence[Any]) -> tuple[str, ledger.Row]:
    """A model_versions row (``_MODEL_LEDGER_COLUMNS``) as (ref, what the ledger digest covers):
    every column, with the params as the SHA-256 of the bytes actually stored."""
    version, blob, digest, dtype, shape, created_at, round_id, reason, restores = row
    params_sha256 = _sha256(bytes(blob)) if isinstance(blob, (bytes, memoryview)) else _sha256(str(blob).encode())
    fields = {
        "version": version, "params_sha256": params_sha256, "digest": digest, "dtype": dtype,
        "shape": _json_or_raw(shape), "created_at": created_at, "round_id": round_id, "reason": reason,
        "restores": restores,
    }
    problem = None if params_sha256 == digest else "its params no longer hash to its digest column"
    return str(version), ledger.Row(ledger.content_digest("model", fields), True, problem)


def _round_row(names: Sequence[str], row: Sequence[Any]) -> tuple[str, ledger.Row]:
    """A rounds row as (ref, what the ledger digest covers): the full record, JSON decoded."""
    fields = {name: _json_or_raw(v) if name in _ROUND_LEDGER_JSON else v for name, v in zip(names, row)}
    final = fields["outcome"] != "running" or fields["finished_at"] is not None
    return str(fields["round_id"]), ledger.Row(ledger.content_digest("round", fields), final)


class Store:
    """The SQLite record; thread-safe (one connection behind a lock), several processes may share it.

    ``Store(path)`` creates the file and schema if new (and upgrades a schema-1 file). Use as a
    context manager or ``close()``. ``ledger_key`` signs the ledger entries that appending a model
    version, rolling back and finishing a round write; without it those raise StoreError, so an
    unsigned write cannot slip in, while read-only use (the CLI listings) needs no key.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, ledger_key: ed25519.Ed25519PrivateKey | None = None
    ) -> None:
        self.path = os.fspath(path)
        self._ledger_key = ledger_key
        self._lock = threading.Lock()
        self._closed = False
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves (see _write).
            self._conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot open database at {self.path}: {exc}; check that its directory exists "
                "and is writable"
            ) from None
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.execute("PRAGMA journal_mode = WAL").fetchone()
            self._init_schema()
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(f"{self.path} is not a usable secagg database: {exc}") from None
        except BaseException:
            self._conn.close()
            raise

    # -- plumbing -------------------------------------------------------------------------

    def _init_schema(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        self._check_schema_version(version)
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have won
            if version == SCHEMA_VERSION:
                return
            self._check_schema_version(version)
            if version == 0:
                tables = conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                ).fetchall()
                if tables:
                    raise StoreError(
                        f"{self.path} is an SQLite file but not a secagg store (it has tables "
                        f"{', '.join(t[0] for t in tables)}); pick another --db path"
                    )
                for statement in _SCHEMA_V1:
                    conn.execute(statement)
            # 1 -> 2: an empty ledger; the server adopts the existing rows at its first start.
            for statement in _SCHEMA_V2:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_schema_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this secagg supports "
                f"({SCHEMA_VERSION}); upgrade secagg to open it"
            )
        if version not in (0, 1):
            raise StoreError(
                f"{self.path} has schema version {version}, which this secagg cannot migrate; "
                f"export what you need and start a new database"
            )

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"the store at {self.path} is closed")
        return self._conn

    def _translate(self, exc: sqlite3.Error) -> StoreError:
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return StoreError(
                f"database at {self.path} stayed locked by another process for "
                f"{BUSY_TIMEOUT_MS // 1000} s; retry when it is idle"
            )
        return StoreError(f"database error at {self.path}: {exc}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front so the reads
        inside it cannot go stale behind another process's write."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._translate(exc) from None
            try:
                yield conn
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._translate(exc) from exc
                raise
            else:
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise self._translate(exc) from None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc

    def close(self) -> None:
        """Close the connection; further calls raise StoreError."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.path!r})"

    # -- ledger ---------------------------------------------------------------------------

    def use_ledger_key(self, key: ed25519.Ed25519PrivateKey) -> None:
        """Sign chained writes with ``key`` from now on (the server loads it after opening)."""
        self._ledger_key = key

    def _signing_key(self, what: str) -> ed25519.Ed25519PrivateKey:
        if self._ledger_key is None:
            raise StoreError(
                f"{what} is signed into the ledger and needs the ledger key: open the store with "
                f"Store({self.path!r}, ledger_key=...) (CLI: --key, default {ledger.default_key_path(self.path)})"
            )
        return self._ledger_key

    def _chain(
        self, conn: sqlite3.Connection, kind: str, ref: str, content: str, detail: str | None = None
    ) -> None:
        """Append one signed entry inside the caller's write transaction (so row and entry land together)."""
        key = self._signing_key(f"a {kind} ledger entry")
        head = conn.execute("SELECT seq, entry_hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (1, ledger.GENESIS) if head is None else (int(head[0]) + 1, head[1])
        entry_hash = ledger.entry_hash(prev, seq, kind, ref, content)
        conn.execute(
            "INSERT INTO ledger (seq, kind, ref, content_digest, prev_hash, entry_hash, signature, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, kind, ref, content, prev, entry_hash, ledger.sign(key, entry_hash), detail),
        )

    def _chain_model(self, conn: sqlite3.Connection, version: int) -> None:
        row = conn.execute(
            f"SELECT {_MODEL_LEDGER_COLUMNS} FROM model_versions WHERE version = ?", (version,)
        ).fetchone()
        ref, content = _model_row(row)
        self._chain(conn, "model", ref, content.content_digest)

    def _chain_round(self, conn: sqlite3.Connection, round_id: str) -> None:
        cursor = conn.execute(f"SELECT {self._ROUND_COLUMNS} FROM rounds WHERE round_id = ?", (round_id,))
        ref, content = _round_row([d[0] for d in cursor.description], cursor.fetchone())
        self._chain(conn, "round", ref, content.content_digest)

    def ledger_size(self) -> int:
        """Number of ledger entries."""
        with self._read() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])

    def ledger_entries(self) -> list[ledger.Entry]:
        """All ledger entries, by seq."""
        with self._read() as conn:
            return self._ledger_entries(conn)

    @staticmethod
    def _ledger_entries(conn: sqlite3.Connection) -> list[ledger.Entry]:
        rows = conn.execute(
            "SELECT seq, kind, ref, content_digest, prev_hash, entry_hash, signature, detail "
            "FROM ledger ORDER BY seq"
        ).fetchall()
        return [ledger.Entry(*row) for row in rows]

    def ledger_snapshot(self) -> tuple[list[ledger.Entry], dict[tuple[str, str], ledger.Row]]:
        """The entries and what every chained row holds now, read in one transaction so a
        concurrent write cannot show up as a row without its entry."""
        with self._read() as conn:
            conn.execute("BEGIN")
            try:
                entries = self._ledger_entries(conn)
                rows: dict[tuple[str, str], ledger.Row] = {}
                for row in conn.execute(f"SELECT {_MODEL_LEDGER_COLUMNS} FROM model_versions ORDER BY version"):
                    ref, content = _model_row(row)
                    rows["model", ref] = content
                cursor = conn.execute(f"SELECT {self._ROUND_COLUMNS} FROM rounds ORDER BY rowid")
                names = [d[0] for d in cursor.description]
                for row in cursor:
                    ref, content = _round_row(names, row)
                    rows["round", ref] = content
            finally:
                conn.execute("COMMIT")
        return entries, rows

    def adopt_unchained(self) -> int:
        """Chain the rows written before the ledger existed (a schema-1 database), behind one
        ``adopt`` entry listing them; returns how many rows were adopted (0: nothing to do).

        Only for an empty ledger: rows missing from a non-empty ledger are tampering, not history.
        """
        self._signing_key("adopting rows written before the ledger")
        with self._write() as conn:
            if conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0]:
                raise StoreError(f"the ledger in {self.path} is not empty: only an empty ledger adopts rows")
            versions = [int(v) for (v,) in conn.execute("SELECT version FROM model_versions ORDER BY version")]
            rounds = [rid for (rid,) in conn.execute(
                "SELECT round_id FROM rounds WHERE outcome <> 'running' OR finished_at IS NOT NULL ORDER BY rowid"
            )]
            if not versions and not rounds:
                return 0
            detail = ledger.canonical_json(
                {"adopted_at": _now(), "models": versions, "rounds": rounds,
                 "why": "written before this database had a ledger (schema 1)"}
            ).decode()
            self._chain(conn, "adopt", ledger.ADOPT_REF, _sha256(detail.encode()), detail)
            for version in versions:
                self._chain_model(conn, version)
            for round_id in rounds:
                self._chain_round(conn, round_id)
        return len(versions) + len(rounds)

    # -- identities -----------------------------------------------------------------------

    def register_identity(self, client_id: str, public_key: bytes, *, replace: bool = False) -> None:
        """Record a client's Ed25519 identity key: no registration, no vote (sybil defence).

        Re-registering the same key is a no-op; a different key, or a revoked id, needs
        ``replace=True``. Each change is also recorded as an event (kind registered/replaced).
        """
        _check_client_id(client_id)
        if not isinstance(public_key, (bytes, bytearray, memoryview)):
            raise StoreError(f"public key for {client_id!r} must be bytes")
        key = bytes(public_key)
        if len(key) != 32:
            raise StoreError(
                f"public key for {client_id!r} has {len(key)} bytes; an Ed25519 public key is "
                "32 raw bytes"
            )
        now = _now()
        with self._write() as conn:
            other = conn.execute(
                "SELECT client_id FROM identities WHERE public_key = ? AND client_id != ? AND revoked_at IS NULL",
                (key, client_id),
            ).fetchone()
            if other is not None:  # one key, two ids would be one party with two votes
                raise StoreError(
                    f"this public key is already registered as {other[0]!r}; each identity needs its own key "
                    "(one key under two ids would give one party two votes)"
                )
            row = conn.execute(
                "SELECT public_key, revoked_at FROM identities WHERE client_id = ?", (client_id,)
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO identities (client_id, public_key, registered_at) VALUES (?, ?, ?)",
                    (client_id, key, now),
                )
                kind = "registered"
            else:
                old_key, revoked_at = bytes(row[0]), row[1]
                if old_key == key and revoked_at is None:
                    return
                if not replace:
                    if revoked_at is not None:
                        raise StoreError(
                            f"client {client_id!r} was revoked at {revoked_at}; register it with "
                            "replace=True (CLI: --replace) to reinstate it"
                        )
                    raise StoreError(
                        f"client {client_id!r} is already registered with a different public key; "
                        "pass replace=True (CLI: --replace) to replace it"
                    )
                conn.execute(
                    "UPDATE identities SET public_key = ?, registered_at = ?, revoked_at = NULL "
                    "WHERE client_id = ?",
                    (key, now, client_id),
                )
                kind = "replaced"
            conn.execute(
                "INSERT INTO events (at, round_id, client_id, kind, status, reason) "
                "VALUES (?, NULL, ?, ?, 'OK', ?)",
                (now, client_id, kind, f"Ed25519 public key {key.hex()}"),
            )

    def identity(self, client_id: str) -> bytes | None:
        """The active public key of ``client_id``; None if unknown or revoked."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT public_key FROM identities WHERE client_id = ? AND revoked_at IS NULL",
                (client_id,),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def identities(self) -> dict[str, bytes]:
        """All active (not revoked) identities, by client id."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT client_id, public_key FROM identities WHERE revoked_at IS NULL "
                "ORDER BY client_id"
            ).fetchall()
        return {cid: bytes(key) for cid, key in rows}

    def revoke_identity(self, client_id: str, reason: str = "revoked") -> None:
        """Stop accepting ``client_id``; the row stays for the record (revoking twice is a no-op)."""
        now = _now()
        with self._write() as conn:
            row = conn.execute(
                "SELECT revoked_at FROM identities WHERE client_id = ?", (client_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"cannot revoke {client_id!r}: no such registered client")
            if row[0] is not None:
                return
            conn.execute(
                "UPDATE identities SET revoked_at = ? WHERE client_id = ?", (now, client_id)
            )
            conn.execute(
                "INSERT INTO events (at, round_id, client_id, kind, status, reason) "
                "VALUES (?, NULL, ?, 'revoked', 'OK', ?)",
                (now, client_id, reason),
            )

    # -- model versions -------------------------------------------------------------------

    def append_model(
        self,
        params: np.ndarray,
        *,
        round_id: str | None,
        reason: str,
        restores: int | None = None,
    ) -> int:
        """Append a model version (never overwrite one), signed into the ledger; returns its number (1, 2, ...)."""
        self._signing_key("appending a model version")
        arr = np.asarray(params)
        if arr.dtype.hasobject:
            raise ValueError("model parameters must be a numeric array, not an object array")
        _check_reason(reason)
        if round_id is not None:
            _check_round_id(round_id)
        blob = _encode_params(arr)
        with self._write() as conn:
            if restores is not None:
                self._require_version(conn, restores)
            return self._insert_model(
                conn, blob, _sha256(blob), str(arr.dtype), arr.shape, round_id, reason, restores
            )

    def _insert_model(
        self,
        conn: sqlite3.Connection,
        blob: bytes,
        digest: str,
        dtype: str,
        shape: tuple[int, ...],
        round_id: str | None,
        reason: str,
        restores: int | None,
    ) -> int:
        version = conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM model_versions").fetchone()[0]
        conn.execute(
            "INSERT INTO model_versions "
            "(version, params, digest, dtype, shape, created_at, round_id, reason, restores) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (version, blob, digest, dtype, json.dumps(list(shape)), _now(), round_id, reason, restores),
        )
        self._chain_model(conn, int(version))
        return int(version)

    def _require_version(self, conn: sqlite3.Connection, version: int) -> None:
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
            raise StoreError(f"model version must be an integer, got {version!r}")
        version = int(version)
        if conn.execute("SELECT 1 FROM model_versions WHERE version = ?", (version,)).fetchone():
            return
        latest = conn.execute("SELECT MAX(version) FROM model_versions").fetchone()[0]
        if latest is None:
            raise StoreError(f"no model version {version}: {self.path} holds no model versions yet")
        raise StoreError(f"no model version {version} in {self.path} (versions are 1..{latest})")

    def latest_version(self) -> int | None:
        """Number of the newest model version, None when there is none yet."""
        with self._read() as conn:
            latest = conn.execute("SELECT MAX(version) FROM model_versions").fetchone()[0]
        return None if latest is None else int(latest)

    _MODEL_COLUMNS = "version, params, digest, created_at, round_id, reason, restores"

    def model(self, version: int | None = None) -> ModelVersion:
        """A model version (the latest when ``version`` is None), its digest verified."""
        with self._read() as conn:
            if version is None:
                row = conn.execute(
                    f"SELECT {self._MODEL_COLUMNS} FROM model_versions "
                    "ORDER BY version DESC LIMIT 1"
                ).fetchone()
                if row is None:
                    raise StoreError(f"{self.path} holds no model versions yet")
            else:
                row = conn.execute(
                    f"SELECT {self._MODEL_COLUMNS} FROM model_versions WHERE version = ?",
                    (int(version),),
                ).fetchone()
                if row is None:
                    self._require_version(conn, version)  # raises with the valid range
                    raise StoreError(f"no model version {version!r} in {self.path}")
        number, blob, digest, created_at, round_id, reason, restores = row
        blob = bytes(blob)
        return ModelVersion(
            version=int(number),
            params=self._decode_params(int(number), blob, digest),
            digest=digest,
            created_at=created_at,
            round_id=round_id,
            reason=reason,
            restores=restores,
        )

    def _verify_digest(self, version: int, blob: bytes, digest: str) -> None:
        actual = _sha256(blob)
        if actual != digest:
            raise StoreError(
                f"model version {version} in {self.path} is corrupt: its bytes hash to "
                f"{actual[:12]}... but the record says {str(digest)[:12]}...; roll back to a good "
                "version (`secagg rollback`) and investigate the file"
            )

    def _decode_params(self, version: int, blob: bytes, digest: str) -> np.ndarray:
        self._verify_digest(version, blob, digest)
        try:
            return np.load(io.BytesIO(blob), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise StoreError(
                f"model version {version} in {self.path} is not a readable array: {exc}"
            ) from None

    def models(self) -> list[ModelVersionInfo]:
        """All model versions, oldest first, without loading their parameters."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT version, digest, created_at, round_id, reason, restores, dtype, shape "
                "FROM model_versions ORDER BY version"
            ).fetchall()
        return [
            ModelVersionInfo(
                version=int(v),
                digest=d,
                created_at=c,
                round_id=r,
                reason=why,
                restores=rest,
                dtype=dt,
                shape=tuple(json.loads(shape)),
            )
            for v, d, c, r, why, rest, dt, shape in rows
        ]

    def rollback(self, to: int, reason: str) -> int:
        """Append a new version that copies version ``to`` (history is never rewritten; the new
        version is chained like any other)."""
        self._signing_key("rolling back (appending a model version)")
        _check_reason(reason)
        with self._write() as conn:
            self._require_version(conn, to)
            blob, digest, dtype, shape = conn.execute(
                "SELECT params, digest, dtype, shape FROM model_versions WHERE version = ?", (to,)
            ).fetchone()
            blob = bytes(blob)
            self._verify_digest(to, blob, digest)  # never propagate a corrupt version
            return self._insert_model(
                conn, blob, digest, dtype, tuple(json.loads(shape)), None, reason, to
            )

    # -- rounds ---------------------------------------------------------------------------

    def begin_round(
        self,
        round_id: str,
        settings: Mapping[str, Any],
        cohort: Sequence[str],
        groups: Sequence[Sequence[str]],
    ) -> None:
        """Open the record of a round (outcome "running"); round ids are unique forever."""
        _check_round_id(round_id)
        cohort_list = [str(c) for c in cohort]
        if len(set(cohort_list)) != len(cohort_list):
            raise ValueError(f"round {round_id!r}: the cohort lists a client more than once")
        members = set(cohort_list)
        placed: set[str] = set()
        groups_list = []
        for group in groups:
            group_list = [str(c) for c in group]
            for member in group_list:
                if member not in members:
                    raise ValueError(f"round {round_id!r}: group member {member!r} is not in the cohort")
                if member in placed:
                    raise ValueError(f"round {round_id!r}: client {member!r} is in more than one group")
                placed.add(member)
            groups_list.append(group_list)
        values = (
            _encode_json("settings", dict(settings)),
            _encode_json("cohort", cohort_list),
            _encode_json("groups", groups_list),
        )
        with self._write() as conn:
            row = conn.execute(
                "SELECT started_at FROM rounds WHERE round_id = ?", (round_id,)
            ).fetchone()
            if row is not None:
                raise StoreError(
                    f"round {round_id!r} already exists (started {row[0]}); round ids must be unique"
                )
            conn.execute(
                'INSERT INTO rounds (round_id, started_at, outcome, settings, cohort, "groups") '
                "VALUES (?, ?, 'running', ?, ?, ?)",
                (round_id, _now(), *values),
            )

    def _round_columns(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(fields) - ROUND_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown round field(s) {', '.join(unknown)}; known: {', '.join(sorted(ROUND_FIELDS))}"
            )
        columns: dict[str, Any] = {}
        for name, value in fields.items():
            if name in _ROUND_JSON_FIELDS:
                columns[name] = None if value is None else _encode_json(name, value)
            elif name == "outcome":
                if value not in OUTCOMES:
                    raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {value!r}")
                columns[name] = value
            elif name == "model_version":
                if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
                    raise ValueError(f"model_version must be an int, got {value!r}")
                columns[name] = None if value is None else int(value)
            else:  # aggregate_digest, error
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{name} must be a string, got {type(value).__name__}")
                columns[name] = value
        return columns

    def _set_round(self, round_id: str, columns: dict[str, Any], *, chain: bool = False) -> None:
        with self._write() as conn:
            row = conn.execute(
                "SELECT finished_at, outcome FROM rounds WHERE round_id = ?", (round_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"no round {round_id!r} in {self.path}; begin_round() it first")
            if row[0] is not None:
                raise StoreError(
                    f"round {round_id!r} already finished ({row[1]}, {row[0]}); its record is final"
                )
            if columns.get("model_version") is not None:
                self._require_version(conn, columns["model_version"])
            if columns:
                assignments = ", ".join(f'"{name}" = ?' for name in columns)
                conn.execute(
                    f"UPDATE rounds SET {assignments} WHERE round_id = ?",
                    (*columns.values(), round_id),
                )
            if chain:
                self._chain_round(conn, round_id)

    def update_round(self, round_id: str, **fields: Any) -> None:
        """Set fields of a running round (each call replaces the given fields, one transaction)."""
        columns = self._round_columns(fields)
        if columns.get("outcome", "running") != "running":
            raise ValueError("a round reaches a final outcome only through finish_round(), which signs it into the ledger")
        self._set_round(round_id, columns)

    def finish_round(
        self, round_id: str, outcome: str, *, error: str | None = None, **fields: Any
    ) -> None:
        """Close a round with its outcome and last fields in one transaction, signing the final
        record into the ledger; it is final after."""
        self._signing_key("finishing a round")
        if outcome not in FINAL_OUTCOMES:
            raise ValueError(
                f"a round finishes as one of {', '.join(FINAL_OUTCOMES)}, got {outcome!r}"
            )
        if "outcome" in fields:
            raise ValueError("pass the outcome once, as finish_round's second argument")
        if error is not None:
            fields["error"] = error
        columns = self._round_columns({**fields, "outcome": outcome})
        columns["finished_at"] = _now()
        self._set_round(round_id, columns, chain=True)

    _ROUND_COLUMNS = (
        'round_id, started_at, finished_at, outcome, settings, cohort, "groups", survivors, '
        "dropouts, checks, rule, aggregate_digest, timings, model_version, error, ring"
    )

    @staticmethod
    def _round_from_row(row: Sequence[Any]) -> RoundRecord:
        (rid, started, finished, outcome, settings, cohort, groups, survivors, dropouts, checks,
         rule, digest, timings, model_version, error, ring) = row
        return RoundRecord(
            round_id=rid,
            started_at=started,
            finished_at=finished,
            outcome=outcome,
            settings=_decode_json("settings", settings),
            cohort=_decode_json("cohort", cohort),
            groups=_decode_json("groups", groups),
            survivors=_decode_json("survivors", survivors),
            dropouts=_decode_json("dropouts", dropouts),
            checks=_decode_json("checks", checks),
            rule=_decode_json("rule", rule),
            aggregate_digest=digest,
            timings=_decode_json("timings", timings),
            model_version=model_version,
            error=error,
            ring=_decode_json("ring", ring),
        )

    def round(self, round_id: str) -> RoundRecord:
        """The full record of one round."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {self._ROUND_COLUMNS} FROM rounds WHERE round_id = ?", (round_id,)
            ).fetchone()
        if row is None:
            raise StoreError(f"no round {round_id!r} in {self.path}")
        return self._round_from_row(row)

    def rounds(self, limit: int = 50) -> list[RoundRecord]:
        """The most recent rounds, newest first."""
        if limit < 1:
            raise StoreError(f"limit must be at least 1, got {limit}")
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {self._ROUND_COLUMNS} FROM rounds ORDER BY rowid DESC LIMIT ?", (limit,)
            ).fetchall()
        return [self._round_from_row(row) for row in rows]

    # -- events ---------------------------------------------------------------------------

    def record_event(
        self,
        round_id: str | None,
        client_id: str | None,
        kind: str,
        status: str,
        reason: str,
    ) -> None:
        """Record bad input or a drop as it happens, with the gRPC status name sent back.

        Ids are stored as given (a rejected message may carry an unknown or malformed one).
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError("event kind must be a non-empty string such as 'rejected' or 'dropped'")
        if status not in GRPC_STATUS_NAMES:
            raise ValueError(f"event status must be a gRPC status name such as INVALID_ARGUMENT, got {status!r}")
        with self._write() as conn:
            conn.execute(
                "INSERT INTO events (at, round_id, client_id, kind, status, reason) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (_now(), round_id, client_id, kind, status, str(reason)),
            )

    def events(
        self,
        round_id: str | None = None,
        *,
        client_id: str | None = None,
        kind: str | None = None,
    ) -> list[Event]:
        """Recorded events in order, optionally only those of one round / client / kind."""
        clauses, params = [], []
        for column, value in (("round_id", round_id), ("client_id", client_id), ("kind", kind)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT id, at, round_id, client_id, kind, status, reason FROM events {where} "
                "ORDER BY id",
                params,
            ).fetchall()
        return [Event(*row) for row in rows]
