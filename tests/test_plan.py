"""The round plan (protocol/plan.py): determinism from recorded seeds, stable groups per epoch,
sampling rates and sizes, sitting out, and recomputation from a record by an independent reader."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from secagg.protocol.plan import PlanError, PlanSettings, make_plan, partition, population_digest, recompute, round_seed

IDS = [f"c{i}" for i in range(60)]


def seed(tag: object) -> bytes:
    return hashlib.sha256(f"test-seed|{tag}".encode()).digest()


def plan(settings: PlanSettings, r: int, s: bytes, present=IDS, population=None):  # noqa: ANN001, ANN201
    return make_plan(settings, r, s, present=present, population=population)


# ---- an independent reader of the documented derivation -------------------------------------
def _h(purpose: str, *parts: bytes | str | int) -> bytes:
    """SHA-256 over b"secagg/v1 plan|" + purpose, then each part as a 4-byte big-endian length and its bytes."""
    data = b"secagg/v1 plan|" + purpose.encode()
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        data += len(b).to_bytes(4, "big") + b
    return hashlib.sha256(data).digest()


def reader_groups(epoch_seed: bytes, population: list[str], groups: int) -> list[list[str]]:
    """What docs/architecture.md says a client computes: sort by SHA-256(order, seed, id), cut in
    near-equal contiguous parts, larger first."""
    order = sorted(population, key=lambda c: _h("order", epoch_seed, c))
    n, out, start = len(order), [], 0
    for g in range(groups):
        size = n // groups + (g < n % groups)
        out.append(sorted(order[start : start + size]))
        start += size
    return out


def test_an_independent_reader_recomputes_the_stable_partition_and_poisson_draw() -> None:
    s = PlanSettings(groups=6, grouping="stable", epoch_rounds=5, sample_rate=0.5)
    p = plan(s, 7, seed("e1"))
    assert [list(g) for g in p.epoch_groups] == reader_groups(seed("e1"), IDS, 6)
    rs = _h("round", seed("e1"), 7)
    assert round_seed(seed("e1"), 7) == rs
    drawn = [g for g in range(6) if int.from_bytes(_h("poisson", rs, str(g))[:8], "big") < math.floor(0.5 * 2**64)]
    assert list(p.sampled) == drawn and list(p.group_ids) == drawn


def test_same_recorded_inputs_same_plan_and_another_seed_another_plan() -> None:
    s = PlanSettings(groups=5, grouping="reshuffle", sample_rate=0.7)
    a, b = plan(s, 3, seed(1)), plan(s, 3, seed(1), present=list(reversed(IDS)))
    assert a == b                                     # the order clients joined in does not matter
    assert plan(s, 3, seed(2)).groups != a.groups
    assert plan(s, 4, seed(1)).groups != a.groups     # the round number is an input of the draw


def test_stable_groups_are_constant_within_an_epoch_and_redrawn_at_its_boundary() -> None:
    s = PlanSettings(groups=6, grouping="stable", epoch_rounds=4)
    seeds = {0: seed("epoch0"), 1: seed("epoch1")}
    plans = [plan(s, r, seeds[s.epoch_of(r)], population=IDS) for r in range(8)]
    assert [p.epoch for p in plans] == [0] * 4 + [1] * 4
    assert all(p.groups == plans[0].groups for p in plans[:4])
    assert all(p.groups == plans[4].groups for p in plans[4:])
    assert set(plans[0].groups) != set(plans[4].groups)
    for p in plans:   # every client in exactly one group, sizes within one of each other
        assert sorted(c for g in p.groups for c in g) == sorted(IDS)
        assert max(map(len, p.groups)) - min(map(len, p.groups)) <= 1


def test_reshuffle_redraws_every_round() -> None:
    s = PlanSettings(groups=6, grouping="reshuffle", epoch_rounds=4)
    groups = [set(plan(s, r, seed(("r", r))).groups) for r in range(4)]
    assert all(groups[i] != groups[j] for i in range(4) for j in range(i))
    assert [plan(s, r, seed(0)).epoch for r in range(3)] == [0, 1, 2]   # each round is its own epoch


@pytest.mark.parametrize("grouping", ["reshuffle", "stable"])
def test_poisson_sampling_includes_each_client_with_probability_q(grouping: str) -> None:
    q, rounds, n = 0.3, 40, 600
    ids = [f"u{i}" for i in range(n)]
    s = PlanSettings(groups=100, grouping=grouping, epoch_rounds=rounds, sample_rate=q, min_group=1)
    counts = {c: 0 for c in ids}
    for r in range(rounds):
        for c in plan(s, r, seed(("p", grouping, r if grouping == "reshuffle" else 0)), present=ids, population=ids).cohort:
            counts[c] += 1
    total, trials = sum(counts.values()), n * rounds
    # stable: whole groups of 6 are drawn, so the count is 6 x Binomial(100 * rounds, q)
    unit = 1 if grouping == "reshuffle" else 6
    sd = unit * math.sqrt((trials / unit) * q * (1 - q))
    assert abs(total - q * trials) < 4 * sd, (total, q * trials, sd)
    # every client's own rate is q too (no client is favoured): per-client counts stay in a 5-sigma band
    band = 5 * math.sqrt(rounds * q * (1 - q))
    assert all(abs(k - q * rounds) < band for k in counts.values())


def test_fixed_size_sampling_is_exact() -> None:
    s = PlanSettings(groups=3, grouping="reshuffle", sample_size=17)
    cohorts = [plan(s, r, seed(("f", r))).cohort for r in range(10)]
    assert all(len(c) == 17 and len(set(c)) == 17 and set(c) <= set(IDS) for c in cohorts)
    assert len({frozenset(c) for c in cohorts}) > 1
    stable = PlanSettings(groups=10, grouping="stable", epoch_rounds=10, sample_size=18)   # 10 groups of 6: 3 whole groups
    runs = [plan(stable, r, seed("stable-fixed"), population=IDS) for r in range(10)]
    assert all(len(p.groups) == 3 and len(p.cohort) == 18 for p in runs)
    assert len({p.group_ids for p in runs}) > 1


def test_a_stable_group_with_an_absent_member_sits_out_and_the_others_run() -> None:
    s = PlanSettings(groups=6, grouping="stable", epoch_rounds=10)
    full = plan(s, 2, seed("e"), population=IDS)
    victim_group = full.groups[1]
    absent = victim_group[0]
    p = plan(s, 2, seed("e"), present=[c for c in IDS if c != absent] + ["newcomer"], population=IDS)
    assert p.sat_out == {1: (absent,)}
    assert victim_group not in p.groups and len(p.groups) == 5
    assert "newcomer" not in p.cohort       # joined mid-epoch: waits for the next epoch
    assert all(c in full.cohort for c in p.cohort)


def test_too_few_clients_give_an_empty_plan_with_a_reason() -> None:
    s = PlanSettings(groups=2, grouping="reshuffle", sample_rate=0.01)
    p = plan(s, 0, seed("tiny"), present=IDS[:5])
    assert p.groups == () and "fewer than the 3 a group needs" in p.note


def test_the_record_recomputes_the_plan_and_survives_json() -> None:
    for s in (PlanSettings(groups=4, grouping="stable", epoch_rounds=3, sample_rate=0.6),
              PlanSettings(groups=4, grouping="reshuffle", sample_size=30)):
        absent = IDS[5]
        p = plan(s, 4, seed(s.grouping), present=[c for c in IDS if c != absent], population=IDS if s.grouping == "stable" else None)
        rec = json.loads(json.dumps(p.record()))
        again = recompute(rec)
        assert again.groups == p.groups and again.group_ids == p.group_ids and again.sat_out == p.sat_out


def test_a_tampered_record_does_not_recompute() -> None:
    s = PlanSettings(groups=4, grouping="stable", epoch_rounds=3)
    rec = plan(s, 1, seed("t"), population=IDS).record()
    with pytest.raises(PlanError, match="does not match its recorded digest"):
        recompute({**rec, "population": rec["population"][:-1]})
    with pytest.raises(PlanError, match="incomplete or malformed"):
        recompute({k: v for k, v in rec.items() if k != "epoch_seed"})
    assert rec["population_digest"] == population_digest(reversed(IDS))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"grouping": "random"}, "grouping must be one of stable, reshuffle"),
    ({"epoch_rounds": 0}, "epoch_rounds must be a positive integer"),
    ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\]"),
    ({"sample_rate": 0.5, "sample_size": 4}, "not both"),
    ({"groups": 0}, "groups must be a positive integer"),
])
def test_bad_settings_are_refused_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        PlanSettings(**kwargs)


def test_partition_refuses_more_groups_than_clients() -> None:
    with pytest.raises(PlanError, match="cannot cut 2 clients into 3 groups"):
        partition(seed(0), ["a", "b"], 3)
