"""``secagg study``: a tiny grid end to end, grid files, and one-line usage errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from secagg.cli.main import main
from secagg.simulation.study import QUICK, StudyGrid, expand, grid_from_mapping, parse_attack

TINY = ["--clients", "10", "--rounds", "2", "--seeds", "1", "--jobs", "1"]


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
    code = main(["study", "--out", str(tmp_path / "o"), "--config", str(grid), *TINY, "--group-sizes", "2,5"])
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
                  bypass_bounds=(False,), seeds=2)
    specs = expand(g)
    assert len(specs) == 2 * (1 + 1) * 2 and len(set(specs)) == len(specs)
    assert grid_from_mapping({"non_iid": 0}, g).non_iid is None
    QUICK.validate()
