"""Tamper-evident records: model versions and finished rounds form a hash chain signed by a key
kept outside the database.

SQL triggers stop accidents, not someone who can write the file: they can drop a trigger and
rewrite a model together with its SHA-256. So every model version (when appended) and every
round (when it reaches a final outcome) gets a ledger entry in the same transaction::

    content digest = SHA-256(canonical JSON of the whole row)
    entry hash     = SHA-256(DOMAIN || prev hash || seq || kind || ref || content digest)
    signature      = Ed25519(ledger key, entry hash)

The private key lives in a PEM file (``ledger_key``, default ``DB.ledger-key``), never in the
database, and verification takes the public key from that file. Whoever holds only the database
cannot change, reorder, insert or drop an entry in the middle without detection; dropping the
*tail* (entries and their rows) is only caught against a head hash recorded elsewhere
(``expect_head``). Whoever holds the key can rewrite everything: keep it apart.

Pure functions here (encoding, hashing, signing, checking); the Store reads and writes rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "ADOPT_REF",
    "GENESIS",
    "KEY_SUFFIX",
    "KINDS",
    "Entry",
    "LedgerError",
    "LedgerKeyError",
    "LedgerSummary",
    "Row",
    "canonical_json",
    "content_digest",
    "default_key_path",
    "entry_hash",
    "load_private_key",
    "load_public_key",
    "new_key",
    "open_for_server",
    "server_key",
    "sign",
    "verify_chain",
    "verify_ledger",
    "write_key",
]

log = logging.getLogger("secagg.server")

DOMAIN = b"secagg ledger v1\x00"
"""Prefix of every entry hash, so a ledger signature can never be mistaken for another signed message."""
GENESIS = "0" * 64
"""The prev hash of entry 1."""
KINDS = ("model", "round", "adopt")
"""``adopt`` marks rows written before the ledger existed (schema 1), chained at the first start."""
ADOPT_REF = "rows before the ledger"
KEY_SUFFIX = ".ledger-key"


class LedgerError(Exception):
    """The chain does not verify; names the first bad entry (or the row lacking one) and what is wrong."""

    def __init__(self, problem: str, *, seq: int | None = None, kind: str | None = None, ref: str | None = None) -> None:
        self.problem, self.seq, self.kind, self.ref = problem, seq, kind, ref
        if seq is not None:
            where = f"ledger entry {seq} ({kind} {ref})"
        elif kind is not None:
            where = f"{'model version' if kind == 'model' else kind} {ref}"
        else:
            where = "ledger"
        super().__init__(f"{where}: {problem}")


class LedgerKeyError(Exception):
    """A ledger key file that is missing, unreadable or of the wrong kind; the message says which."""


@dataclass(frozen=True)
class Entry:
    """One ledger row as stored (hashes hex, signature raw); ``detail`` only for ``adopt`` entries."""

    seq: int
    kind: str
    ref: str
    content_digest: str
    prev_hash: str
    entry_hash: str
    signature: bytes
    detail: str | None = None


@dataclass(frozen=True)
class Row:
    """What the database holds now for one chained row: its content digest, whether it must be
    chained (rounds only once final), and a specific problem already spotted (params vs digest)."""

    content_digest: str
    final: bool = True
    problem: str | None = None


@dataclass(frozen=True)
class LedgerSummary:
    """A chain that verified: counts by kind and the head hash an operator can record elsewhere."""

    entries: int
    models: int
    rounds: int
    adoptions: int
    head: str


# -- encoding and hashing -----------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):  # a blob where text belongs: still encodable
        return {"bytes": bytes(obj).hex()}
    raise TypeError(f"{type(obj).__name__} cannot be put in a ledger digest")


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default).encode()


def content_digest(kind: str, fields: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the canonical encoding of a whole row, tagged with its kind."""
    return hashlib.sha256(canonical_json({"kind": kind, "row": dict(fields)})).hexdigest()


def _framed(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(4, "big") + data


def entry_hash(prev_hash: str, seq: int, kind: str, ref: str, content: str) -> str:
    """SHA-256 (hex) linking an entry to its predecessor; variable fields are length-prefixed so no
    two different entries share an encoding."""
    h = hashlib.sha256(DOMAIN)
    h.update(bytes.fromhex(prev_hash))
    h.update(seq.to_bytes(8, "big"))
    h.update(_framed(kind))
    h.update(_framed(ref))
    h.update(bytes.fromhex(content))
    return h.hexdigest()


def sign(key: ed25519.Ed25519PrivateKey, entry_hash_hex: str) -> bytes:
    """The Ed25519 signature over an entry hash (its 32 raw bytes)."""
    return key.sign(bytes.fromhex(entry_hash_hex))


# -- key files ----------------------------------------------------------------------------------


def default_key_path(db: str | os.PathLike[str]) -> str:
    """Where the key lives unless ``ledger_key`` says otherwise: next to the database (move it)."""
    return os.fspath(db) + KEY_SUFFIX


def new_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def write_key(path: str | os.PathLike[str], key: ed25519.Ed25519PrivateKey) -> None:
    """Write a PKCS#8 PEM key file, mode 0600, atomically, never replacing an existing file (a
    replaced key would orphan every signature made with the old one)."""
    target = Path(path)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise LedgerKeyError(f"cannot create the ledger key {target}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, target)   # atomic and refuses to overwrite, unlike os.replace
    except FileExistsError:
        raise LedgerKeyError(f"a ledger key already exists at {target}; it is never overwritten") from None
    except OSError as exc:
        raise LedgerKeyError(f"cannot write the ledger key {target}: {exc.strerror}") from None
    finally:
        os.unlink(tmp)


def _read_key_file(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise LedgerKeyError(f"no ledger key at {path}") from None
    except OSError as exc:
        raise LedgerKeyError(f"cannot read the ledger key {path}: {exc.strerror}") from None


def load_private_key(path: str | os.PathLike[str]) -> ed25519.Ed25519PrivateKey:
    """The signing key from a PEM private key file (what the server and `secagg rollback` need)."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        try:
            serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            raise LedgerKeyError(f"{path} is not a PEM Ed25519 private key (an unencrypted PKCS#8 ledger key)") from None
        raise LedgerKeyError(f"{path} holds only a public key; signing ledger entries needs the private ledger key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise LedgerKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 ledger key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> ed25519.Ed25519PublicKey:
    """The verification key from a PEM private *or* public key file, never from the database
    (a key read from the database would be the attacker's)."""
    data = _read_key_file(path)
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        return load_private_key(path).public_key()
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise LedgerKeyError(f"{path} holds a {type(public).__name__}, not an Ed25519 ledger key")
    return public


def server_key(store: Store, path: str | os.PathLike[str]) -> tuple[ed25519.Ed25519PrivateKey, bool]:
    """The server's signing key and whether it was created now.

    A missing key is created only while the ledger is empty (a new database, or the first start
    after the upgrade); once entries exist, a missing key means the ledger cannot be extended or
    checked, so we refuse rather than start a second, unrelated chain.
    """
    if Path(path).exists():
        key = load_private_key(path)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            log.warning("ledger key %s is readable by others (mode %o); chmod 600 it", path, mode)
        return key, False
    entries = store.ledger_size()
    if entries:
        raise LedgerKeyError(
            f"no ledger key at {path}, but the ledger in {store.path} has {entries} entries signed with it; "
            "restore the key file (or point ledger_key at it) before starting"
        )
    key = new_key()
    write_key(path, key)
    log.warning("created ledger key %s: keep it (and a copy) away from the database", path)
    return key, True


# -- verification -------------------------------------------------------------------------------


def _describe(kind: str, ref: str) -> str:
    return f"model version {ref}" if kind == "model" else f"round {ref!r}"


def _entry_problem(entry: Entry, position: int, prev: str, public_key: ed25519.Ed25519PublicKey,
                   rows: Mapping[tuple[str, str], Row], seen: set[tuple[str, str]]) -> str | None:
    """What is wrong with one entry, or None; checks link, hash, signature, then content."""
    if entry.seq != position:
        if entry.seq > position:
            return f"broken link: entry {position} is missing (the chain jumps from {position - 1} to {entry.seq})"
        return f"broken link: expected entry {position} here (entries were reordered or duplicated)"
    if entry.prev_hash != prev:
        return ("broken link: its prev hash is not the genesis hash" if position == 1 else
                f"broken link: its prev hash does not match entry {position - 1}'s hash (entries were removed, inserted or reordered)")
    if entry.kind not in KINDS:
        return f"unknown kind {entry.kind!r}"
    try:
        recomputed = entry_hash(entry.prev_hash, entry.seq, entry.kind, entry.ref, entry.content_digest)
    except ValueError:
        return "malformed hash fields (not hex)"
    if recomputed != entry.entry_hash:
        return "wrong entry hash: its seq, kind, ref or content digest was changed after it was signed"
    try:
        public_key.verify(bytes(entry.signature), bytes.fromhex(entry.entry_hash))
    except (InvalidSignature, ValueError):
        return "bad signature: not made with this ledger key (forged or re-signed entry)"
    if entry.kind == "adopt":
        if hashlib.sha256((entry.detail or "").encode()).hexdigest() != entry.content_digest:
            return "wrong content digest: its adoption note was changed"
        return None
    key = (entry.kind, entry.ref)
    if key in seen:
        return f"a second entry for {_describe(*key)}"
    seen.add(key)
    row = rows.get(key)
    if row is None:
        return f"entry for a row that no longer exists: {_describe(*key)} was deleted"
    if not row.final:
        return f"{_describe(*key)} is recorded as running, but it was signed when it finished"
    if row.content_digest != entry.content_digest:
        detail = f" ({row.problem})" if row.problem else ""
        return f"wrong content digest: {_describe(*key)} was changed after it was signed{detail}"
    return None


def verify_chain(entries: Sequence[Entry], rows: Mapping[tuple[str, str], Row], public_key: ed25519.Ed25519PublicKey,
                 *, expect_head: str | None = None) -> LedgerSummary:
    """Check a chain against the rows it covers; raise LedgerError naming the first bad entry.

    ``rows`` maps (kind, ref) to what the database holds now, in the order to report missing
    entries (models by version, then rounds). ``expect_head`` is a hash recorded earlier: it must
    still be in the chain, which is the only way to notice a deleted tail.
    """
    prev, seen = GENESIS, set()
    counts = dict.fromkeys(KINDS, 0)
    for position, entry in enumerate(entries, start=1):
        problem = _entry_problem(entry, position, prev, public_key, rows, seen)
        if problem:
            raise LedgerError(problem, seq=entry.seq, kind=entry.kind, ref=entry.ref)
        counts[entry.kind] += 1
        prev = entry.entry_hash
    for (kind, ref), row in rows.items():
        if row.final and (kind, ref) not in seen:
            what = "finished round" if kind == "round" else "model version"
            hint = (" (the ledger is empty: rows written before the upgrade are adopted at the server's first start, "
                    "when it creates the ledger key)") if not entries else ""
            raise LedgerError(f"missing entry: this {what} has no ledger entry{hint}", kind=kind, ref=ref)
    if expect_head is not None:
        wanted = expect_head.strip().lower()
        if wanted not in {e.entry_hash for e in entries}:
            raise LedgerError(f"the recorded head {wanted[:16]}... is not in the chain (head is now {prev[:16]}...): "
                              "entries were deleted from its tail or the history was rewritten")
    return LedgerSummary(len(entries), counts["model"], counts["round"], counts["adopt"], prev)


def verify_ledger(store: Store, public_key: ed25519.Ed25519PublicKey, *, expect_head: str | None = None) -> LedgerSummary:
    """Verify the store's chain (one consistent snapshot) with a public key from a key file.

    Raises LedgerError naming the first bad entry; returns counts and the head hash when sound.
    """
    entries, rows = store.ledger_snapshot()
    return verify_chain(entries, rows, public_key, expect_head=expect_head)


def open_for_server(store: Store, key_path: str | os.PathLike[str]) -> LedgerSummary:
    """What the server does before it writes anything: load the key (creating it for an empty
    ledger), adopt rows written before the ledger existed, and verify the whole chain.

    Adoption happens only together with creating the key, so someone who can only write the
    database cannot empty the ledger and have the server re-sign rewritten rows.
    Raises LedgerKeyError or LedgerError; the store signs with the key afterwards.
    """
    key, created = server_key(store, key_path)
    store.use_ledger_key(key)
    if created:
        adopted = store.adopt_unchained()
        if adopted:
            log.warning("adopted %d rows written before the ledger existed into the ledger of %s", adopted, store.path)
    return verify_ledger(store, key.public_key())
