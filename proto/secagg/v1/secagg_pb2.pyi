from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_SEMI_HONEST: _ClassVar[Mode]
    MODE_ACTIVE: _ClassVar[Mode]
MODE_UNSPECIFIED: Mode
MODE_SEMI_HONEST: Mode
MODE_ACTIVE: Mode

class ClientMessage(_message.Message):
    __slots__ = ("hello", "advertise_keys", "share_keys", "masked_input", "consistency_signature", "unmask_response", "abort")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEYS_FIELD_NUMBER: _ClassVar[int]
    MASKED_INPUT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    UNMASK_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    advertise_keys: AdvertiseKeys
    share_keys: ShareKeys
    masked_input: MaskedInputChunk
    consistency_signature: ConsistencySignature
    unmask_response: UnmaskResponse
    abort: ClientAbort
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., advertise_keys: _Optional[_Union[AdvertiseKeys, _Mapping]] = ..., share_keys: _Optional[_Union[ShareKeys, _Mapping]] = ..., masked_input: _Optional[_Union[MaskedInputChunk, _Mapping]] = ..., consistency_signature: _Optional[_Union[ConsistencySignature, _Mapping]] = ..., unmask_response: _Optional[_Union[UnmaskResponse, _Mapping]] = ..., abort: _Optional[_Union[ClientAbort, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("client_id", "signature", "library_version", "server_binding", "contribution_commitment")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_BINDING_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    signature: bytes
    library_version: str
    server_binding: bytes
    contribution_commitment: bytes
    def __init__(self, client_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., library_version: _Optional[str] = ..., server_binding: _Optional[bytes] = ..., contribution_commitment: _Optional[bytes] = ...) -> None: ...

class AdvertiseKeys(_message.Message):
    __slots__ = ("c_public", "s_public", "signature", "contribution")
    C_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    S_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    c_public: bytes
    s_public: bytes
    signature: bytes
    contribution: bytes
    def __init__(self, c_public: _Optional[bytes] = ..., s_public: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., contribution: _Optional[bytes] = ...) -> None: ...

class EncryptedShare(_message.Message):
    __slots__ = ("sender", "receiver", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: int
    receiver: int
    ciphertext: bytes
    def __init__(self, sender: _Optional[int] = ..., receiver: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareKeys(_message.Message):
    __slots__ = ("shares", "self_mask_commitment")
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    self_mask_commitment: bytes
    def __init__(self, shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ..., self_mask_commitment: _Optional[bytes] = ...) -> None: ...

class MaskedInputChunk(_message.Message):
    __slots__ = ("offset", "words", "last")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    offset: int
    words: bytes
    last: bool
    def __init__(self, offset: _Optional[int] = ..., words: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class ConsistencySignature(_message.Message):
    __slots__ = ("signature",)
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    def __init__(self, signature: _Optional[bytes] = ...) -> None: ...

class IndexedShare(_message.Message):
    __slots__ = ("owner", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: int
    share: bytes
    def __init__(self, owner: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class UnmaskResponse(_message.Message):
    __slots__ = ("self_mask_shares", "mask_key_shares")
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    self_mask_shares: _containers.RepeatedCompositeFieldContainer[IndexedShare]
    mask_key_shares: _containers.RepeatedCompositeFieldContainer[IndexedShare]
    def __init__(self, self_mask_shares: _Optional[_Iterable[_Union[IndexedShare, _Mapping]]] = ..., mask_key_shares: _Optional[_Iterable[_Union[IndexedShare, _Mapping]]] = ...) -> None: ...

class ClientAbort(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("challenge", "round_config", "keys_broadcast", "shares_delivery", "consistency_request", "unmask_request", "result")
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    ROUND_CONFIG_FIELD_NUMBER: _ClassVar[int]
    KEYS_BROADCAST_FIELD_NUMBER: _ClassVar[int]
    SHARES_DELIVERY_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_REQUEST_FIELD_NUMBER: _ClassVar[int]
    UNMASK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    challenge: Challenge
    round_config: RoundConfig
    keys_broadcast: KeysBroadcast
    shares_delivery: SharesDelivery
    consistency_request: ConsistencyRequest
    unmask_request: UnmaskRequest
    result: RoundResult
    def __init__(self, challenge: _Optional[_Union[Challenge, _Mapping]] = ..., round_config: _Optional[_Union[RoundConfig, _Mapping]] = ..., keys_broadcast: _Optional[_Union[KeysBroadcast, _Mapping]] = ..., shares_delivery: _Optional[_Union[SharesDelivery, _Mapping]] = ..., consistency_request: _Optional[_Union[ConsistencyRequest, _Mapping]] = ..., unmask_request: _Optional[_Union[UnmaskRequest, _Mapping]] = ..., result: _Optional[_Union[RoundResult, _Mapping]] = ...) -> None: ...

class Challenge(_message.Message):
    __slots__ = ("nonce", "server_version", "dim")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    server_version: str
    dim: int
    def __init__(self, nonce: _Optional[bytes] = ..., server_version: _Optional[str] = ..., dim: _Optional[int] = ...) -> None: ...

class EncodingParams(_message.Message):
    __slots__ = ("clip_norm", "clip_value", "precision_bits")
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIP_VALUE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_BITS_FIELD_NUMBER: _ClassVar[int]
    clip_norm: float
    clip_value: float
    precision_bits: int
    def __init__(self, clip_norm: _Optional[float] = ..., clip_value: _Optional[float] = ..., precision_bits: _Optional[int] = ...) -> None: ...

class RoundConfig(_message.Message):
    __slots__ = ("round_id", "group", "index", "session", "members", "threshold", "dim", "modulus_bits", "mode", "neighbors", "encoding", "model_version", "phase_timeout_seconds", "chunk_words", "member_ids", "commitments", "round_number", "epoch", "epoch_rounds", "grouping")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODULUS_BITS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PHASE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_WORDS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_IDS_FIELD_NUMBER: _ClassVar[int]
    COMMITMENTS_FIELD_NUMBER: _ClassVar[int]
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    GROUPING_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    group: int
    index: int
    session: bytes
    members: int
    threshold: int
    dim: int
    modulus_bits: int
    mode: Mode
    neighbors: int
    encoding: EncodingParams
    model_version: int
    phase_timeout_seconds: float
    chunk_words: int
    member_ids: _containers.RepeatedScalarFieldContainer[str]
    commitments: _containers.RepeatedScalarFieldContainer[bytes]
    round_number: int
    epoch: int
    epoch_rounds: int
    grouping: str
    def __init__(self, round_id: _Optional[str] = ..., group: _Optional[int] = ..., index: _Optional[int] = ..., session: _Optional[bytes] = ..., members: _Optional[int] = ..., threshold: _Optional[int] = ..., dim: _Optional[int] = ..., modulus_bits: _Optional[int] = ..., mode: _Optional[_Union[Mode, str]] = ..., neighbors: _Optional[int] = ..., encoding: _Optional[_Union[EncodingParams, _Mapping]] = ..., model_version: _Optional[int] = ..., phase_timeout_seconds: _Optional[float] = ..., chunk_words: _Optional[int] = ..., member_ids: _Optional[_Iterable[str]] = ..., commitments: _Optional[_Iterable[bytes]] = ..., round_number: _Optional[int] = ..., epoch: _Optional[int] = ..., epoch_rounds: _Optional[int] = ..., grouping: _Optional[str] = ...) -> None: ...

class AdvertisedKeys(_message.Message):
    __slots__ = ("index", "c_public", "s_public", "signature", "identity")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    C_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    S_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    c_public: bytes
    s_public: bytes
    signature: bytes
    identity: bytes
    def __init__(self, index: _Optional[int] = ..., c_public: _Optional[bytes] = ..., s_public: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., identity: _Optional[bytes] = ...) -> None: ...

class KeysBroadcast(_message.Message):
    __slots__ = ("keys", "contributions")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[AdvertisedKeys]
    contributions: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[_Union[AdvertisedKeys, _Mapping]]] = ..., contributions: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SharesDelivery(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class ConsistencyRequest(_message.Message):
    __slots__ = ("survivors",)
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, survivors: _Optional[_Iterable[int]] = ...) -> None: ...

class IndexedSignature(_message.Message):
    __slots__ = ("index", "signature")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    index: int
    signature: bytes
    def __init__(self, index: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("survivors", "dropped", "signatures")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    signatures: _containers.RepeatedCompositeFieldContainer[IndexedSignature]
    def __init__(self, survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ..., signatures: _Optional[_Iterable[_Union[IndexedSignature, _Mapping]]] = ...) -> None: ...

class RoundResult(_message.Message):
    __slots__ = ("round_id", "outcome", "reason", "model_version", "group_accepted", "aggregate_digest")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    GROUP_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    outcome: str
    reason: str
    model_version: int
    group_accepted: bool
    aggregate_digest: str
    def __init__(self, round_id: _Optional[str] = ..., outcome: _Optional[str] = ..., reason: _Optional[str] = ..., model_version: _Optional[int] = ..., group_accepted: _Optional[bool] = ..., aggregate_digest: _Optional[str] = ...) -> None: ...

class ReadAuth(_message.Message):
    __slots__ = ("client_id", "timestamp_ms", "server_binding", "signature")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    SERVER_BINDING_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    timestamp_ms: int
    server_binding: bytes
    signature: bytes
    def __init__(self, client_id: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., server_binding: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("version", "auth")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    version: int
    auth: ReadAuth
    def __init__(self, version: _Optional[int] = ..., auth: _Optional[_Union[ReadAuth, _Mapping]] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("version", "dim", "offset", "values", "digest")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    version: int
    dim: int
    offset: int
    values: bytes
    digest: str
    def __init__(self, version: _Optional[int] = ..., dim: _Optional[int] = ..., offset: _Optional[int] = ..., values: _Optional[bytes] = ..., digest: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: ReadAuth
    def __init__(self, auth: _Optional[_Union[ReadAuth, _Mapping]] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("model_version", "waiting_clients", "round_id", "phase", "dim")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WAITING_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    waiting_clients: int
    round_id: str
    phase: str
    dim: int
    def __init__(self, model_version: _Optional[int] = ..., waiting_clients: _Optional[int] = ..., round_id: _Optional[str] = ..., phase: _Optional[str] = ..., dim: _Optional[int] = ...) -> None: ...
