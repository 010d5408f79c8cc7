"""Protobuf <-> protocol dataclasses.  No protocol logic: shapes and types only.

Every ``from_pb`` raises ``WireError`` (INVALID_ARGUMENT) for a message that does not parse
into a well-formed core message; semantic checks are the state machines' job.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from secagg.protocol import messages as m
from secagg.protocol.encoding import EncodingParams
from secagg.v1 import secagg_pb2 as pb

MODE_TO_PB = {m.Mode.SEMI_HONEST: pb.MODE_SEMI_HONEST, m.Mode.ACTIVE: pb.MODE_ACTIVE}
MODE_FROM_PB = {v: k for k, v in MODE_TO_PB.items()}
MAX_INDEX = 1 << 20


class WireError(ValueError):
    """A message that cannot be turned into a protocol message."""


def _idx(i: int) -> int:
    if not 1 <= i <= MAX_INDEX:
        raise WireError(f"index {i} out of range")
    return int(i)


# ---- client -> server ----------------------------------------------------------------------
def advertise_to_pb(msg: m.AdvertiseKeys) -> pb.ClientMessage:
    return pb.ClientMessage(advertise_keys=pb.AdvertiseKeys(c_public=msg.c_public, s_public=msg.s_public, signature=msg.signature,
                                                            contribution=msg.contribution))


def advertise_from_pb(index: int, body: pb.AdvertiseKeys, identity: bytes) -> m.AdvertiseKeys:
    """``identity`` is the registered key of the authenticated stream, never the client's claim."""
    return m.AdvertiseKeys(index, bytes(body.c_public), bytes(body.s_public), bytes(body.signature), identity, bytes(body.contribution))


def share_keys_to_pb(msg: m.ShareKeys) -> pb.ClientMessage:
    return pb.ClientMessage(share_keys=pb.ShareKeys(shares=[_share_pb(s) for s in msg.shares],
                                                    self_mask_commitment=msg.self_mask_commitment))


def _share_pb(s: m.EncryptedShare) -> pb.EncryptedShare:
    return pb.EncryptedShare(sender=s.sender, receiver=s.receiver, ciphertext=s.ciphertext)


def _share_from(s: pb.EncryptedShare) -> m.EncryptedShare:
    return m.EncryptedShare(_idx(s.sender), _idx(s.receiver), bytes(s.ciphertext))


def share_keys_from_pb(index: int, body: pb.ShareKeys) -> m.ShareKeys:
    return m.ShareKeys(index, tuple(_share_from(s) for s in body.shares), bytes(body.self_mask_commitment))


def consistency_signature_to_pb(msg: m.ConsistencySignature) -> pb.ClientMessage:
    return pb.ClientMessage(consistency_signature=pb.ConsistencySignature(signature=msg.signature))


def consistency_signature_from_pb(index: int, body: pb.ConsistencySignature) -> m.ConsistencySignature:
    return m.ConsistencySignature(index, bytes(body.signature))


def unmask_response_to_pb(msg: m.UnmaskResponse) -> pb.ClientMessage:
    return pb.ClientMessage(unmask_response=pb.UnmaskResponse(
        self_mask_shares=[pb.IndexedShare(owner=o, share=s) for o, s in msg.self_mask_shares],
        mask_key_shares=[pb.IndexedShare(owner=o, share=s) for o, s in msg.mask_key_shares],
    ))


def unmask_response_from_pb(index: int, body: pb.UnmaskResponse) -> m.UnmaskResponse:
    return m.UnmaskResponse(
        index,
        tuple((_idx(s.owner), bytes(s.share)) for s in body.self_mask_shares),
        tuple((_idx(s.owner), bytes(s.share)) for s in body.mask_key_shares),
    )


# ---- server -> client ----------------------------------------------------------------------
def keys_broadcast_to_pb(msg: m.KeysBroadcast) -> pb.ServerMessage:
    return pb.ServerMessage(keys_broadcast=pb.KeysBroadcast(keys=[
        pb.AdvertisedKeys(index=k.index, c_public=k.c_public, s_public=k.s_public, signature=k.signature, identity=k.identity)
        for k in msg.keys
    ], contributions=list(msg.contributions)))


def keys_broadcast_from_pb(body: pb.KeysBroadcast) -> m.KeysBroadcast:
    return m.KeysBroadcast(tuple(
        m.AdvertiseKeys(_idx(k.index), bytes(k.c_public), bytes(k.s_public), bytes(k.signature), bytes(k.identity)) for k in body.keys
    ), tuple(bytes(c) for c in body.contributions))


def shares_delivery_to_pb(msg: m.SharesDelivery) -> pb.ServerMessage:
    return pb.ServerMessage(shares_delivery=pb.SharesDelivery(shares=[_share_pb(s) for s in msg.shares]))


def shares_delivery_from_pb(receiver: int, body: pb.SharesDelivery) -> m.SharesDelivery:
    return m.SharesDelivery(receiver, tuple(_share_from(s) for s in body.shares))


def consistency_request_to_pb(msg: m.ConsistencyRequest) -> pb.ServerMessage:
    return pb.ServerMessage(consistency_request=pb.ConsistencyRequest(survivors=sorted(msg.survivors)))


def consistency_request_from_pb(body: pb.ConsistencyRequest) -> m.ConsistencyRequest:
    return m.ConsistencyRequest(frozenset(_idx(i) for i in body.survivors))


def unmask_request_to_pb(msg: m.UnmaskRequest) -> pb.ServerMessage:
    return pb.ServerMessage(unmask_request=pb.UnmaskRequest(
        survivors=sorted(msg.survivors), dropped=sorted(msg.dropped),
        signatures=[pb.IndexedSignature(index=s.index, signature=s.signature) for s in msg.signatures],
    ))


def unmask_request_from_pb(body: pb.UnmaskRequest) -> m.UnmaskRequest:
    return m.UnmaskRequest(
        frozenset(_idx(i) for i in body.survivors),
        frozenset(_idx(i) for i in body.dropped),
        tuple(m.ConsistencySignature(_idx(s.index), bytes(s.signature)) for s in body.signatures),
    )


def server_message_to_pb(msg: m.ServerMessage) -> pb.ServerMessage:
    if isinstance(msg, m.KeysBroadcast):
        return keys_broadcast_to_pb(msg)
    if isinstance(msg, m.SharesDelivery):
        return shares_delivery_to_pb(msg)
    if isinstance(msg, m.ConsistencyRequest):
        return consistency_request_to_pb(msg)
    if isinstance(msg, m.UnmaskRequest):
        return unmask_request_to_pb(msg)
    raise TypeError(f"not a server message: {type(msg).__name__}")


# ---- round configuration -------------------------------------------------------------------
def round_context(rc: pb.RoundConfig) -> bytes:
    """Digest of the round settings outside GroupConfig (round, group, encoding, model, chunking, epoch):
    part of ``GroupConfig.digest``, so members told different settings cannot complete together."""
    import hashlib

    e = rc.encoding
    fields = (rc.round_id, rc.group, repr(float(e.clip_norm)), repr(float(e.clip_value)), e.precision_bits,
              rc.model_version, rc.chunk_words, rc.round_number, rc.epoch, rc.epoch_rounds, rc.grouping)
    return hashlib.sha256("|".join(["secagg/v1 round-context", *map(str, fields)]).encode()).digest()


def group_config_from_pb(rc: pb.RoundConfig) -> m.GroupConfig:
    """Shape checks only; ``ClientPolicy.check`` decides whether the values are acceptable."""
    if rc.mode not in MODE_FROM_PB:
        raise WireError("round configuration has no mode")
    if rc.modulus_bits not in (32, 64):
        raise WireError(f"modulus_bits must be 32 or 64, got {rc.modulus_bits}")
    if rc.members < 2 or not 1 <= rc.index <= rc.members or rc.dim < 3:
        raise WireError("round configuration has inconsistent members/index/dim")
    if len(rc.commitments) != rc.members or len(rc.member_ids) != rc.members:
        raise WireError(f"round configuration must carry one commitment and one member id per member ({rc.members})")
    try:
        return m.GroupConfig(
            session=bytes(rc.session), members=rc.members, threshold=rc.threshold, dim=rc.dim,
            modulus_bits=rc.modulus_bits, mode=MODE_FROM_PB[rc.mode], neighbors=rc.neighbors or None,
            commitments=tuple(bytes(c) for c in rc.commitments), member_ids=tuple(rc.member_ids), context=round_context(rc),
        )
    except ValueError as exc:
        raise WireError(f"round configuration: {exc}") from None


def encoding_to_pb(p: EncodingParams) -> pb.EncodingParams:
    return pb.EncodingParams(clip_norm=p.clip_norm, clip_value=p.clip_value or 0.0, precision_bits=p.precision_bits)


def encoding_from_pb(p: pb.EncodingParams) -> EncodingParams:
    try:
        return EncodingParams(clip_norm=p.clip_norm, clip_value=p.clip_value or None, precision_bits=p.precision_bits)
    except ValueError as exc:
        raise WireError(f"bad encoding parameters: {exc}") from None


# ---- vectors -------------------------------------------------------------------------------
def words_from_bytes(data: bytes, dtype: np.dtype) -> np.ndarray:
    dt = np.dtype(dtype)
    if len(data) % dt.itemsize:
        raise WireError(f"chunk of {len(data)} bytes is not a whole number of {dt.itemsize}-byte words")
    return np.frombuffer(data, dtype=dt.newbyteorder("<")).astype(dt, copy=False)


def words_to_bytes(v: np.ndarray) -> bytes:
    return v.astype(v.dtype.newbyteorder("<"), copy=False).tobytes()


def masked_input_chunks(vector: np.ndarray, chunk_words: int) -> Iterator[pb.ClientMessage]:
    """The masked vector as chunks of ``chunk_words`` words (the last flagged), built one at a time."""
    if chunk_words < 1:
        raise WireError(f"chunk_words must be positive, got {chunk_words}")
    n = vector.size
    for start in range(0, n, chunk_words):
        stop = min(n, start + chunk_words)
        yield pb.ClientMessage(masked_input=pb.MaskedInputChunk(offset=start, words=words_to_bytes(vector[start:stop]), last=stop == n))


# ---- the hot message, read in place --------------------------------------------------------
class ChunkView(NamedTuple):
    """A masked-input chunk read in place: ``words`` is a view into the received bytes."""

    offset: int
    words: memoryview
    last: bool


_CHUNK_TAG, _OFFSET_TAG, _WORDS_TAG, _LAST_TAG = 0x22, 0x08, 0x12, 0x18   # ClientMessage.masked_input = 4; its fields 1, 2, 3


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    raise ValueError("bad varint")


def masked_chunk_view(data: bytes) -> ChunkView | None:
    """The masked-input chunk of a serialised ClientMessage without parsing or copying its words
    (a full parse copies each chunk twice: into upb's arena, then into a bytes object).  Only the
    layout our serialiser writes is read here (fields in order, each at most once, nothing else);
    for anything else, or any other message, None: the caller parses it in full, as before."""
    try:
        if len(data) < 2 or data[0] != _CHUNK_TAG:
            return None
        size, pos = _varint(data, 1)
        if pos + size != len(data):
            return None
        offset, last, start, stop = 0, False, pos, pos
        if pos < len(data) and data[pos] == _OFFSET_TAG:
            offset, pos = _varint(data, pos + 1)
        if pos < len(data) and data[pos] == _WORDS_TAG:
            length, pos = _varint(data, pos + 1)
            start, stop = pos, pos + length
            pos = stop
        if pos < len(data) and data[pos] == _LAST_TAG:
            flag, pos = _varint(data, pos + 1)
            if flag > 1:
                return None
            last = flag == 1
        if pos != len(data) or offset >= 1 << 64:
            return None
    except ValueError:
        return None
    return ChunkView(offset, memoryview(data)[start:stop], last)
