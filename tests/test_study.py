"""``secagg study``: a tiny grid end to end, grid files, and one-line usage errors."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest

from secagg.cli.main import main
from secagg.simulation.study import (DEFAULT, QUICK, StudyGrid, ci95, expand, grid_from_mapping, parse_attack, summarize,
                                     worst_over_attacks)

TINY_BASE = ["--quick", "--clients", "10", "--rounds", "2", "--seeds", "1", "--jobs", "1", "--non-iid", "iid",
             "--bucket", "1"]
TINY = [*TINY_BASE, "--bypass-bounds", "false"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_tiny_grid_writes_tables_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["study", "--out", str(tmp_path), *TINY, "--group-sizes", "1,2", "--rules", "mean,median",
                 "--attacks", "sign_flip", "--byzantine", "0.2"])
    assert code == 0
    runs = _rows(tmp_path / "runs.csv")
    assert len(runs) == 2 * 2 * 1 * 1
    assert {(r["group_size"], r["rule"]) for r in runs} == {("1", "mean"), ("1", "median"), ("2", "mean"), ("2", "median")}
    assert {r["groups"] for r in runs} == {"10", "5"}
    assert all(r["attack"] == "sign_flip" and r["byzantine"] == "0.2" for r in runs)
    assert all(0.0 <= float(r["final_accuracy"]) <= 1.0 for r in runs)
    assert len(_rows(tmp_path / "summary.csv")) == 4
    png = (tmp_path / "accuracy_vs_group_size.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (tmp_path / "worst_case.md").read_text()
    assert "| mean |" in md and "| median |" in md and "`sign_flip`" in md
    worst = _rows(tmp_path / "worst_case.csv")
    assert {(w["rule"], w["attack"]) for w in worst} == {("mean", "sign_flip"), ("median", "sign_flip")}
    out = capsys.readouterr().out
    assert "worst-case" in out and "4 runs" in out


def test_grid_file_then_flags(tmp_path: Path) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text('rules = ["median"]\nattacks = ["none", "scaling:scale=-100"]\nbyzantine = [0.0, 0.2]\n'
                    'group_sizes = [5]\nbypass_bounds = [false, true]\n')
    code = main(["study", "--out", str(tmp_path / "o"), "--config", str(grid), *TINY_BASE, "--group-sizes", "2,5"])
    assert code == 0
    runs = _rows(tmp_path / "o" / "runs.csv")
    # clean points once (none, or byzantine 0), attacked: 2 bypass settings; x 2 group sizes (flag wins)
    assert len(runs) == (1 + 2) * 2
    assert {r["group_size"] for r in runs} == {"2", "5"}
    assert {(r["attack"], r["bypass_bounds"]) for r in runs} == {("none", "False"), ("scaling:scale=-100", "False"),
                                                                ("scaling:scale=-100", "True")}


@pytest.mark.parametrize("bad", [
    ["--rules", "mean,bogus"],
    ["--group-sizes", "0"],
    ["--group-sizes", "1,,2"],
    ["--group-sizes", "11"],
    ["--attacks", "scaling:speed=3"],
    ["--attacks", "teleport"],
    ["--byzantine", "1.5"],
    ["--dropout", "x"],
    ["--bypass-bounds", "maybe"],
    ["--seeds", "0"],
    ["--non-iid", "-1"],
])
def test_bad_values_exit_2_with_one_line(bad: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "--out", str(tmp_path), *TINY, *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("secagg study: error:") and "\n" not in err
    assert not (tmp_path / "runs.csv").exists()


def test_bad_grid_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text("rulez = ['mean']\n")
    assert main(["study", "--out", str(tmp_path), "--config", str(grid)]) == 2
    assert "unknown key(s) rulez" in capsys.readouterr().err
    grid.write_text("rules = [\n")
    assert main(["study", "--out", str(tmp_path), "--config", str(grid)]) == 2
    assert main(["study", "--out", str(tmp_path), "--config", str(tmp_path / "missing.toml")]) == 2


def test_expand_and_attack_tokens() -> None:
    assert parse_attack("alie:alie_z=10").alie_z == 10.0
    assert parse_attack("backdoor:backdoor_target=3:boost=2").backdoor_target == 3
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_attack("alie:z")
    g = StudyGrid(group_sizes=(1, 2), rules=("mean",), attacks=("none", "sign_flip"), byzantine=(0.0, 0.2),
                  bypass_bounds=(False,), seeds=2, non_iid=(None,), bucket=(1,))
    specs = expand(g)
    assert len(specs) == 2 * (1 + 1) * 2 and len(set(specs)) == len(specs)
    assert grid_from_mapping({"non_iid": 0}, g).non_iid == (None,)
    assert grid_from_mapping({"non_iid": [0, 1.0, 0.1]}, g).non_iid == (None, 1.0, 0.1)
    wide = dataclasses.replace(g, non_iid=(1.0, 0.1), bucket=(1, 2), momentum=(0.0, 0.9))
    specs = expand(wide)
    assert len(specs) == 2 * (1 + 1) * 2 * 2 * 2 * 2
    assert {(s.non_iid, s.bucket, s.momentum) for s in specs} == {(a, b, m) for a in (1.0, 0.1) for b in (1, 2)
                                                                  for m in (0.0, 0.9)}
    assert specs[0].fl_config().bucket in (1, 2)
    QUICK.validate()
    DEFAULT.validate()
    assert DEFAULT.seeds >= 5 and {1.0, 0.1} <= set(DEFAULT.non_iid) and True in DEFAULT.bypass_bounds
    assert {"centered_clipping"} <= set(DEFAULT.rules)
    assert {"ipm", "takeover", "fang_krum", "fang_trim", "min_max", "min_sum"} <= set(DEFAULT.attacks)


def test_confidence_interval_and_worst_over_attacks() -> None:
    # t_{0.975, 4} = 2.776445; values 0.1..0.5 have sample std 0.158114
    assert ci95([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2.776445 * 0.158114 / 5**0.5, rel=1e-5)
    assert ci95([0.7]) == 0.0
    base = {"group_size": 1, "groups": 4, "byzantine": 0.2, "dropout": 0.0, "bypass_bounds": False, "clients": 4,
            "rounds": 1, "task": "digits", "model": "softmax", "non_iid": 0.1, "momentum": 0.9, "bucket": 1,
            "backend": "memory", "worst_accuracy": 0.0, "backdoor_asr": None, "rejected_groups": 0,
            "aborted_groups": 0, "seconds": 0.0}
    rows = [{**base, "rule": "median", "attack": a, "seed": s, "final_accuracy": acc, "minority_accuracy": acc - 0.1,
             **({"byzantine": 0.0} if a == "none" else {})}
            for a, accs in (("none", (0.9, 0.8)), ("alie", (0.5, 0.7)), ("ipm", (0.3, 0.2)))
            for s, acc in enumerate(accs)]
    over = worst_over_attacks(summarize(rows))
    assert len(over) == 1
    w = over[0]
    assert w["worst_attack"] == "ipm" and w["worst_accuracy_mean"] == pytest.approx(0.25)
    assert w["clean_accuracy"] == pytest.approx(0.85) and w["clean_minority_accuracy"] == pytest.approx(0.75)
