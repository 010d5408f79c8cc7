"""What can go wrong for an app taking part in a round; messages never carry secrets."""

from __future__ import annotations


class ClientError(Exception):
    """Base of the client library's errors."""


class ConnectionFailed(ClientError):
    """The server could not be reached; the message says why. ``retryable`` is False when
    retrying cannot help (certificate, name, missing client certificate)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class CredentialsError(ClientError):
    """An identity key, certificate or CA file that cannot be used (missing, unreadable, wrong type)."""


class Rejected(ClientError):
    """The server ended our stream with a status; ``code`` is the gRPC status name."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"server rejected us ({code}): {reason}")
        self.code = code
        self.reason = reason


class RoundAborted(ClientError):
    """We refused to go on (unsafe threshold, too few peers, bad signatures...)."""


class PolicyRefused(RoundAborted):
    """The server offered a round weaker than our ClientPolicy; ``setting`` names what."""

    def __init__(self, setting: str, offered: object, required: str, message: str) -> None:
        super().__init__(message)
        self.setting, self.offered, self.required = setting, offered, required


class RoundFailed(ClientError):
    """The round ended without a new model (aborted or all groups rejected); see ``outcome``."""

    def __init__(self, outcome: object) -> None:
        super().__init__(f"round {outcome.round_id} {outcome.outcome}: {outcome.reason}")  # type: ignore[attr-defined]
        self.outcome = outcome
