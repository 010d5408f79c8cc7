"""Bad input over real gRPC on loopback: each gets a precise status and reason, is recorded, and
the round completes correctly for everyone else.

Every test runs a real server (TLS, SQLite) in the test's event loop, honest ``AsyncClient``s
with fixed updates and rounding seeds, and one raw client (``grpc_harness.RawClient``) that
follows the protocol with a real ClientMachine until it misbehaves.  After the round the
aggregate digest is compared with a plaintext oracle over the survivors' encoded inputs, and
the new model with the old plus the mean of their bounded updates.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_harness import (
    Harness,
    RawClient,
    async_test,
    check_round,
    running_server,
    seed_of,
    update_of,
)
from secagg.client import RoundOutcome
from secagg.protocol.messages import EncryptedShare, ShareKeys
from secagg.protocol.signatures import keys_message, sign
from secagg.server.tls import new_identity_key
from secagg.v1 import secagg_pb2 as pb
from secagg.wire import convert

Code = grpc.StatusCode
N = 4            # 4 holders: threshold 3 in semi-honest mode, so the round survives one bad client
BAD = "c3"
HONEST = ["c0", "c1", "c2"]


@dataclass
class Result:
    code: grpc.StatusCode
    details: str
    outcomes: dict[str, Any]
    record: Any
    old: np.ndarray
    new: np.ndarray


async def misbehave(h: Harness, script: Callable[[RawClient], Awaitable[None]], *, bad: str = BAD,
                    honest: list[str] = HONEST, hold: str | None = None) -> Result:
    """Run a round with honest clients and one raw client running ``script`` (from its hello on).

    The honest clients are AsyncClients; with ``hold`` (a phase label) they are raw clients that
    follow the protocol but keep that phase open until the misbehaving stream has ended, for
    scripts whose bad message comes after the client's own valid message of the phase (else
    the phase could close in between and the bad message would land in the next one)."""
    old = h.store.model().params
    raw = await h.raw(bad)
    await h.wait_in_lobby(bad)
    ended = asyncio.Event()
    if hold is None:
        honest_task = asyncio.create_task(h.participate(honest))
    else:
        followers = [await h.raw(c) for c in honest]

        async def run_followers() -> dict[str, Any]:
            outs = await asyncio.gather(*(f.follow(hold=hold, until=ended.wait) for f in followers), return_exceptions=True)
            return dict(zip(honest, outs))

        honest_task = asyncio.create_task(run_followers())
    await script(raw)
    code, details = await raw.status()
    ended.set()
    outcomes = await honest_task
    await h.rounds_finished()
    return Result(code, details, outcomes, h.record(), old, h.store.model().params)


def inputs_of(ids: list[str]) -> dict[str, tuple[np.ndarray, bytes]]:
    return {c: (update_of(c), seed_of(c)) for c in ids}


def assert_rejected(h: Harness, r: Result, code: grpc.StatusCode, reason: str, *, phase: str, bad: str = BAD,
                    honest: list[str] = HONEST, kind: str = "rejected") -> None:
    """The misbehaving client saw ``code`` with ``reason``; the store has the event and the
    dropout; the round completed for the honest clients with the exact sum of their inputs."""
    assert r.code == code, (r.code, r.details)
    assert reason in r.details, r.details
    events = h.events(bad)
    assert any(e.status == code.name and reason in e.reason and e.round_id == r.record.round_id and e.kind == kind
               for e in events), events
    drops = [d for d in r.record.dropouts if d["client"] == bad]
    assert len(drops) == 1 and drops[0]["phase"] == phase, r.record.dropouts
    assert reason in drops[0]["detail"] or kind == "dropped", drops
    assert {d["client"] for d in r.record.dropouts} == {bad}, r.record.dropouts
    for c in honest:
        out = r.outcomes[c]   # a RoundOutcome, or a RoundResult from a raw follower
        assert isinstance(out, (RoundOutcome, pb.RoundResult)) and out.outcome == "completed", (c, out)
        assert out.round_id == r.record.round_id and out.aggregate_digest == r.record.aggregate_digest
        assert out.model_version == r.record.model_version == 2
    survivors = check_round(h, r.record, inputs_of(honest + [bad]), r.old, r.new)
    assert sorted(survivors) == sorted(honest)


# ---- malformed --------------------------------------------------------------------------------
@async_test
async def test_empty_message_is_invalid_argument(tmp_path):
    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.send(pb.ClientMessage())   # no field of the oneof set

    async with running_server(tmp_path, N) as h:
        r = await misbehave(h, script)
        assert_rejected(h, r, Code.INVALID_ARGUMENT, "empty message", phase="advertise_keys")


def _readdress_to_self(sk: ShareKeys) -> ShareKeys:
    first, *rest = sk.shares
    return dataclasses.replace(sk, shares=(EncryptedShare(first.sender, sk.index, first.ciphertext), *rest))


def _drop_one_share(sk: ShareKeys) -> ShareKeys:
    return dataclasses.replace(sk, shares=sk.shares[1:])


def _duplicate_receiver(sk: ShareKeys) -> ShareKeys:
    a, b, *rest = sk.shares
    return dataclasses.replace(sk, shares=(a, EncryptedShare(b.sender, a.receiver, b.ciphertext), *rest))


def _short_ciphertext(sk: ShareKeys) -> ShareKeys:
    first, *rest = sk.shares
    return dataclasses.replace(sk, shares=(EncryptedShare(first.sender, first.receiver, first.ciphertext[:-1]), *rest))


@pytest.mark.parametrize("tamper, reason", [
    (_readdress_to_self, "needs exactly one share for each of its 3 neighbours"),
    (_drop_one_share, "needs exactly one share for each of its 3 neighbours"),
    (_duplicate_receiver, "needs exactly one share for each of its 3 neighbours"),
    (_short_ciphertext, "share ciphertexts must be"),
], ids=["share-to-self", "missing-share", "two-shares-one-receiver", "short-ciphertext"])
@async_test
async def test_share_keys_for_the_wrong_receivers_is_invalid_argument(tmp_path, tamper, reason):
    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.advertise()
        await raw.share_keys(tamper)

    async with running_server(tmp_path, N) as h:
        r = await misbehave(h, script)
        assert_rejected(h, r, Code.INVALID_ARGUMENT, reason, phase="share_keys")


@async_test
async def test_share_with_index_zero_does_not_parse(tmp_path):
    """Index 0 is not a Shamir x-coordinate: the wire layer refuses it before the core sees it."""

    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.advertise()
        kb = await raw.expect("keys_broadcast")
        reply = raw.machine.share_keys(convert.keys_broadcast_from_pb(kb))
        msg = convert.share_keys_to_pb(reply)
        msg.share_keys.shares[0].receiver = 0
        await raw.send(msg)

    async with running_server(tmp_path, N) as h:
        r = await misbehave(h, script)
        assert_rejected(h, r, Code.INVALID_ARGUMENT, "index 0 out of range", phase="share_keys")


# ---- oversized --------------------------------------------------------------------------------
@async_test
async def test_oversized_chunk_is_resource_exhausted(tmp_path):
    """A single masked-input chunk over the server's 8 MiB receive limit: RESOURCE_EXHAUSTED at
    the client, the client is dropped (after sharing keys, so its pairwise masks are removed
    with its reconstructed key) and the round completes for the rest."""

    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.advertise()
        await raw.share_keys()
        await raw.masked_chunks()
        await raw.send(pb.ClientMessage(masked_input=pb.MaskedInputChunk(offset=0, words=bytes(9 << 20), last=True)))

    async with running_server(tmp_path, N) as h:
        r = await misbehave(h, script)
        assert r.code == Code.RESOURCE_EXHAUSTED, (r.code, r.details)
        assert "exceeds the 8388608 byte limit" in r.details, r.details
        drops = [d for d in r.record.dropouts if d["client"] == BAD]
        assert len(drops) == 1 and drops[0]["phase"] == "masked_input", r.record.dropouts
        events = h.events(BAD)
        assert any(e.round_id == r.record.round_id for e in events), events
        for c in HONEST:
            assert r.outcomes[c].ok, r.outcomes[c]
        assert sorted(check_round(h, r.record, inputs_of(HONEST), r.old, r.new)) == HONEST


@async_test
async def test_oversized_chunk_is_recorded_as_resource_exhausted(tmp_path):
    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.advertise()
        await raw.share_keys()
        await raw.masked_chunks()
        await raw.send(pb.ClientMessage(masked_input=pb.MaskedInputChunk(offset=0, words=bytes(9 << 20), last=True)))

    async with running_server(tmp_path, N) as h:
        r = await misbehave(h, script)
        assert r.code == Code.RESOURCE_EXHAUSTED
        assert any(e.status == "RESOURCE_EXHAUSTED" for e in h.events(BAD)), h.events(BAD)


# ---- replayed ---------------------------------------------------------------------------------
@async_test
async def test_replayed_advertise_keys_is_already_exists(tmp_path):
    async def script(raw: RawClient) -> None:
        await raw.join()
        msg = convert.advertise_to_pb(raw.machine.advertise_keys())
        await raw.send(msg)
        await raw.send(msg)

    async with running_server(tmp_path, N) as h:
        r = await misbehave(h, script, hold="advertise_keys")
        assert_rejected(h, r, Code.ALREADY_EXISTS, "already sent its advertise_keys message", phase="advertise_keys")


@async_test
async def test_replayed_masked_input_chunk_is_already_exists(tmp_path):
    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.advertise()
        await raw.share_keys()
        chunks = await raw.masked_chunks()
        assert len(chunks) >= 3
        await raw.send(chunks[0])
        await raw.send(chunks[1])
        await raw.send(chunks[0])   # replay at an earlier offset

    async with running_server(tmp_path, N, chunk_words=50) as h:
        r = await misbehave(h, script)
        assert_rejected(h, r, Code.ALREADY_EXISTS, "masked-input chunk at offset 0, expected 100", phase="masked_input")


@async_test
async def test_masked_input_after_the_last_chunk_is_already_exists(tmp_path):
    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.advertise()
        await raw.share_keys()
        chunks = await raw.masked_chunks()
        for c in chunks:
            await raw.send(c)
        await raw.send(chunks[0])

    async with running_server(tmp_path, N, chunk_words=50) as h:
        r = await misbehave(h, script, hold="masked_input")
        assert r.code == Code.ALREADY_EXISTS and "already sent its whole masked input" in r.details, (r.code, r.details)
        assert any(e.status == "ALREADY_EXISTS" and e.round_id == r.record.round_id for e in h.events(BAD))
        assert all(o.outcome == "completed" for o in r.outcomes.values()), r.outcomes
        assert [(d["client"], d["phase"]) for d in r.record.dropouts] == [(BAD, "masked_input")]
        # the whole vector arrived before the replay, so it stays in the sum
        assert sorted(check_round(h, r.record, inputs_of(HONEST + [BAD]), r.old, r.new)) == sorted(HONEST + [BAD])


# ---- re-routed ciphertext -----------------------------------------------------------------
def _claim_other_sender(sk: ShareKeys) -> ShareKeys:
    other = next(s.receiver for s in sk.shares)
    return dataclasses.replace(sk, shares=tuple(EncryptedShare(other if i == 0 else s.sender, s.receiver, s.ciphertext)
                                                for i, s in enumerate(sk.shares)))


def _claim_other_sender_everywhere(sk: ShareKeys) -> ShareKeys:
    other = next(s.receiver for s in sk.shares)
    return dataclasses.replace(sk, shares=tuple(EncryptedShare(other, s.receiver, s.ciphertext) for s in sk.shares))


def _outside_group(sk: ShareKeys) -> ShareKeys:
    first, *rest = sk.shares
    return dataclasses.replace(sk, shares=(EncryptedShare(first.sender, 99, first.ciphertext), *rest))


@pytest.mark.parametrize("tamper", [_claim_other_sender, _claim_other_sender_everywhere, _outside_group],
                         ids=["one-share-claims-another-sender", "all-shares-claim-another-sender", "receiver-outside-group"])
@async_test
async def test_rerouted_share_is_invalid_argument(tmp_path, tamper):
    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.advertise()
        await raw.share_keys(tamper)

    async with running_server(tmp_path, N) as h:
        r = await misbehave(h, script)
        assert_rejected(h, r, Code.INVALID_ARGUMENT, "needs exactly one share for each of its 3 neighbours", phase="share_keys")


# ---- out of phase -----------------------------------------------------------------------------
@async_test
async def test_masked_input_during_advertise_keys_is_failed_precondition(tmp_path):
    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.send(pb.ClientMessage(masked_input=pb.MaskedInputChunk(offset=0, words=bytes(8), last=False)))

    async with running_server(tmp_path, N) as h:
        r = await misbehave(h, script)
        assert_rejected(h, r, Code.FAILED_PRECONDITION, "masked input chunk during advertise_keys", phase="advertise_keys")


@async_test
async def test_unmask_response_during_advertise_keys_is_failed_precondition(tmp_path):
    async def script(raw: RawClient) -> None:
        rc = await raw.join()
        await raw.send(pb.ClientMessage(unmask_response=pb.UnmaskResponse(
            self_mask_shares=[pb.IndexedShare(owner=rc.index, share=bytes(66))])))

    async with running_server(tmp_path, N) as h:
        r = await misbehave(h, script)
        assert_rejected(h, r, Code.FAILED_PRECONDITION, "unmasking message from client", phase="advertise_keys")
        assert "during advertise_keys" in r.details


@async_test
async def test_share_keys_during_advertise_keys_is_failed_precondition(tmp_path):
    async def script(raw: RawClient) -> None:
        rc = await raw.join()   # keys not advertised yet, so the phase cannot have moved on
        await raw.send(pb.ClientMessage(share_keys=pb.ShareKeys(shares=[pb.EncryptedShare(sender=rc.index, receiver=1, ciphertext=b"x")])))

    async with running_server(tmp_path, N) as h:
        r = await misbehave(h, script)
        assert_rejected(h, r, Code.FAILED_PRECONDITION, "share_keys message from client", phase="advertise_keys")


@async_test
async def test_message_in_the_lobby_is_failed_precondition(tmp_path):
    """Before any RoundConfig: refused, recorded without a round, and the round runs without it."""
    async with running_server(tmp_path, N, registered=["early"]) as h:
        raw = await h.raw("early")
        await raw.send(pb.ClientMessage(advertise_keys=pb.AdvertiseKeys(c_public=bytes(32), s_public=bytes(32))))
        code, details = await raw.status()
        assert code == Code.FAILED_PRECONDITION and "before any round configuration" in details, (code, details)
        old = h.store.model().params
        outs = await h.participate(["c0", "c1", "c2", "c3"])
        await h.rounds_finished()
        rec = h.record()
        assert all(o.ok for o in outs.values()), outs
        assert "early" not in rec.cohort and not rec.dropouts
        (ev,) = h.events("early")
        assert ev.status == "FAILED_PRECONDITION" and ev.round_id is None and "before any round configuration" in ev.reason
        check_round(h, rec, inputs_of(["c0", "c1", "c2", "c3"]), old, h.store.model().params)


# ---- wrong vector length ----------------------------------------------------------------------
async def _send_words(raw: RawClient, chunks: list[pb.ClientMessage]) -> None:
    for c in chunks:
        await raw.send(c)


def _too_few(chunks: list[pb.ClientMessage]) -> list[pb.ClientMessage]:
    head = [pb.ClientMessage() for _ in chunks[:2]]
    for out, c in zip(head, chunks[:2]):
        out.CopyFrom(c)
    head[-1].masked_input.last = True          # claims to be complete after 100 of 202 words
    return head


def _one_word_short(chunks: list[pb.ClientMessage]) -> list[pb.ClientMessage]:
    out = [pb.ClientMessage() for _ in chunks]
    for o, c in zip(out, chunks):
        o.CopyFrom(c)
    out[-1].masked_input.words = out[-1].masked_input.words[:-4]
    return out


def _too_many(chunks: list[pb.ClientMessage]) -> list[pb.ClientMessage]:
    out = [pb.ClientMessage() for _ in chunks]
    for o, c in zip(out, chunks):
        o.CopyFrom(c)
    out[-1].masked_input.last = False
    end = out[-1].masked_input.offset + len(out[-1].masked_input.words) // 4
    out.append(pb.ClientMessage(masked_input=pb.MaskedInputChunk(offset=end, words=bytes(8), last=True)))
    return out


def _ragged(chunks: list[pb.ClientMessage]) -> list[pb.ClientMessage]:
    out = pb.ClientMessage()
    out.CopyFrom(chunks[0])
    out.masked_input.words = out.masked_input.words[:-1]   # not a whole number of 4-byte words
    return [out]


@pytest.mark.parametrize("shape, reason", [
    (_too_few, "masked input has 100 words, the round needs 202"),
    (_one_word_short, "masked input has 201 words, the round needs 202"),
    (_too_many, "masked input longer than 202 words"),
    (_ragged, "is not a whole number of 4-byte words"),
], ids=["too-few", "one-short", "too-many", "ragged-bytes"])
@async_test
async def test_wrong_vector_length_is_invalid_argument(tmp_path, shape, reason):
    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.advertise()
        await raw.share_keys()
        await _send_words(raw, shape(await raw.masked_chunks()))

    async with running_server(tmp_path, N, chunk_words=50) as h:
        r = await misbehave(h, script)
        assert_rejected(h, r, Code.INVALID_ARGUMENT, reason, phase="masked_input")


@async_test
async def test_chunk_larger_than_chunk_words_is_invalid_argument(tmp_path):
    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.advertise()
        await raw.share_keys()
        await raw.masked_chunks()
        await raw.send(pb.ClientMessage(masked_input=pb.MaskedInputChunk(offset=0, words=bytes(4 * 51), last=False)))

    async with running_server(tmp_path, N, chunk_words=50) as h:
        r = await misbehave(h, script)
        assert_rejected(h, r, Code.INVALID_ARGUMENT, "chunks carry 1..50", phase="masked_input")


# ---- unknown clients (and sybils) --------------------------------------------------------------
@async_test
async def test_unregistered_client_and_sybils_are_unauthenticated(tmp_path):
    """Identities beyond the registered set never get a vote: every one is refused at hello,
    recorded, and the round runs with exactly the registered clients."""
    async with running_server(tmp_path, N) as h:
        old = h.store.model().params
        sybils = [f"sybil-{i}" for i in range(5)]
        refused = []
        for s in sybils:
            raw = await h.raw(s, new_identity_key())
            refused.append(await raw.status())
        outs = await h.participate(["c0", "c1", "c2", "c3"])
        await h.rounds_finished()
        for code, details in refused:
            assert code == Code.UNAUTHENTICATED and "is not registered" in details, (code, details)
        for s in sybils:
            (ev,) = h.events(s)
            assert ev.status == "UNAUTHENTICATED" and "is not registered" in ev.reason and ev.round_id is None
        rec = h.record()
        assert sorted(rec.cohort) == ["c0", "c1", "c2", "c3"] and not rec.dropouts
        assert all(o.ok for o in outs.values()), outs
        check_round(h, rec, inputs_of(["c0", "c1", "c2", "c3"]), old, h.store.model().params)


@async_test
async def test_registered_id_signed_with_another_key_is_unauthenticated(tmp_path):
    async with running_server(tmp_path, N) as h:
        old = h.store.model().params
        impostor = await h.raw("c0", new_identity_key())
        code, details = await impostor.status()
        assert code == Code.UNAUTHENTICATED, (code, details)
        assert "hello signature does not verify with 'c0'" in details
        # another registered client's key, claiming c0's id
        borrowed = await h.raw("c0", h.keys["c1"])
        assert (await borrowed.status())[0] == Code.UNAUTHENTICATED
        outs = await h.participate(["c0", "c1", "c2", "c3"])
        await h.rounds_finished()
        evs = [e for e in h.events("c0") if e.status == "UNAUTHENTICATED"]
        assert len(evs) == 2 and all("does not verify" in e.reason and e.round_id is None for e in evs), evs
        assert all(o.ok for o in outs.values()), outs
        rec = h.record()
        assert not rec.dropouts
        check_round(h, rec, inputs_of(["c0", "c1", "c2", "c3"]), old, h.store.model().params)


@async_test
async def test_bad_client_id_and_missing_hello(tmp_path):
    async with running_server(tmp_path, N) as h:
        bad_id = await h.raw("x", hello=False)
        await bad_id.send(pb.ClientMessage(hello=pb.Hello(client_id="../etc/passwd", signature=bytes(64))))
        code, details = await bad_id.status()
        assert code == Code.INVALID_ARGUMENT and "client_id must match" in details
        no_hello = await h.raw("x", hello=False)
        await no_hello.send(pb.ClientMessage(advertise_keys=pb.AdvertiseKeys()))
        code, details = await no_hello.status()
        assert code == Code.FAILED_PRECONDITION and "first message on a stream must be hello" in details
        reasons = {e.status: e.reason for e in h.store.events()}
        assert "client_id must match" in reasons["INVALID_ARGUMENT"]
        assert "must be hello" in reasons["FAILED_PRECONDITION"]
        outs = await h.participate(["c0", "c1", "c2", "c3"])
        assert all(o.ok for o in outs.values()), outs


# ---- a second stream --------------------------------------------------------------------------
@async_test
async def test_second_stream_for_the_same_client_is_already_exists(tmp_path):
    async with running_server(tmp_path, N) as h:
        old = h.store.model().params
        first = asyncio.create_task(h.participate(["c0"]))
        await h.wait_in_lobby("c0")
        second = await h.raw("c0")
        code, details = await second.status()
        assert code == Code.ALREADY_EXISTS and "already has an open stream" in details, (code, details)
        rest = await h.participate(["c1", "c2", "c3"])
        outs = (await first) | rest
        await h.rounds_finished()
        assert all(isinstance(o, RoundOutcome) and o.ok for o in outs.values()), outs
        (ev,) = h.events("c0")
        assert ev.status == "ALREADY_EXISTS" and "already has an open stream" in ev.reason
        rec = h.record()
        assert not rec.dropouts and sorted(rec.cohort) == ["c0", "c1", "c2", "c3"]
        check_round(h, rec, inputs_of(["c0", "c1", "c2", "c3"]), old, h.store.model().params)


@async_test
async def test_second_stream_during_a_round_is_already_exists(tmp_path):
    """The same while the first stream is mid-round: the raw first stream goes on afterwards."""

    async def script(raw: RawClient) -> None:
        await raw.join()
        second = await raw.h.raw(BAD)
        code, details = await second.status()
        assert code == Code.ALREADY_EXISTS and "already has an open stream" in details
        await raw.advertise()
        await raw.share_keys()
        for c in await raw.masked_chunks():
            await raw.send(c)
        ur = await raw.expect("unmask_request")
        await raw.send(convert.unmask_response_to_pb(raw.machine.unmask(convert.unmask_request_from_pb(ur))))
        result = await raw.expect("result")
        assert result.outcome == "completed"

    async with running_server(tmp_path, N) as h:
        r = await misbehave(h, script)
        assert r.code == Code.OK
        assert all(o.ok for o in r.outcomes.values())
        assert not r.record.dropouts
        (ev,) = h.events(BAD)
        assert ev.status == "ALREADY_EXISTS" and ev.round_id is None
        assert sorted(check_round(h, r.record, inputs_of(HONEST + [BAD]), r.old, r.new)) == sorted(HONEST + [BAD])


# ---- stalls -----------------------------------------------------------------------------------
@async_test
async def test_client_stalling_mid_stream_is_deadline_exceeded(tmp_path):
    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.advertise()
        await raw.share_keys()
        chunks = await raw.masked_chunks()
        assert len(chunks) == 5
        await raw.send(chunks[0])   # then nothing

    async with running_server(tmp_path, N, chunk_words=50, phase_seconds=1.5) as h:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await misbehave(h, script)
        # dropped once silent mid-vector for stall_seconds (default phase_seconds / 4), not at the deadline
        assert 1.5 / 4 <= loop.time() - t0
        assert_rejected(h, r, Code.DEADLINE_EXCEEDED, "masked input stalled at word 50 of 202: no chunk for 0.375 s", phase="masked_input")


@async_test
async def test_client_silent_after_hello_in_a_round_is_deadline_exceeded(tmp_path):
    async def script(raw: RawClient) -> None:
        await raw.join()   # then never advertises

    async with running_server(tmp_path, N, phase_seconds=1.0) as h:
        r = await misbehave(h, script)
        # 1 s, plus 0.01 s per member of the group of N = 4 (the deadline grows with the round's work)
        assert_rejected(h, r, Code.DEADLINE_EXCEEDED, "no advertise_keys message within the 1.04 s deadline", phase="advertise_keys")


@async_test
async def test_client_abort_is_recorded(tmp_path):
    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.advertise()
        await raw.expect("keys_broadcast")
        await raw.send(pb.ClientMessage(abort=pb.ClientAbort(reason="battery low")))

    async with running_server(tmp_path, N) as h:
        r = await misbehave(h, script)
        assert_rejected(h, r, Code.ABORTED, "client aborted: battery low", phase="share_keys")


# ---- active mode: bad signatures ------------------------------------------------------------
@async_test
async def test_advertise_keys_signed_with_another_key_is_unauthenticated(tmp_path):
    """Active mode: round keys must be signed with the stream's registered identity key."""

    async def script(raw: RawClient) -> None:
        rc = await raw.join()
        adv = raw.machine.advertise_keys()
        forged = sign(new_identity_key(), keys_message(raw.machine.config.digest, rc.index, adv.c_public, adv.s_public))
        await raw.send(pb.ClientMessage(advertise_keys=pb.AdvertiseKeys(c_public=adv.c_public, s_public=adv.s_public, signature=forged,
                                                                         contribution=adv.contribution)))

    async with running_server(tmp_path, 5, mode="active") as h:   # 5 holders: threshold 4
        r = await misbehave(h, script, bad="c4", honest=["c0", "c1", "c2", "c3"])
        assert_rejected(h, r, Code.UNAUTHENTICATED, "does not verify", phase="advertise_keys", bad="c4", honest=["c0", "c1", "c2", "c3"])


@async_test
async def test_bad_consistency_signature_is_unauthenticated(tmp_path):
    """Active mode: a client whose consistency signature does not verify is dropped at the
    consistency check; its masked input is already in the sum, and the round completes."""
    honest = ["c0", "c1", "c2", "c3"]

    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.advertise()
        await raw.share_keys()
        for c in await raw.masked_chunks():
            await raw.send(c)
        await raw.expect("consistency_request")
        await raw.send(pb.ClientMessage(consistency_signature=pb.ConsistencySignature(signature=bytes(64))))

    async with running_server(tmp_path, 5, mode="active") as h:
        old = h.store.model().params
        r = await misbehave(h, script, bad="c4", honest=honest)
        assert r.code == Code.UNAUTHENTICATED and "does not verify" in r.details, (r.code, r.details)
        assert [(d["client"], d["phase"]) for d in r.record.dropouts] == [("c4", "consistency_check")]
        assert any(e.status == "UNAUTHENTICATED" and e.round_id == r.record.round_id for e in h.events("c4"))
        assert all(r.outcomes[c].ok for c in honest), r.outcomes
        survivors = check_round(h, r.record, inputs_of(honest + ["c4"]), old, r.new)
        assert sorted(survivors) == sorted(honest + ["c4"])   # it sent its masked input: it counts


@async_test
async def test_unmask_response_with_the_wrong_shares_is_invalid_argument(tmp_path):
    """Dropped at unmasking after its masked input arrived: its input counts, the others unmask."""
    honest = HONEST

    async def script(raw: RawClient) -> None:
        await raw.join()
        await raw.advertise()
        await raw.share_keys()
        for c in await raw.masked_chunks():
            await raw.send(c)
        ur = await raw.expect("unmask_request")
        reply = raw.machine.unmask(convert.unmask_request_from_pb(ur))
        msg = convert.unmask_response_to_pb(reply)
        del msg.unmask_response.self_mask_shares[0]
        await raw.send(msg)

    async with running_server(tmp_path, N) as h:
        r = await misbehave(h, script)
        assert r.code == Code.INVALID_ARGUMENT and "expected self-mask shares of [1, 2, 3, 4]" in r.details, r.details
        assert [(d["client"], d["phase"]) for d in r.record.dropouts] == [(BAD, "unmasking")]
        assert all(r.outcomes[c].ok for c in honest)
        assert sorted(check_round(h, r.record, inputs_of(honest + [BAD]), r.old, r.new)) == sorted(honest + [BAD])


# ---- the hello handshake -------------------------------------------------------------------
@async_test
async def test_no_hello_is_deadline_exceeded(tmp_path):
    async with running_server(tmp_path, N, phase_seconds=0.5) as h:
        raw = await h.raw("c0", hello=False)
        code, details = await raw.status()
        assert code == Code.DEADLINE_EXCEEDED and "no hello within 0.5 s" in details
        assert any(e.status == "DEADLINE_EXCEEDED" and "no hello" in e.reason for e in h.store.events())


@async_test
async def test_unknown_model_version_is_not_found(tmp_path):
    from secagg.client import Rejected

    async with running_server(tmp_path, N) as h:
        with pytest.raises(Rejected) as exc:
            await h.client("c0").get_model(99)
        assert exc.value.code == "NOT_FOUND" and "99" in exc.value.reason, exc.value


# ---- findings ------------------------------------------------------------------------------
@async_test
async def test_staller_holding_the_only_assembly_slot_does_not_sink_the_round(tmp_path):
    """max_inflight=1: the staller's first chunk takes the only assembly slot, then the honest
    clients (raw clients following the protocol, so the order is certain) send theirs."""
    async with running_server(tmp_path, N, chunk_words=50, phase_seconds=1.0, max_inflight=1) as h:
        old = h.store.model().params
        staller = await h.raw(BAD)
        honest = [await h.raw(c) for c in HONEST]
        slot_taken = asyncio.Event()
        tasks = [asyncio.create_task(r.follow(before_masked_input=slot_taken.wait)) for r in honest]
        await staller.join()
        await staller.advertise()
        await staller.share_keys()
        await staller.send((await staller.masked_chunks())[0])
        group = h.srv.coordinator.sessions[BAD].group
        while staller.config.index not in group.assembly:   # the server took the chunk, and the slot
            await asyncio.sleep(0.005)
        slot_taken.set()
        code, details = await staller.status()
        assert code == Code.DEADLINE_EXCEEDED, (code, details)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await h.rounds_finished()
        rec = h.record()
        assert [(d["client"], d["phase"]) for d in rec.dropouts] == [(BAD, "masked_input")], rec.dropouts
        assert all(isinstance(x, pb.RoundResult) and x.outcome == "completed" for x in results), results
        check_round(h, rec, inputs_of(HONEST), old, h.store.model().params)


def test_config_rejects_max_inflight_below_one():
    from secagg.server.config import ConfigError, ServerConfig

    with pytest.raises(ConfigError):
        ServerConfig(tls_cert="x", tls_key="y", max_inflight=0).validate()


@async_test
async def test_status_reports_the_phase_of_a_round_in_progress(tmp_path):
    async with running_server(tmp_path, N, phase_seconds=1.0) as h:
        raws = [await h.raw(c) for c in ("c0", "c1", "c2", "c3")]
        for raw in raws:
            await raw.join()      # nobody advertises: the round waits in advertise_keys
        st = await h.client("c0").status()
        assert st.round_id and st.round_id == h.srv.coordinator.round_id
        assert st.phase == "advertise_keys", st


# ---- bytes that are not a ClientMessage ------------------------------------------------------------
@async_test
async def test_unparseable_bytes_get_invalid_argument_and_are_recorded(tmp_path):
    async with running_server(tmp_path, N, phase_seconds=5.0) as h:
        channel = grpc.aio.secure_channel(h.address, grpc.ssl_channel_credentials(h.pki.ca_cert.read_bytes()))
        call = channel.stream_stream("/secagg.v1.SecAgg/Participate", request_serializer=lambda b: b,
                                     response_deserializer=pb.ServerMessage.FromString)()
        first = await call.read()
        raw = RawClient(h, BAD, h.keys[BAD])
        raw.nonce = first.challenge.nonce
        await call.write(raw.hello().SerializeToString())
        await call.write(b"\xff\xff\xff\xff not a protobuf")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await asyncio.wait_for(call.read(), 5.0)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unreadable message" in exc.value.details()
        assert any(e.status == "INVALID_ARGUMENT" and "unreadable message" in e.reason for e in h.events(BAD))
        assert BAD not in h.srv.coordinator.sessions   # the slot is free: the id may connect again
        await channel.close()
