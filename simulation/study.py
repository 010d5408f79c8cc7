"""Studies: sweep group size x rule x attack x ... x seeds, then tables and a plot.

Each run is one ``run_in_memory`` (or, with ``backend="grpc"``, one multi-process simulation)
and yields one row.  A grid is a ``StudyGrid``; ``expand`` turns it into ``RunSpec``s, with
every clean combination (attack ``none`` or no Byzantine clients) run once, whatever attack
it was listed under.  ``write_outputs`` writes ``runs.csv``, ``summary.csv``,
``worst_case.csv``/``.md`` and ``accuracy_vs_group_size.png``.

Attacks are tokens ``NAME`` or ``NAME:FIELD=VALUE[:FIELD=VALUE...]`` over the fields of
``AttackConfig``, e.g. ``scaling:scale=-100`` (a sign flip boosted until the client library's
clip makes it exactly B long) or ``alie:alie_z=10``.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secagg.protocol.robust import RULES

from .attacks import ATTACKS, AttackConfig, normalize_attack_name
from .fl import TAIL_ROUNDS, FLConfig, run_in_memory
from .study_plot import plot_accuracy

__all__ = [
    "DEFAULT",
    "QUICK",
    "RunSpec",
    "StudyGrid",
    "expand",
    "grid_from_mapping",
    "parse_attack",
    "run_spec",
    "run_study",
    "summarize",
    "worst_case",
    "write_outputs",
]

_ATTACK_FIELDS = {f.name: f.type for f in dataclasses.fields(AttackConfig) if f.name != "name"}
LIST_KEYS = ("group_sizes", "rules", "attacks", "byzantine", "dropout", "bypass_bounds", "non_iid", "momentum", "bucket")
SCALAR_KEYS = ("seeds", "rounds", "clients", "model", "clip_norm", "lr", "mode", "task", "hidden", "local_epochs",
               "local_momentum", "assumed_byzantine", "server_lr")
TABLE_KEYS = ("rule_params",)


#: Centered clipping as the study runs it: one iteration from the previous aggregate (with
#: worker momentum one suffices, Karimireddy, He, Jaggi 2021), tau fixed (see docs/study.md).
CCLIP = {"centered_clipping": {"tau": 1.0, "iters": 1}}


@dataclass(frozen=True)
class StudyGrid:
    group_sizes: tuple[int, ...] = (1, 5)
    rules: tuple[str, ...] = ("mean", "median", "trimmed_mean", "krum", "centered_clipping")
    attacks: tuple[str, ...] = ("none", "alie", "ipm", "takeover", "fang_krum", "fang_trim", "min_max", "min_sum")
    byzantine: tuple[float, ...] = (0.2,)
    dropout: tuple[float, ...] = (0.0,)
    bypass_bounds: tuple[bool, ...] = (False, True)
    non_iid: tuple[float | None, ...] = (1.0, 0.1)   # Dirichlet alphas; None = IID
    momentum: tuple[float, ...] = (0.9,)             # worker momentum beta
    bucket: tuple[int, ...] = (1, 2)                 # bucketing size s
    seeds: int = 5
    rounds: int = 30
    clients: int = 25
    model: str = "mlp"
    clip_norm: float = 10.0
    lr: float = 0.1
    mode: str = "semi-honest"
    task: str = "mnist"
    hidden: int = 32
    local_epochs: int = 2
    local_momentum: float = 0.9
    assumed_byzantine: float = 0.2
    server_lr: float = 1.0
    rule_params: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: dict(CCLIP))   # rule -> its parameters

    def validate(self) -> StudyGrid:
        """Raise ValueError (one line, naming the key) for anything a run would reject."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for key in LIST_KEYS:
            need(len(getattr(self, key)) > 0, f"{key} must list at least one value")
        need(_is_int(self.clients) and self.clients >= 2, f"clients must be an integer >= 2, got {self.clients!r}")
        need(_is_int(self.seeds) and self.seeds >= 1, f"seeds must be an integer >= 1, got {self.seeds!r}")
        need(_is_int(self.rounds) and self.rounds >= 1, f"rounds must be an integer >= 1, got {self.rounds!r}")
        for g in self.group_sizes:
            need(_is_int(g) and 1 <= g <= self.clients, f"group size {g!r} must be an integer in 1..clients ({self.clients})")
        for r in self.rules:
            need(r in RULES, f"unknown rule {r!r}; choose from {', '.join(RULES)}")
        for a in self.attacks:
            parse_attack(a)
        for b in self.byzantine:
            need(_is_real(b) and 0.0 <= b < 1.0, f"byzantine fraction {b!r} must be in [0, 1)")
        for d in self.dropout:
            need(_is_real(d) and 0.0 <= d < 1.0, f"dropout fraction {d!r} must be in [0, 1)")
        for v in self.bypass_bounds:
            need(isinstance(v, bool), f"bypass_bounds values must be true or false, got {v!r}")
        for a in self.non_iid:
            need(a is None or (_is_real(a) and a > 0), f"non_iid value {a!r} must be a Dirichlet alpha > 0 (or iid)")
        for m in self.momentum:
            need(_is_real(m) and 0.0 <= m < 1.0, f"momentum {m!r} must be in [0, 1)")
        for b in self.bucket:
            need(_is_int(b) and b >= 1, f"bucket size {b!r} must be an integer >= 1")
        for r in self.rule_params:
            need(r in RULES, f"rule_params names unknown rule {r!r}")
        # let FLConfig check the rest (model, non_iid, clip_norm, lr, mode, precision overflow)
        for spec in expand(self):
            spec.fl_config()
        return self


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: The default grid of ``secagg study``: MNIST, 25 clients, 30 rounds (clean accuracy within 2
#: points of the plateau, docs/study.md), 5 seeds; thousands of runs, hours on 2 cores.
DEFAULT = StudyGrid()

#: ``secagg study --quick``: the same questions on the fast digits task (under 3 minutes on 2 cores).
QUICK = StudyGrid(
    group_sizes=(1, 5),
    rules=("mean", "median", "krum", "centered_clipping"),
    attacks=("none", "alie", "ipm", "takeover", "min_max"),
    byzantine=(0.2,),
    bypass_bounds=(False, True),
    non_iid=(0.3,),
    momentum=(0.9,),
    bucket=(1,),
    seeds=2,
    rounds=15,
    clients=25,
    model="softmax",
    clip_norm=5.0,
    lr=0.5,
    task="digits",
    hidden=32,
    local_epochs=1,
    local_momentum=0.0,
    rule_params={"centered_clipping": {"tau": 0.5, "iters": 1}},
)


def parse_attack(token: str) -> AttackConfig:
    """``NAME`` or ``NAME:FIELD=VALUE[:FIELD=VALUE...]`` -> AttackConfig (ValueError if malformed)."""
    if not isinstance(token, str) or not token.strip():
        raise ValueError(f"attack must be a non-empty string, got {token!r}")
    name, *params = token.strip().split(":")
    name = normalize_attack_name(name)
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r} in {token!r}; choose from {', '.join(ATTACKS)}")
    kw: dict[str, Any] = {}
    for p in params:
        key, sep, raw = p.partition("=")
        if not sep or key not in _ATTACK_FIELDS:
            raise ValueError(f"attack parameter {p!r} in {token!r} must be FIELD=VALUE with FIELD one of "
                             f"{', '.join(_ATTACK_FIELDS)}")
        try:
            if key == "backdoor_target":
                kw[key] = int(raw)
            elif key == "alie_z" and raw.lower() == "none":
                kw[key] = None
            else:
                kw[key] = float(raw)
        except ValueError:
            raise ValueError(f"attack parameter {key} in {token!r} must be a number, got {raw!r}") from None
    return AttackConfig(name=name, **kw)


def _canonical_attack(token: Any) -> Any:
    """``sign-flip:scale=2`` -> ``sign_flip:scale=2``: one spelling in the tables whichever was typed."""
    if not isinstance(token, str):
        return token
    name, sep, rest = token.strip().partition(":")
    return normalize_attack_name(name) + sep + rest


def grid_from_mapping(values: Mapping[str, Any], base: StudyGrid = DEFAULT, *, source: str = "grid") -> StudyGrid:
    """Overlay ``values`` (a parsed TOML file, or flags) on ``base``; unknown keys are an error."""
    allowed = LIST_KEYS + SCALAR_KEYS + TABLE_KEYS
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    kw: dict[str, Any] = {}
    for key, v in values.items():
        if key in LIST_KEYS and key != "non_iid":
            if not isinstance(v, (list, tuple)):
                raise ValueError(f"{source}: {key} must be a list, got {v!r}")
            kw[key] = tuple(_canonical_attack(t) for t in v) if key == "attacks" else tuple(v)
        elif key == "non_iid":  # TOML has no null: 0, false or "iid" mean IID; a scalar is a one-value list
            vals = v if isinstance(v, (list, tuple)) else [v]
            kw[key] = tuple(None if a in (0, False, "iid", "none", None) else a for a in vals)
        elif key == "rule_params":
            if not isinstance(v, Mapping) or not all(isinstance(p, Mapping) for p in v.values()):
                raise ValueError(f"{source}: rule_params must be a table of tables, e.g. [rule_params.trimmed_mean] trim = 2")
            kw[key] = {str(r): dict(p) for r, p in v.items()}
        else:
            kw[key] = v
    return dataclasses.replace(base, **kw)


@dataclass(frozen=True)
class RunSpec:
    group_size: int
    rule: str
    attack: str
    byzantine: float
    dropout: float
    bypass_bounds: bool
    seed: int
    clients: int
    rounds: int
    model: str
    non_iid: float | None
    clip_norm: float
    lr: float
    mode: str
    rule_params: tuple[tuple[str, Any], ...] = ()
    momentum: float = 0.0
    bucket: int = 1
    task: str = "digits"
    hidden: int = 32
    local_epochs: int = 1
    local_momentum: float = 0.0
    assumed_byzantine: float = 0.2
    server_lr: float = 1.0

    @property
    def groups(self) -> int:
        return self.clients // self.group_size

    def fl_config(self) -> FLConfig:
        return FLConfig(clients=self.clients, rounds=self.rounds, groups=self.groups, model=self.model,
                        non_iid=self.non_iid, attack=parse_attack(self.attack), byzantine=self.byzantine,
                        bypass_bounds=self.bypass_bounds, clip_norm=self.clip_norm, lr=self.lr, rule=self.rule,
                        rule_params=dict(self.rule_params), dropout=self.dropout, mode=self.mode, seed=self.seed,
                        momentum=self.momentum, bucket=self.bucket, task=self.task, hidden=self.hidden,
                        local_epochs=self.local_epochs, local_momentum=self.local_momentum,
                        assumed_byzantine=self.assumed_byzantine, server_lr=self.server_lr)

    def label(self) -> str:
        extra = "" if self.attack == "none" else f" byz {self.byzantine:g}{' takeover' if self.bypass_bounds else ''}"
        drop = f" drop {self.dropout:g}" if self.dropout else ""
        knobs = f" s={self.bucket}" if self.bucket > 1 else ""
        knobs += f" beta={self.momentum:g}" if self.momentum else ""
        split = "iid" if self.non_iid is None else f"alpha={self.non_iid:g}"
        return f"g={self.group_size} {split} {self.rule}{knobs} {self.attack}{extra}{drop} seed {self.seed}"


def expand(grid: StudyGrid) -> list[RunSpec]:
    """Every distinct run of the grid, seeds innermost; clean combinations appear once."""
    out: list[RunSpec] = []
    seen: set[RunSpec] = set()
    for attack in grid.attacks:
        for byz in grid.byzantine:
            for bypass in grid.bypass_bounds:
                clean = parse_attack(attack).name == "none" or byz == 0
                a, b, bp = ("none", 0.0, False) if clean else (attack, float(byz), bool(bypass))
                for g, rule, drop, alpha, mom, s, seed in itertools.product(
                        grid.group_sizes, grid.rules, grid.dropout, grid.non_iid, grid.momentum, grid.bucket,
                        range(grid.seeds)):
                    spec = RunSpec(group_size=int(g), rule=rule, attack=a, byzantine=b, dropout=float(drop),
                                   bypass_bounds=bp, seed=seed, clients=grid.clients, rounds=grid.rounds,
                                   model=grid.model, non_iid=alpha, clip_norm=float(grid.clip_norm),
                                   lr=float(grid.lr), mode=grid.mode,
                                   rule_params=tuple(sorted(dict(grid.rule_params.get(rule, {})).items())),
                                   momentum=float(mom), bucket=int(s), task=grid.task, hidden=grid.hidden,
                                   local_epochs=grid.local_epochs, local_momentum=float(grid.local_momentum),
                                   assumed_byzantine=float(grid.assumed_byzantine), server_lr=float(grid.server_lr))
                    if spec not in seen:
                        seen.add(spec)
                        out.append(spec)
    return out


# ------------------------------------------------------------------------------------ running

ROW_FIELDS = ("group_size", "groups", "rule", "attack", "byzantine", "dropout", "bypass_bounds", "seed", "clients",
              "rounds", "task", "model", "non_iid", "momentum", "bucket", "backend", "final_accuracy", "worst_accuracy",
              "minority_accuracy", "backdoor_asr", "rejected_groups", "aborted_groups", "seconds")


def _axes(spec: RunSpec, backend: str) -> dict[str, Any]:
    return {"group_size": spec.group_size, "groups": spec.groups, "rule": spec.rule, "attack": spec.attack,
            "byzantine": spec.byzantine, "dropout": spec.dropout, "bypass_bounds": spec.bypass_bounds,
            "seed": spec.seed, "clients": spec.clients, "rounds": spec.rounds, "task": spec.task, "model": spec.model,
            "non_iid": spec.non_iid, "momentum": spec.momentum, "bucket": spec.bucket, "backend": backend}


def run_spec(spec: RunSpec) -> dict[str, Any]:
    """One in-memory run -> one row (top level so a process pool can call it)."""
    res = run_in_memory(spec.fl_config())
    return {**_axes(spec, "memory"), "final_accuracy": res.final_accuracy, "worst_accuracy": res.worst_accuracy,
            "minority_accuracy": res.minority_accuracy, "backdoor_asr": res.final_backdoor_asr,
            "rejected_groups": res.rejected_total, "aborted_groups": res.aborted_total, "seconds": res.seconds}


def run_spec_grpc(spec: RunSpec) -> dict[str, Any]:
    """One multi-process gRPC simulation of the same configuration -> one row."""
    from secagg.simulation.simulate import SimConfig, run_simulation

    if ":" in spec.attack:
        raise ValueError(f"the gRPC simulator takes attack names only, not {spec.attack!r}")
    t0 = time.perf_counter()
    cfg = SimConfig(clients=spec.clients, rounds=spec.rounds, dropout=spec.dropout, groups=spec.groups, mode=spec.mode,
                    seed=spec.seed, clip_norm=spec.clip_norm, task="digits", rule=spec.rule, attack=spec.attack,
                    byzantine=spec.byzantine, bypass_bounds=spec.bypass_bounds, non_iid=spec.non_iid,
                    fl={"model": spec.model, "lr": spec.lr, "rule_params": dict(spec.rule_params)}).validate()
    summary = run_simulation(cfg)
    acc = [float(r["accuracy"]) for r in summary["rounds"] if r.get("accuracy") is not None]
    asr = [float(r["backdoor_asr"]) for r in summary["rounds"] if r.get("backdoor_asr") is not None]
    return {**_axes(spec, "grpc"), "final_accuracy": acc[-1] if acc else math.nan,
            "worst_accuracy": min(acc[-TAIL_ROUNDS:]) if acc else math.nan, "backdoor_asr": asr[-1] if asr else None,
            "rejected_groups": sum(len(r["rejected_groups"]) for r in summary["rounds"]),
            "aborted_groups": None,  # the gRPC summary records rounds' outcomes, not aborted groups
            "seconds": time.perf_counter() - t0}


def run_study(specs: Sequence[RunSpec], *, jobs: int = 1, grpc: bool = False,
              on_row: Callable[[RunSpec, dict[str, Any]], None] | None = None,
              executor: Executor | None = None) -> list[dict[str, Any]]:
    """Run every spec (``jobs`` worker processes for in-memory runs, or every run through
    ``executor``, e.g. ``ray_backend.RayExecutor``, which the caller shuts down); rows come back in spec order."""
    runner = run_spec_grpc if grpc else run_spec
    rows: dict[int, dict[str, Any]] = {}
    if executor is None and (jobs <= 1 or grpc or len(specs) < 4 * jobs):  # a small grid is not worth starting workers for
        for i, spec in enumerate(specs):
            rows[i] = runner(spec)
            if on_row:
                on_row(spec, rows[i])
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with nullcontext(executor) if executor else ProcessPoolExecutor(max_workers=min(jobs, len(specs)),
                                                                         mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(runner, spec): i for i, spec in enumerate(specs)}
            for fut in as_completed(futures):
                i = futures[fut]
                rows[i] = fut.result()
                if on_row:
                    on_row(specs[i], rows[i])
    return [rows[i] for i in range(len(specs))]


# ------------------------------------------------------------------------------------ tables

GROUP_KEYS = ("group_size", "groups", "rule", "attack", "byzantine", "dropout", "bypass_bounds", "clients", "rounds",
              "task", "model", "non_iid", "momentum", "bucket", "backend")
SUMMARY_FIELDS = GROUP_KEYS + ("seeds", "final_accuracy_mean", "final_accuracy_ci95", "final_accuracy_std",
                               "final_accuracy_min", "worst_accuracy_min", "minority_accuracy_mean",
                               "minority_accuracy_ci95", "backdoor_asr_mean", "rejected_groups_mean", "seconds_mean")


def ci95(xs: Sequence[float]) -> float:
    """Half-width of the 95% confidence interval of the mean: t_{0.975, k-1} * s / sqrt(k)
    (Student t, sample std); 0 for one value, since one seed gives no interval."""
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    if len(vals) < 2:
        return 0.0
    from scipy.stats import t  # scipy comes with scikit-learn (the sim extra)

    return float(t.ppf(0.975, len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals)))


def _mean(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.fmean(xs) if xs else math.nan


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: statistics over its seeds."""
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in GROUP_KEYS)].append(r)
    out = []
    for key, rs in groups.items():
        acc = [r["final_accuracy"] for r in rs]
        asr = [r["backdoor_asr"] for r in rs if r["backdoor_asr"] is not None]
        minority = [r.get("minority_accuracy") for r in rs]
        out.append({**dict(zip(GROUP_KEYS, key)), "seeds": len(rs), "final_accuracy_mean": _mean(acc),
                    "final_accuracy_ci95": ci95(acc),
                    "minority_accuracy_mean": _mean(minority), "minority_accuracy_ci95": ci95(minority),
                    "final_accuracy_std": statistics.pstdev(acc) if len(acc) > 1 else 0.0,
                    "final_accuracy_min": min(acc), "worst_accuracy_min": min(r["worst_accuracy"] for r in rs),
                    "backdoor_asr_mean": _mean(asr) if asr else None,
                    "rejected_groups_mean": _mean(r["rejected_groups"] for r in rs),
                    "seconds_mean": _mean(r["seconds"] for r in rs)})
    return out


WORST_FIELDS = ("rule", "attack", "runs", "worst_final_accuracy", "group_size", "byzantine", "dropout",
                "bypass_bounds", "seed", "clean_accuracy")


def worst_case(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """rule x attack -> the lowest final accuracy over group sizes, fractions, bypass and seeds,
    with where it happened and the clean (attack none) mean accuracy of that rule for reference."""
    cells: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["rule"], r["attack"])].append(r)
    clean = {rule: _mean(r["final_accuracy"] for r in rs) for (rule, att), rs in cells.items() if att == "none"}
    out = []
    for (rule, attack), rs in cells.items():
        w = min(rs, key=lambda r: (r["final_accuracy"], r["group_size"], r["seed"]))
        out.append({"rule": rule, "attack": attack, "runs": len(rs), "worst_final_accuracy": w["final_accuracy"],
                    "group_size": w["group_size"], "byzantine": w["byzantine"], "dropout": w["dropout"],
                    "bypass_bounds": w["bypass_bounds"], "seed": w["seed"], "clean_accuracy": clean.get(rule)})
    return out


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    vals = list(dict.fromkeys(values))
    return sorted(vals, key=lambda v: (order.index(v) if v in order else len(order), v))


def worst_case_markdown(worst: Sequence[Mapping[str, Any]], rules: Sequence[str] = (), attacks: Sequence[str] = ()) -> str:
    """The worst-case table as Markdown: rules down, attacks across, 'accuracy (g=size)' cells."""
    rs = _ordered((w["rule"] for w in worst), rules)
    ats = _ordered((w["attack"] for w in worst), attacks)
    cell = {(w["rule"], w["attack"]): w for w in worst}
    lines = ["| rule | " + " | ".join(f"`{a}`" for a in ats) + " |", "|---|" + "---:|" * len(ats)]
    for r in rs:
        row = []
        for a in ats:
            w = cell.get((r, a))
            if w is None:
                row.append("–")
            else:
                where = f"g={w['group_size']}" + (", takeover" if w["bypass_bounds"] else "")
                row.append(f"{w['worst_final_accuracy']:.3f} ({where})")
        lines.append(f"| {r} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def _write_csv(path: Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields))
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in fields})


WORST_OVER_ATTACKS_FIELDS = ("rule", "non_iid", "group_size", "bucket", "momentum", "bypass_bounds", "byzantine",
                             "dropout", "seeds", "clean_accuracy", "clean_minority_accuracy", "worst_attack",
                             "worst_accuracy_mean", "worst_accuracy_ci95")


def worst_over_attacks(summary: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per rule and setting: the attack with the lowest seed-mean accuracy, its mean and 95% CI,
    beside the clean accuracy (and the minorities' clean accuracy) of the same rule and setting."""
    def setting(s: Mapping[str, Any]) -> tuple:
        return (s["rule"], s.get("non_iid"), s["group_size"], s.get("bucket"), s.get("momentum"))

    clean = {setting(s): s for s in summary if s["attack"] == "none"}
    cells: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for s in summary:
        if s["attack"] != "none":
            cells[setting(s) + (s["bypass_bounds"], s["byzantine"], s["dropout"])].append(s)
    out = []
    for key, ss in cells.items():
        w = min(ss, key=lambda s: (s["final_accuracy_mean"], s["attack"]))
        c = clean.get(key[:5], {})
        out.append({"rule": key[0], "non_iid": key[1], "group_size": key[2], "bucket": key[3], "momentum": key[4],
                    "bypass_bounds": key[5], "byzantine": key[6], "dropout": key[7], "seeds": w["seeds"],
                    "clean_accuracy": c.get("final_accuracy_mean"), "clean_minority_accuracy": c.get("minority_accuracy_mean"),
                    "worst_attack": w["attack"], "worst_accuracy_mean": w["final_accuracy_mean"],
                    "worst_accuracy_ci95": w["final_accuracy_ci95"]})
    return sorted(out, key=lambda r: (str(r["non_iid"]), r["group_size"], r["bypass_bounds"], r["bucket"], r["rule"]))


def worst_over_attacks_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The worst-over-attacks table as Markdown, one line per rule and setting."""
    lines = ["| split | group size | attackers | bucket s | rule | clean | clean, minorities | worst attack | "
             "worst accuracy (95% CI) |", "|---|---:|---|---:|---|---:|---:|---|---:|"]
    for r in rows:
        split = "IID" if r["non_iid"] is None else f"alpha={r['non_iid']:g}"
        clean = "–" if r["clean_accuracy"] is None else f"{r['clean_accuracy']:.3f}"
        cmin = "–" if r["clean_minority_accuracy"] is None else f"{r['clean_minority_accuracy']:.3f}"
        lines.append(f"| {split} | {r['group_size']} | {'takeover' if r['bypass_bounds'] else 'bounded'} | {r['bucket']} | "
                     f"{r['rule']} | {clean} | {cmin} | `{r['worst_attack']}` | "
                     f"{r['worst_accuracy_mean']:.3f} ± {r['worst_accuracy_ci95']:.3f} |")
    return "\n".join(lines) + "\n"


def write_outputs(rows: Sequence[Mapping[str, Any]], out: Path, *, grid: StudyGrid | None = None) -> dict[str, Path]:
    """Write runs.csv, summary.csv, worst_case.csv/.md and the plot into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    rules = grid.rules if grid else ()
    attacks = grid.attacks if grid else ()
    summary = summarize(rows)
    worst = worst_case(rows)
    over = worst_over_attacks(summary)
    paths = {name: out / name for name in ("runs.csv", "summary.csv", "worst_case.csv", "worst_case.md",
                                           "worst_over_attacks.csv", "worst_over_attacks.md",
                                           "accuracy_vs_group_size.png")}
    _write_csv(paths["runs.csv"], ROW_FIELDS, rows)
    _write_csv(paths["summary.csv"], SUMMARY_FIELDS, summary)
    _write_csv(paths["worst_case.csv"], WORST_FIELDS, worst)
    _write_csv(paths["worst_over_attacks.csv"], WORST_OVER_ATTACKS_FIELDS, over)
    title = ""
    if rows:
        r0 = rows[0]
        seeds = len({r["seed"] for r in rows})
        byz = sorted({r["byzantine"] for r in rows if r["attack"] != "none"})
        title = (f"{r0.get('task', 'digits')}, {r0['model']}, {r0['clients']} clients, {r0['rounds']} rounds, "
                 f"{', '.join(f'{b:.0%}' for b in byz) or 'no'} Byzantine; 95% CI over {seeds} seed(s)")
    paths["worst_over_attacks.md"].write_text("\n".join([
        "# Worst case over attacks", "", "Per rule and setting, the attack with the lowest mean final accuracy over "
        "seeds (95% confidence interval), beside the clean accuracy of the same rule and setting and the clean "
        "accuracy seen by the honest minorities (the 20% of honest clients whose labels are rarest).", "", title, "",
        worst_over_attacks_markdown(over)]))
    intro = ("Lowest final test accuracy of each rule under each attack, over every group size, Byzantine fraction, "
             "dropout rate, bypass setting and seed in the study (in brackets: the group size where it happened). "
             "The `none` column is the clean run.")
    md = ["# Worst-case final accuracy", "", intro, "", title, "", worst_case_markdown(worst, rules, attacks)]
    paths["worst_case.md"].write_text("\n".join(md))
    plot_accuracy(summary, paths["accuracy_vs_group_size.png"], rules=rules, attacks=attacks, title=title)
    return paths
