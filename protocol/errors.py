"""Errors of the protocol core, named for whose fault they are (after h11).

``LocalProtocolError``: the caller misused a state machine (wrong phase, bad parameters).
``RemoteProtocolError``: a peer sent something invalid; it names the peer and a drop reason
that the transport maps to a gRPC status.  ``AbortError``: the round cannot go on (too few
survivors, or an honest client refuses a request that would break privacy).
"""

from __future__ import annotations

import enum


class DropReason(enum.Enum):
    """Why a client left a round; recorded and mapped to a wire status by the transport."""

    TIMEOUT = "timeout"                  # missed a phase deadline
    DISCONNECTED = "disconnected"        # stream closed
    MALFORMED = "malformed"              # message did not parse or had wrong shape
    OUT_OF_PHASE = "out_of_phase"        # sent a message the current phase does not accept
    DUPLICATE = "duplicate"              # sent the same phase's message twice
    BAD_SIGNATURE = "bad_signature"      # active mode: signature did not verify
    WRONG_LENGTH = "wrong_length"        # masked vector of the wrong dimension
    NOT_A_MEMBER = "not_a_member"        # index not in this group / not expected this phase
    OVERSIZED = "oversized"              # a message above the transport's size limit
    ABORTED = "aborted"                  # client itself aborted


class SecAggError(Exception):
    """Base of every error raised by the protocol core."""


class LocalProtocolError(SecAggError):
    """We were asked to do something out of order or with invalid parameters."""


class RemoteProtocolError(SecAggError):
    """A peer sent something invalid; ``index`` is the offender, ``reason`` why it is dropped."""

    def __init__(self, message: str, *, index: int | None = None, reason: DropReason = DropReason.MALFORMED):
        super().__init__(message)
        self.index = index
        self.reason = reason


class AbortError(SecAggError):
    """The round cannot continue safely; every honest party stops."""
