"""What lets a round grow: lazy client inputs, deadlines that scale with the round's work,
words on the wire at the modulus width, and the per-phase bound ratios ``secagg simulate`` reports."""

from __future__ import annotations

import asyncio

from grpc_harness import async_test, running_server, seed_of, update_of
from secagg.protocol.messages import Phase


# ---- lazy inputs -------------------------------------------------------------------------------
@async_test
async def test_lazy_inputs_give_the_same_aggregate_as_eager_ones_for_the_same_seeds(tmp_path):
    """Round 0: vectors handed over up front.  Round 1: the same vectors, built by callables only when
    the masked input is due, one client at a time (one shared slot).  Same inputs and rounding seeds,
    so the two aggregates must be bit-identical, whatever the fresh masks of each round."""
    n = 5
    async with running_server(tmp_path, n, rounds=2) as h:
        ids = [f"c{i}" for i in range(n)]
        eager = await h.participate(ids)
        assert all(o.ok for o in eager.values()), eager
        first = h.record()

        slots = asyncio.Semaphore(1)
        holding = 0
        seen_phases: dict[str, list[Phase]] = {c: [] for c in ids}
        built_after: dict[str, list[Phase]] = {}

        def lazy_update(c: str):
            async def build(info):
                nonlocal holding
                built_after[c] = list(seen_phases[c])
                holding += 1
                assert holding == 1, "two clients built their vectors while holding one slot"
                await asyncio.sleep(0)   # let the others run: they must wait for the slot
                holding -= 1
                return update_of(c, info.dim)
            return build

        async def one(c: str):
            return await h.client(c).participate(lazy_update(c), rounding_seed=seed_of(c), vector_slots=slots,
                                                 on_phase=seen_phases[c].append)

        lazy = dict(zip(ids, await asyncio.gather(*(one(c) for c in ids))))
        assert all(o.ok for o in lazy.values()), lazy
        second = h.record()
        assert second.round_id != first.round_id
        assert second.aggregate_digest == first.aggregate_digest
        # each vector was built after its client had sent both key messages, never before
        assert all(built_after[c] == [Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS] for c in ids), built_after
        assert {o.aggregate_digest for o in (*eager.values(), *lazy.values())} == {first.aggregate_digest}
