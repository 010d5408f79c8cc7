"""The published shape on a small fixed-seed configuration (digits, 25 clients, groups of 1,
Dirichlet alpha 0.3, worker momentum 0.9, 20% Byzantine, f from the assumed 20%, 15 rounds,
seed 0). Karimireddy, He, Jaggi (ICLR 2022) report it on MNIST; docs/study.md reproduces it
there with 5 seeds. Margins sit well inside the measured gaps noted beside each assertion."""

from __future__ import annotations

from functools import cache

import pytest

from secagg.simulation.attacks import AttackConfig
from secagg.simulation.fl import FLConfig, RunResult, run_in_memory

BASE = dict(clients=25, groups=25, rounds=15, non_iid=0.3, momentum=0.9, lr=0.5, clip_norm=5.0, seed=0,
            assumed_byzantine=0.2)
CCLIP = {"tau": 0.5, "iters": 1}


@cache
def run(rule: str, attack: str, bucket: int = 1) -> RunResult:
    params = CCLIP if rule == "centered_clipping" else {}
    return run_in_memory(FLConfig(**BASE, rule=rule, rule_params=params, attack=AttackConfig(attack),
                                  byzantine=0.0 if attack == "none" else 0.2, bucket=bucket))


@pytest.mark.parametrize(("attack", "margin_median", "margin_krum"), [
    ("alie", 0.03, 0.03),   # measured: CClip 0.809, median 0.751, Krum 0.749
    ("ipm", 0.10, 0.30),    # measured: CClip 0.676, median 0.496, Krum 0.102
])
def test_centered_clipping_with_momentum_beats_median_and_krum_on_non_iid_data(attack: str, margin_median: float,
                                                                              margin_krum: float) -> None:
    cc = run("centered_clipping", attack).final_accuracy
    assert cc >= run("median", attack).final_accuracy + margin_median
    assert cc >= run("krum", attack).final_accuracy + margin_krum


def test_bucketing_helps_median_under_ipm() -> None:
    # measured at seed 0: median 0.496 -> 0.671 with s = 2.  Krum is left out on purpose: at this
    # size its IPM accuracy with bucketing is erratic (seeds 0-2 at s = 2: 0.102 -> 0.102, 0.102 ->
    # 0.120, 0.051 -> 0.473), so no fixed-seed ordering for it would be honest here.
    assert run("median", "ipm", 2).final_accuracy >= run("median", "ipm").final_accuracy + 0.08


def test_robust_rules_serve_the_honest_minorities_worse_than_the_mean_without_attack() -> None:
    # measured minority accuracy without attackers: mean 0.886, median 0.814, Krum 0.542
    mean = run("mean", "none").minority_accuracy
    assert run("median", "none").minority_accuracy <= mean - 0.04
    assert run("krum", "none").minority_accuracy <= mean - 0.2
