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
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secagg.protocol.robust import RULES

from .attacks import ATTACKS, AttackConfig, normalize_attack_name
from .fl import TAIL_ROUNDS, FLConfig, run_in_memory

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
LIST_KEYS = ("group_sizes", "rules", "attacks", "byzantine", "dropout", "bypass_bounds")
SCALAR_KEYS = ("seeds", "rounds", "clients", "model", "non_iid", "clip_norm", "lr", "mode")
TABLE_KEYS = ("rule_params",)


@dataclass(frozen=True)
class StudyGrid:
    group_sizes: tuple[int, ...] = (1, 2, 3, 5, 10, 15)
    rules: tuple[str, ...] = ("mean", "median", "trimmed_mean", "krum", "geometric_median")
    attacks: tuple[str, ...] = ("none", "sign_flip", "alie", "scaling", "alie:alie_z=10", "scaling:scale=-100")
    byzantine: tuple[float, ...] = (0.2,)
    dropout: tuple[float, ...] = (0.0,)
    bypass_bounds: tuple[bool, ...] = (False,)
    seeds: int = 3
    rounds: int = 15
    clients: int = 30
    model: str = "softmax"
    non_iid: float | None = None
    clip_norm: float = 5.0
    lr: float = 0.5
    mode: str = "semi-honest"
    rule_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)   # rule -> its parameters

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


#: The default grid of ``secagg study`` (several minutes).
DEFAULT = StudyGrid()

#: ``secagg study --quick``: the same questions on a smaller grid (about a minute on 2 cores).
QUICK = StudyGrid(
    group_sizes=(1, 2, 5, 10),
    rules=("mean", "median", "trimmed_mean", "krum", "geometric_median"),
    attacks=("none", "sign_flip", "alie:alie_z=10", "scaling:scale=-100"),
    byzantine=(0.2,),
    bypass_bounds=(False, True),
    seeds=2,
    rounds=10,
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
        if key in LIST_KEYS:
            if not isinstance(v, (list, tuple)):
                raise ValueError(f"{source}: {key} must be a list, got {v!r}")
            kw[key] = tuple(_canonical_attack(t) for t in v) if key == "attacks" else tuple(v)
        elif key == "non_iid":  # TOML has no null: 0, false or "iid" mean IID
            kw[key] = None if v in (0, False, "iid", "none", None) else v
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

    @property
    def groups(self) -> int:
        return self.clients // self.group_size

    def fl_config(self) -> FLConfig:
        return FLConfig(clients=self.clients, rounds=self.rounds, groups=self.groups, model=self.model,
                        non_iid=self.non_iid, attack=parse_attack(self.attack), byzantine=self.byzantine,
                        bypass_bounds=self.bypass_bounds, clip_norm=self.clip_norm, lr=self.lr, rule=self.rule,
                        rule_params=dict(self.rule_params), dropout=self.dropout, mode=self.mode, seed=self.seed)

    def label(self) -> str:
        extra = "" if self.attack == "none" else f" byz {self.byzantine:g}{' bypass' if self.bypass_bounds else ''}"
        drop = f" drop {self.dropout:g}" if self.dropout else ""
        return f"g={self.group_size} {self.rule} {self.attack}{extra}{drop} seed {self.seed}"


def expand(grid: StudyGrid) -> list[RunSpec]:
    """Every distinct run of the grid, seeds innermost; clean combinations appear once."""
    out: list[RunSpec] = []
    seen: set[RunSpec] = set()
    for attack in grid.attacks:
        for byz in grid.byzantine:
            for bypass in grid.bypass_bounds:
                clean = parse_attack(attack).name == "none" or byz == 0
                a, b, bp = ("none", 0.0, False) if clean else (attack, float(byz), bool(bypass))
                for g in grid.group_sizes:
                    for rule in grid.rules:
                        for drop in grid.dropout:
                            for seed in range(grid.seeds):
                                spec = RunSpec(group_size=int(g), rule=rule, attack=a, byzantine=b, dropout=float(drop),
                                               bypass_bounds=bp, seed=seed, clients=grid.clients, rounds=grid.rounds,
                                               model=grid.model, non_iid=grid.non_iid, clip_norm=float(grid.clip_norm),
                                               lr=float(grid.lr), mode=grid.mode,
                                               rule_params=tuple(sorted(dict(grid.rule_params.get(rule, {})).items())))
                                if spec not in seen:
                                    seen.add(spec)
                                    out.append(spec)
    return out


# ------------------------------------------------------------------------------------ running

ROW_FIELDS = ("group_size", "groups", "rule", "attack", "byzantine", "dropout", "bypass_bounds", "seed", "clients",
              "rounds", "model", "non_iid", "backend", "final_accuracy", "worst_accuracy", "backdoor_asr",
              "rejected_groups", "aborted_groups", "seconds")


def _axes(spec: RunSpec, backend: str) -> dict[str, Any]:
    return {"group_size": spec.group_size, "groups": spec.groups, "rule": spec.rule, "attack": spec.attack,
            "byzantine": spec.byzantine, "dropout": spec.dropout, "bypass_bounds": spec.bypass_bounds,
            "seed": spec.seed, "clients": spec.clients, "rounds": spec.rounds, "model": spec.model,
            "non_iid": spec.non_iid, "backend": backend}


def run_spec(spec: RunSpec) -> dict[str, Any]:
    """One in-memory run -> one row (top level so a process pool can call it)."""
    res = run_in_memory(spec.fl_config())
    return {**_axes(spec, "memory"), "final_accuracy": res.final_accuracy, "worst_accuracy": res.worst_accuracy,
            "backdoor_asr": res.final_backdoor_asr, "rejected_groups": res.rejected_total,
            "aborted_groups": res.aborted_total, "seconds": res.seconds}


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
              on_row: Callable[[RunSpec, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run every spec (``jobs`` worker processes for in-memory runs); rows come back in spec order."""
    runner = run_spec_grpc if grpc else run_spec
    rows: dict[int, dict[str, Any]] = {}
    if jobs <= 1 or grpc or len(specs) < 4 * jobs:  # a small grid is not worth starting workers for
        for i, spec in enumerate(specs):
            rows[i] = runner(spec)
            if on_row:
                on_row(spec, rows[i])
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(jobs, len(specs)), mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(runner, spec): i for i, spec in enumerate(specs)}
            for fut in as_completed(futures):
                i = futures[fut]
                rows[i] = fut.result()
                if on_row:
                    on_row(specs[i], rows[i])
    return [rows[i] for i in range(len(specs))]


# ------------------------------------------------------------------------------------ tables

GROUP_KEYS = ("group_size", "groups", "rule", "attack", "byzantine", "dropout", "bypass_bounds", "clients", "rounds",
              "model", "non_iid", "backend")
SUMMARY_FIELDS = GROUP_KEYS + ("seeds", "final_accuracy_mean", "final_accuracy_std", "final_accuracy_min",
                               "worst_accuracy_min", "backdoor_asr_mean", "rejected_groups_mean", "seconds_mean")


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
        out.append({**dict(zip(GROUP_KEYS, key)), "seeds": len(rs), "final_accuracy_mean": _mean(acc),
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
                where = f"g={w['group_size']}" + (", bypass" if w["bypass_bounds"] else "")
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


def plot_accuracy(summary: Sequence[Mapping[str, Any]], path: Path, *, rules: Sequence[str] = (), attacks: Sequence[str] = (),
                  title: str = "") -> None:
    """One panel per attack: x = group size (log), y = mean final accuracy over seeds +- std, a line per rule
    (line style per Byzantine fraction / dropout / bypass when several), the clean mean as a grey band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ats = _ordered((s["attack"] for s in summary), attacks)
    rls = _ordered((s["rule"] for s in summary), rules)
    ncol = len(ats) if len(ats) <= 3 else 2 if len(ats) == 4 else 3
    nrow = math.ceil(len(ats) / ncol)
    fig = Figure(figsize=(4.6 * ncol, 3.6 * nrow + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrow, ncol, squeeze=False, sharey=True)
    colors = {r: f"C{i % 10}" for i, r in enumerate(rls)}
    styles = ["-", "--", ":", "-."]
    sizes = sorted({s["group_size"] for s in summary})
    # reference: the clean runs of the plain mean (or, without them, the best clean rule per size)
    clean_rows = [s for s in summary if s["attack"] == "none" and not s["dropout"]]
    ref_rule = "mean" if any(s["rule"] == "mean" for s in clean_rows) else "best rule"
    clean: dict[int, float] = {}
    for s in clean_rows:
        if ref_rule == "best rule" or s["rule"] == "mean":
            clean[s["group_size"]] = max(clean.get(s["group_size"], 0.0), s["final_accuracy_mean"])
    handles: dict[str, Any] = {}
    for k, attack in enumerate(ats):
        ax = axes[k // ncol][k % ncol]
        rows = [s for s in summary if s["attack"] == attack]
        variants = sorted({(s["byzantine"], s["dropout"], s["bypass_bounds"]) for s in rows})
        if clean and attack != "none":
            xs = sorted(clean)
            h = ax.plot(xs, [clean[x] for x in xs], color="0.55", lw=4, alpha=0.35, zorder=0)[0]
            handles.setdefault(f"clean ({ref_rule})", h)
        for v_i, variant in enumerate(variants):
            for rule in rls:
                pts = sorted((s["group_size"], s["final_accuracy_mean"], s["final_accuracy_std"]) for s in rows
                             if s["rule"] == rule and (s["byzantine"], s["dropout"], s["bypass_bounds"]) == variant)
                if not pts:
                    continue
                x, y, e = zip(*pts)
                h = ax.errorbar(x, y, yerr=e, color=colors[rule], ls=styles[v_i % len(styles)], marker="o", ms=3.5,
                                capsize=2.5, lw=1.4, alpha=0.9)
                handles.setdefault(rule, h)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        sub = "clean" if attack == "none" else attack
        if len(variants) > 1 or attack != "none":
            sub += "\n" + ", ".join(_variant_label(v) + f" ({styles[i % len(styles)]})" for i, v in enumerate(variants))
        ax.set_title(sub, fontsize=9)
        if k % ncol == 0:
            ax.set_ylabel("final test accuracy")
        if k // ncol == nrow - 1:
            ax.set_xlabel("group size (clients per secure-aggregation group)")
    for k in range(len(ats), nrow * ncol):
        axes[k // ncol][k % ncol].set_visible(False)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 6), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


def _variant_label(v: tuple[float, float, bool]) -> str:
    byz, drop, bypass = v
    parts = [f"byz {byz:g}" if byz else "no attackers"]
    if drop:
        parts.append(f"dropout {drop:g}")
    parts.append("bypass" if bypass else "bounded")
    return " ".join(parts)


def write_outputs(rows: Sequence[Mapping[str, Any]], out: Path, *, grid: StudyGrid | None = None) -> dict[str, Path]:
    """Write runs.csv, summary.csv, worst_case.csv/.md and the plot into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    rules = grid.rules if grid else ()
    attacks = grid.attacks if grid else ()
    summary = summarize(rows)
    worst = worst_case(rows)
    paths = {name: out / name for name in ("runs.csv", "summary.csv", "worst_case.csv", "worst_case.md",
                                           "accuracy_vs_group_size.png")}
    _write_csv(paths["runs.csv"], ROW_FIELDS, rows)
    _write_csv(paths["summary.csv"], SUMMARY_FIELDS, summary)
    _write_csv(paths["worst_case.csv"], WORST_FIELDS, worst)
    title = ""
    if rows:
        r0 = rows[0]
        seeds = len({r["seed"] for r in rows})
        title = (f"{r0['clients']} clients, {r0['model']} on digits, {r0['rounds']} rounds, "
                 f"{'IID' if r0['non_iid'] is None else 'non-IID alpha ' + str(r0['non_iid'])}, mean ± std over {seeds} seed(s)")
    intro = ("Lowest final test accuracy of each rule under each attack, over every group size, Byzantine fraction, "
             "dropout rate, bypass setting and seed in the study (in brackets: the group size where it happened). "
             "The `none` column is the clean run.")
    md = ["# Worst-case final accuracy", "", intro, "", title, "", worst_case_markdown(worst, rules, attacks)]
    paths["worst_case.md"].write_text("\n".join(md))
    plot_accuracy(summary, paths["accuracy_vs_group_size.png"], rules=rules, attacks=attacks, title=title)
    return paths
