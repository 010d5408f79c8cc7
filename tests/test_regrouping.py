"""A hostile server regroups the REAL client inside an epoch (the move that lets least squares over
many rounds' group sums recover one client's update): the client refuses, before any key, with a
PolicyRefused naming the grouping setting; reshuffled groups are refused by default too."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_harness import async_test
from hostile_server import Stream, assert_no_secrets, hostile_server, make_sybils, make_victim, round_config
from secagg.client import ClientPolicy, PolicyRefused, Rejected
from secagg.server.tls import new_identity_key
from secagg.v1 import secagg_pb2 as pb


def config(hello: pb.Hello, *, tag: str, epoch: int, round_number: int, grouping: str = "stable") -> pb.RoundConfig:
    return round_config(index=3, members=5, victim_id=hello.client_id, victim_commitment=bytes(hello.contribution_commitment),
                        sybils=make_sybils([1, 2, 4, 5], tag), round_id=f"hostile-{round_number}", round_number=round_number,
                        epoch=epoch, epoch_rounds=10, grouping=grouping)


def offer(tag: str, epoch: int, round_number: int, grouping: str = "stable"):  # noqa: ANN201
    """A script: this round configuration; if the victim advertises keys (it accepted), end the round there."""

    async def script(stream: Stream) -> None:
        hello = await stream.challenge()
        await stream.send(pb.ServerMessage(round_config=config(hello, tag=tag, epoch=epoch, round_number=round_number, grouping=grouping)))
        await stream.expect("advertise_keys")
        await stream.context.abort(grpc.StatusCode.UNAVAILABLE, "hostile: stop after the keys")

    return script


async def accepted(srv: Any, victim: Any, script: Any) -> None:
    srv.participate = script
    with pytest.raises(Rejected) as info:
        await victim.participate()
    assert info.value.code == "UNAVAILABLE"


@async_test
async def test_regrouping_inside_an_epoch_is_refused_by_the_real_client(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="secagg")
    async with hostile_server(tmp_path) as srv:
        victim = make_victim(srv.address, srv.pki.ca_cert, new_identity_key())
        await accepted(srv, victim, offer("a", epoch=3, round_number=30))       # epoch 3 with members A
        await accepted(srv, victim, offer("a", epoch=3, round_number=31))       # same members, same epoch: fine
        srv.participate = offer("b", epoch=3, round_number=32)                  # the attack: other members, same epoch
        keys_before = srv.kinds().count("advertise_keys")
        with pytest.raises(PolicyRefused) as info:
            await victim.participate()
        exc = info.value
        assert exc.setting == "grouping" and "changed inside epoch 3" in str(exc.offered)
        assert "allow_regrouping" in exc.required and "grouping is changed inside epoch 3" in str(exc)
        assert srv.kinds().count("advertise_keys") == keys_before                # refused before any key
        assert_no_secrets(victim, str(exc), caplog.text)
        await accepted(srv, victim, offer("b", epoch=4, round_number=40))       # a new epoch may bring new members
        await victim.client.close()


@async_test
async def test_an_app_that_allows_regrouping_accepts_it(tmp_path: Path) -> None:
    """Control: the same attack against allow_regrouping=True goes on (the refusal is the policy's doing)."""
    async with hostile_server(tmp_path) as srv:
        victim = make_victim(srv.address, srv.pki.ca_cert, new_identity_key(), policy=ClientPolicy(allow_regrouping=True))
        await accepted(srv, victim, offer("a", epoch=3, round_number=30))
        await accepted(srv, victim, offer("b", epoch=3, round_number=31))
        await accepted(srv, victim, offer("c", epoch=3, round_number=32, grouping="reshuffle"))
        await victim.client.close()


@pytest.mark.parametrize("grouping", ["reshuffle", ""])
@async_test
async def test_reshuffled_or_unstated_grouping_is_refused_by_default(tmp_path: Path, grouping: str) -> None:
    async with hostile_server(tmp_path) as srv:
        victim = make_victim(srv.address, srv.pki.ca_cert, new_identity_key())
        srv.participate = offer("a", epoch=0, round_number=0, grouping=grouping)
        with pytest.raises(PolicyRefused) as info:
            await victim.participate()
        assert info.value.setting == "grouping" and info.value.offered == (grouping or "unstated")
        assert "allow_regrouping=True" in info.value.required
        assert srv.kinds() == ["hello", "abort"]
        await victim.client.close()
