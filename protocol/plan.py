"""The round plan: who is in a round's cohort and how it is grouped, from recorded values only.

One pure function, ``make_plan``, decides what a round *is*; the gRPC coordinator and the
in-memory federation both execute its result and neither re-derives it.  Everything it draws
comes from SHA-256 over recorded inputs (the epoch seed, the round number, client ids), never
from ``random`` or numpy, so anyone holding a round record (``RoundPlan.record()``) can recompute
the assignment with ``recompute(record)`` and compare it with what the server ran.

Grouping policies:

* ``stable`` (the default; batch partitioning, So et al. 2021): the epoch's population is fixed
  at the epoch's first round and cut into ``groups`` groups that stay the same for
  ``epoch_rounds`` rounds.  Every group sum of the epoch is then a sum over the same members, so
  least squares over many rounds cannot separate them.  A group runs only when *all* its epoch
  members are present at the start of the round; a group with a member missing sits out (running
  it with a subset would hand the server that member's update by differencing two rounds).
  Sampling draws whole groups.  Clients that join mid-epoch wait for the next epoch.
* ``reshuffle``: each round is its own epoch; the sampled clients are shuffled and cut anew.
  Group sums of many rounds then identify each client's average update (least squares), which
  is why it is an explicit option only.

Sampling: ``all`` clients present, ``poisson`` (each unit independently with probability
``sample_rate``), or ``fixed`` (exactly ``sample_size`` clients under reshuffle; under stable
grouping exactly ``max(1, round(sample_size * groups / population))`` whole groups).  The unit is
a client under reshuffle and a group under stable grouping; either way each client is included
with probability ``sample_rate`` under Poisson sampling, independently of its data.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

GROUPINGS: tuple[str, ...] = ("stable", "reshuffle")
SAMPLINGS: tuple[str, ...] = ("all", "poisson", "fixed")
SEED_BYTES = 32
MIN_GROUP = 3          # the smallest group a server round runs (the in-memory federation also runs groups of 1 and 2)
PLAN_VERSION = 1


class PlanError(ValueError):
    """Settings or a record from which no plan can be made; the message says which value and why."""


def _h(purpose: str, *parts: bytes | str | int) -> bytes:
    """SHA-256 with domain separation: every field length-prefixed, so no two inputs collide."""
    h = hashlib.sha256(b"secagg/v1 plan|" + purpose.encode())
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        h.update(len(b).to_bytes(4, "big") + b)
    return h.digest()


def round_seed(epoch_seed: bytes, round_number: int) -> bytes:
    """The sampling seed of one round, derived from its epoch's seed (one recorded draw per epoch)."""
    return _h("round", epoch_seed, round_number)


def _below(digest: bytes, rate: float) -> bool:
    """True with probability ``rate`` for a uniform ``digest``: its first 8 bytes as an integer
    against floor(rate * 2^64), exact integer comparison."""
    return int.from_bytes(digest[:8], "big") < math.floor(rate * 2**64)


def shuffle(seed: bytes, ids: Iterable[str]) -> list[str]:
    """``ids`` ordered by SHA-256(seed, id): a permutation anyone with the seed can recompute."""
    return sorted(set(ids), key=lambda c: (_h("order", seed, c), c))


def partition(seed: bytes, ids: Iterable[str], groups: int) -> list[list[str]]:
    """Shuffle ``ids`` with ``seed`` and cut into ``groups`` contiguous parts whose sizes differ by
    at most one (the larger ones first); each part sorted."""
    order = shuffle(seed, ids)
    if groups < 1 or groups > max(len(order), 1):
        raise PlanError(f"cannot cut {len(order)} clients into {groups} groups")
    base, extra = divmod(len(order), groups)
    out, start = [], 0
    for g in range(groups):
        size = base + (g < extra)
        out.append(sorted(order[start : start + size]))
        start += size
    return out


@lru_cache(maxsize=8)
def _epoch_partition(epoch_seed: bytes, population: tuple[str, ...], groups: int) -> tuple[tuple[str, ...], ...]:
    """An epoch's partition, computed once per epoch (it is the same every round of the epoch)."""
    return tuple(tuple(p) for p in partition(epoch_seed, population, groups))


@dataclass(frozen=True)
class PlanSettings:
    """The server settings a plan depends on (the server config and FLConfig both make one)."""

    groups: int = 1
    grouping: str = "stable"
    epoch_rounds: int = 10
    sample_rate: float = 0.0      # Poisson rate q in (0, 1]; 0 = not Poisson
    sample_size: int = 0          # fixed number of clients; 0 = not fixed-size
    min_group: int = MIN_GROUP

    def __post_init__(self) -> None:
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise PlanError(f"groups must be a positive integer, got {self.groups!r}")
        if self.grouping not in GROUPINGS:
            raise PlanError(f"grouping must be one of {', '.join(GROUPINGS)}, got {self.grouping!r}")
        if isinstance(self.epoch_rounds, bool) or not isinstance(self.epoch_rounds, int) or self.epoch_rounds < 1:
            raise PlanError(f"epoch_rounds must be a positive integer, got {self.epoch_rounds!r}")
        if not (isinstance(self.sample_rate, (int, float)) and 0 <= self.sample_rate <= 1):
            raise PlanError(f"sample_rate must be in (0, 1] (or 0 for no Poisson sampling), got {self.sample_rate!r}")
        if isinstance(self.sample_size, bool) or not isinstance(self.sample_size, int) or self.sample_size < 0:
            raise PlanError(f"sample_size must be a non-negative integer (0: no fixed-size sampling), got {self.sample_size!r}")
        if self.sample_rate and self.sample_size:
            raise PlanError("set sample_rate (Poisson) or sample_size (fixed size), not both")
        if isinstance(self.min_group, bool) or not isinstance(self.min_group, int) or self.min_group < 1:
            raise PlanError(f"min_group must be a positive integer, got {self.min_group!r}")

    @property
    def sampling(self) -> str:
        return "poisson" if self.sample_rate else "fixed" if self.sample_size else "all"

    @property
    def rounds_per_epoch(self) -> int:
        return 1 if self.grouping == "reshuffle" else self.epoch_rounds

    def epoch_of(self, round_number: int) -> int:
        return round_number // self.rounds_per_epoch

    def starts_epoch(self, round_number: int) -> bool:
        return round_number % self.rounds_per_epoch == 0

    def as_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "grouping": self.grouping, "epoch_rounds": self.epoch_rounds,
                "sampling": self.sampling, "sample_rate": self.sample_rate, "sample_size": self.sample_size,
                "min_group": self.min_group}


@dataclass(frozen=True)
class RoundPlan:
    """What one round is: its epoch, the epoch's groups, which of them were sampled and which run."""

    settings: PlanSettings
    round_number: int
    epoch: int
    epoch_seed: bytes
    population: tuple[str, ...]                 # the epoch's clients, sorted
    epoch_groups: tuple[tuple[str, ...], ...]   # stable: the epoch's partition; reshuffle: this round's groups
    sampled: tuple[int, ...]                    # indices into epoch_groups drawn by the sampling
    groups: tuple[tuple[str, ...], ...]         # the groups that run, in order
    group_ids: tuple[int, ...]                  # their indices into epoch_groups
    sat_out: Mapping[int, tuple[str, ...]] = field(default_factory=dict)   # sampled group -> absent members
    note: str = ""                              # why fewer groups run than were sampled, if so

    @property
    def cohort(self) -> list[str]:
        return [c for g in self.groups for c in g]

    @property
    def accounting_rate(self) -> float:
        """The sampling rate the accountant may amplify by: Poisson's q, else 1 (fixed-size sampling
        is charged unamplified; see docs/privacy.md)."""
        return float(self.settings.sample_rate) if self.settings.sampling == "poisson" else 1.0

    def member_set(self, client_id: str) -> tuple[str, ...] | None:
        """The epoch group of ``client_id`` (its members, sorted), or None if it is not in the epoch."""
        for g in self.epoch_groups:
            if client_id in g:
                return g
        return None

    def record(self) -> dict[str, Any]:
        """Everything needed to recompute this plan (JSON-able), for the round record."""
        return {
            "version": PLAN_VERSION, **self.settings.as_dict(), "round_number": self.round_number, "epoch": self.epoch,
            "epoch_seed": self.epoch_seed.hex(), "round_seed": round_seed(self.epoch_seed, self.round_number).hex(),
            "population": list(self.population), "population_digest": population_digest(self.population),
            "sampled": list(self.sampled), "group_ids": list(self.group_ids),
            "sat_out": {str(g): list(absent) for g, absent in self.sat_out.items()}, "note": self.note,
            "accounting_rate": self.accounting_rate,
        }


def population_digest(population: Iterable[str]) -> str:
    return _h("population", *sorted(population)).hex()


def _sample_units(settings: PlanSettings, seed: bytes, units: Sequence[str]) -> list[str]:
    """The sampled subset of ``units`` (client ids, or group labels), in the given order."""
    if settings.sampling == "all":
        return list(units)
    if settings.sampling == "poisson":
        return [u for u in units if _below(_h("poisson", seed, u), settings.sample_rate)]
    chosen = set(shuffle(_h("fixed", seed), units)[: settings.sample_size])
    return [u for u in units if u in chosen]


def make_plan(settings: PlanSettings, round_number: int, epoch_seed: bytes, *, present: Collection[str],
              population: Collection[str] | None = None) -> RoundPlan:
    """The plan of round ``round_number``.

    ``present``: the clients connected and waiting now.  ``population``: the epoch's clients, fixed
    at its first round (pass None at an epoch's first round, or under reshuffle: the population is
    then ``present``).  ``epoch_seed``: 32 bytes the server drew with ``secrets`` for the epoch and
    records.  Pure: the same arguments give the same plan.
    """
    if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 0:
        raise PlanError(f"round_number must be a non-negative integer, got {round_number!r}")
    if len(epoch_seed) != SEED_BYTES:
        raise PlanError(f"epoch_seed must be {SEED_BYTES} bytes, got {len(epoch_seed)}")
    here = set(present)
    pop = tuple(sorted(set(population) if population is not None else here))
    seed_r = round_seed(epoch_seed, round_number)
    epoch = settings.epoch_of(round_number)
    if settings.grouping == "reshuffle":
        cohort = _sample_units(settings, seed_r, [c for c in pop if c in here])
        n_groups = min(settings.groups, len(cohort) // settings.min_group)
        if n_groups == 0:
            return RoundPlan(settings, round_number, epoch, epoch_seed, pop, (), (), (), (),
                             note=f"sampled {len(cohort)} of {len(pop)} clients, fewer than the {settings.min_group} a group needs")
        parts = tuple(tuple(p) for p in partition(seed_r, cohort, n_groups))
        ids = tuple(range(len(parts)))
        return RoundPlan(settings, round_number, epoch, epoch_seed, pop, parts, ids, parts, ids)
    n_groups = min(settings.groups, len(pop) // settings.min_group)
    if n_groups == 0:
        return RoundPlan(settings, round_number, epoch, epoch_seed, pop, (), (), (), (),
                         note=f"an epoch of {len(pop)} clients cannot fill one group of {settings.min_group}")
    parts = _epoch_partition(epoch_seed, pop, n_groups)
    labels = [str(g) for g in range(len(parts))]
    if settings.sampling == "fixed":   # whole groups: as many as hold sample_size clients on average
        k = max(1, round(settings.sample_size * len(parts) / len(pop)))
        sampled = sorted(int(g) for g in shuffle(_h("fixed", seed_r), labels)[:k])
    else:
        sampled = [int(g) for g in _sample_units(settings, seed_r, labels)]
    sat_out = {g: tuple(c for c in parts[g] if c not in here) for g in sampled}
    sat_out = {g: absent for g, absent in sat_out.items() if absent}
    run = tuple(g for g in sampled if g not in sat_out)
    note = f"{len(sat_out)} sampled group(s) sat out: members absent" if sat_out else ""
    return RoundPlan(settings, round_number, epoch, epoch_seed, pop, parts, tuple(sampled), tuple(parts[g] for g in run),
                     run, sat_out, note)


def recompute(record: Mapping[str, Any]) -> RoundPlan:
    """The plan a round record describes (``RoundPlan.record()``), recomputed from its seeds and
    population; compare its ``groups`` with the groups the record says ran.  The present set is
    reconstructed as everyone but the recorded absentees: absence is the one input not derived."""
    try:
        settings = PlanSettings(groups=int(record["groups"]), grouping=record["grouping"], epoch_rounds=int(record["epoch_rounds"]),
                                sample_rate=float(record["sample_rate"]), sample_size=int(record["sample_size"]),
                                min_group=int(record.get("min_group", MIN_GROUP)))
        seed = bytes.fromhex(record["epoch_seed"])
        population = list(record["population"])
        absent = {c for ids in record.get("sat_out", {}).values() for c in ids}
        round_number = int(record["round_number"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"round record's plan is incomplete or malformed: {exc}") from None
    if population_digest(population) != record.get("population_digest"):
        raise PlanError("the recorded population does not match its recorded digest")
    plan = make_plan(settings, round_number, seed, present=[c for c in population if c not in absent], population=population)
    if plan.epoch != record.get("epoch"):
        raise PlanError(f"round {round_number} is in epoch {plan.epoch}, the record says {record.get('epoch')}")
    return plan
