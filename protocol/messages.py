"""Protocol messages: plain frozen dataclasses, named for what they carry.

The transport converts them to and from protobuf; the core never sees the wire format.
``wire_size`` estimates payload bytes (keys, ciphertexts, vectors, 4 bytes per index) for
the benchmark's bytes-per-phase figures.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field, fields
from functools import cached_property

import numpy as np


class Mode(enum.Enum):
    SEMI_HONEST = "semi-honest"   # honest-but-curious server, no signatures
    ACTIVE = "active"             # signed keys and the consistency check


class Phase(enum.IntEnum):
    ADVERTISE_KEYS = 0
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    CONSISTENCY_CHECK = 3
    UNMASKING = 4

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class GroupConfig:
    """One secure-aggregation instance: what every member must agree on before it starts.

    The server chooses every field, so a client checks them against its own policy
    (``policy.ClientPolicy``) and binds everything it signs or derives to ``digest``, a hash of
    the whole configuration that includes each member's fresh commitment: nothing signed in one
    round or group is valid in another, and two clients told different configurations derive
    different keys.
    """

    session: bytes              # server randomness, unique per round and group
    members: int                # m; members are indexed 1..m
    threshold: int              # t: shares needed to reconstruct a secret
    dim: int                    # length of the encoded vector, extra coordinates included
    modulus_bits: int = 32      # 32 or 64: arithmetic mod 2^k in the numpy word
    mode: Mode = Mode.ACTIVE
    neighbors: int | None = None   # None: complete graph; else SecAgg+ k-regular graph
    commitments: tuple[bytes, ...] = ()   # seat i-1: SHA-256 commitment to member i's contribution
    member_ids: tuple[str, ...] = ()      # seat i-1: member i's registered client id (the PKI view)
    context: bytes = b""                  # digest of the round's other announced settings
    passes: int = 1                       # P masked inputs after one key agreement (multi-pass rules)

    def __post_init__(self) -> None:
        if len(self.session) < 16:
            raise ValueError("session must be at least 16 bytes")
        if self.members < 2 or self.dim < 1 or self.threshold < 1:  # safe ranges: ClientPolicy
            raise ValueError(f"inconsistent group: members={self.members}, threshold={self.threshold}, dim={self.dim}")
        if self.modulus_bits not in (32, 64):
            raise ValueError(f"modulus_bits must be 32 or 64, got {self.modulus_bits}")
        if self.neighbors is not None and (self.neighbors < 2 or self.neighbors % 2):
            raise ValueError(f"neighbors must be None or an even number >= 2, got {self.neighbors}")
        if self.commitments and (len(self.commitments) != self.members or any(len(c) != 32 for c in self.commitments)):
            raise ValueError(f"commitments must be one 32-byte value per member ({self.members})")
        if self.member_ids and len(self.member_ids) != self.members:
            raise ValueError(f"member_ids must name every member ({self.members}), got {len(self.member_ids)}")
        if isinstance(self.passes, bool) or not isinstance(self.passes, int) or self.passes < 1:
            raise ValueError(f"passes must be an integer >= 1, got {self.passes!r}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.modulus_bits == 32 else np.uint64)

    @property
    def degree(self) -> int:
        """Neighbours per member: m - 1 for the complete graph, else k."""
        return self.members - 1 if self.neighbors is None or self.neighbors >= self.members - 1 else self.neighbors

    @property
    def sparse(self) -> bool:
        return self.degree < self.members - 1

    @property
    def multipass(self) -> bool:
        return self.passes > 1

    def pass_tag(self, pass_index: int) -> int:
        """What seeds of pass ``pass_index`` (1..P) are derived with: 0 in a single-pass round (the
        derivations are then exactly those of a round without passes), else the pass index."""
        if not 1 <= pass_index <= self.passes:
            raise ValueError(f"pass {pass_index} outside 1..{self.passes}")
        return pass_index if self.multipass else 0

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 over a canonical encoding of every field: the binding of signatures, keys, AEAD."""
        h = hashlib.sha256(b"secagg/v1|group-config")
        def put(b: bytes) -> None:
            h.update(len(b).to_bytes(4, "big") + b)
        for b in (self.session, self.context, self.mode.value.encode()):
            put(b)
        for n in (self.members, self.threshold, self.dim, self.modulus_bits, self.neighbors or 0, len(self.commitments)):
            put(n.to_bytes(8, "big"))
        for c in self.commitments:
            put(c)
        for mid in self.member_ids:
            put(mid.encode())
        if self.multipass:   # absent for P = 1, so a single-pass round's digest is unchanged
            put(b"passes" + self.passes.to_bytes(4, "big"))
        return h.digest()


@dataclass(frozen=True)
class AdvertiseKeys:
    index: int
    c_public: bytes                 # X25519, share encryption
    s_public: bytes                 # X25519, pairwise masks
    signature: bytes = b""          # active mode: Ed25519 over keys_message(...)
    identity: bytes = b""           # active mode: the signer's registered Ed25519 public key
    contribution: bytes = b""       # the member's fresh randomness, opening its commitment


@dataclass(frozen=True)
class KeysBroadcast:
    keys: tuple[AdvertiseKeys, ...]  # U1, restricted to the receiver's neighbourhood
    contributions: tuple[bytes, ...] = ()   # SecAgg+: seat i-1's opened contribution, b"" if it sent no keys


@dataclass(frozen=True)
class EncryptedShare:
    sender: int
    receiver: int
    ciphertext: bytes


@dataclass(frozen=True)
class ShareKeys:
    index: int
    shares: tuple[EncryptedShare, ...]   # one per neighbour in U1
    self_mask_commitment: bytes = b""    # SHA-256 binding b_u: lets the server detect bad b-shares
    pass_commitments: tuple[bytes, ...] = ()   # multi-pass: SHA-256 binding each pass's self-mask seed b_u^p


@dataclass(frozen=True)
class SharesDelivery:
    receiver: int
    shares: tuple[EncryptedShare, ...]   # from every neighbour in U2


@dataclass(frozen=True, eq=False)
class PassStart:
    """Multi-pass: the server opens pass ``pass_index`` for ``participants`` with a public value
    (e.g. the current estimate v) from which each client computes its own input."""

    pass_index: int
    participants: frozenset[int]         # who masks this pass (survivors of the last one)
    public: np.ndarray                   # float64, possibly empty

    @property
    def digest(self) -> bytes:
        return public_digest(self.pass_index, self.public)


def public_digest(pass_index: int, public: np.ndarray) -> bytes:
    """SHA-256 of a pass's index and public value: bound into the consistency signature, so
    members shown different values cannot complete the pass together."""
    v = np.ascontiguousarray(public, dtype=np.float64)
    h = hashlib.sha256(b"secagg/v1|pass-public|" + pass_index.to_bytes(4, "big") + v.size.to_bytes(8, "big"))
    h.update(v.astype("<f8", copy=False).tobytes())
    return h.digest()


@dataclass(frozen=True, eq=False)
class MaskedInput:
    index: int
    vector: np.ndarray


@dataclass(frozen=True)
class ConsistencyRequest:
    survivors: frozenset[int]            # U3


@dataclass(frozen=True)
class ConsistencySignature:
    index: int
    signature: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: frozenset[int]            # U3: reveal the self-mask share of these
    dropped: frozenset[int]              # U2 \ U3: reveal the mask-key share of these
    signatures: tuple[ConsistencySignature, ...] = ()   # active mode: U4's signatures of U3
    # multi-pass only (pass >= 1); ``dropped`` then asks for mask-key shares of members that never sent an input
    pass_index: int = 0
    dropped_pairs: frozenset[int] = frozenset()   # dropped this pass after sending an earlier one: this pass's pair seeds
    recover: frozenset[int] = frozenset()         # sent this pass's input but did not sign: shares of the self-mask root


@dataclass(frozen=True)
class UnmaskResponse:
    index: int
    self_mask_shares: tuple[tuple[int, bytes], ...]   # (owner, share of b_owner)
    mask_key_shares: tuple[tuple[int, bytes], ...]    # (owner, share of s_owner's secret key)
    own_seed: bytes = b""                             # multi-pass: this pass's own self-mask seed
    pair_seeds: tuple[tuple[int, bytes], ...] = ()    # multi-pass: (dropped peer, this pass's pair seed with it)


ClientMessage = AdvertiseKeys | ShareKeys | MaskedInput | ConsistencySignature | UnmaskResponse
ServerMessage = KeysBroadcast | SharesDelivery | PassStart | ConsistencyRequest | UnmaskRequest

PHASE_OF: dict[type, Phase] = {
    AdvertiseKeys: Phase.ADVERTISE_KEYS,
    ShareKeys: Phase.SHARE_KEYS,
    MaskedInput: Phase.MASKED_INPUT,
    ConsistencySignature: Phase.CONSISTENCY_CHECK,
    UnmaskResponse: Phase.UNMASKING,
}


@dataclass
class AggregateResult:
    """The server's output for one group: the exact sum of the survivors' encoded inputs."""

    total: np.ndarray                     # unsigned words mod 2^k
    survivors: frozenset[int]             # U3: whose inputs are in the sum
    responders: frozenset[int]            # U5: who helped unmask
    dropped: dict[int, tuple[Phase, str]] = field(default_factory=dict)


def wire_size(msg: object) -> int:
    """Payload bytes of a message: bytes fields, vectors, 4 bytes per integer."""
    if isinstance(msg, (bytes, bytearray)):
        return len(msg)
    if isinstance(msg, np.ndarray):
        return msg.nbytes
    if isinstance(msg, bool):
        return 1
    if isinstance(msg, int):
        return 4
    if isinstance(msg, (tuple, list, frozenset, set)):
        return sum(wire_size(m) for m in msg)
    if hasattr(msg, "__dataclass_fields__"):
        return sum(wire_size(getattr(msg, f.name)) for f in fields(msg))  # type: ignore[arg-type]
    raise TypeError(f"no wire size for {type(msg).__name__}")
