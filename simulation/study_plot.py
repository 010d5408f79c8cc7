"""The study's figure: accuracy per rule and attack, readable without the code.

Colour names the rule, line style and marker name the variant (takeover or bounded attackers,
bucketing, momentum, Byzantine fraction, dropout), and both keys are in the legend. Bands and
error bars are 95% confidence intervals over seeds; a dotted line marks chance. With several
group sizes the x axis is the group size (more privacy to the right, log-spaced when the sizes
span a factor of 4 or more) and overlapping lines are pulled apart by small offsets; with one
group size the rules sit side by side on the x axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["attack_title", "plot_accuracy", "variant_label"]

_ATTACK_NAMES = {
    "none": "no attack",
    "alie": "ALIE over group means",
    "ipm": "IPM over group means",
    "takeover": "push to -B x honest direction",
    "fang_krum": "Fang et al. vs Krum",
    "fang_trim": "Fang et al. vs trimmed mean/median",
    "min_max": "min-max (Shejwalkar & Houmansadr)",
    "min_sum": "min-sum (Shejwalkar & Houmansadr)",
    "model_replacement": "model replacement (gamma = n/eta)",
    "scaling": "scaling (boosted own update)",
    "sign_flip": "sign flip",
    "gaussian": "Gaussian noise",
    "backdoor": "backdoor (data poisoning)",
    "label_flip": "label flip",
    "sybil": "sybils (-scale x mean)",
}
_VARIANT_KEYS = ("byzantine", "dropout", "bypass_bounds", "bucket", "momentum")
_STYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def attack_title(token: str) -> str:
    """``alie:alie_z=10`` -> ``ALIE over group means (alie_z=10)``: a title a reader can parse."""
    name, _, rest = str(token).partition(":")
    title = _ATTACK_NAMES.get(name, name.replace("_", " "))
    return f"{title} ({rest.replace(':', ', ')})" if rest else title


def _split(alpha: Any) -> str:
    return "IID" if alpha is None or alpha == "" else f"non-IID, Dirichlet alpha = {float(alpha):g}"


def variant_label(v: Mapping[str, Any], varying: Sequence[str]) -> str:
    """Only the variant keys that differ somewhere in the study, in words."""
    if not v.get("byzantine"):
        rest = [k for k in varying if k not in ("byzantine", "bypass_bounds")]
        return ", ".join(["no attackers", *([variant_label({**v, "byzantine": 1}, rest)] if rest else [])])
    parts = []
    for k in varying:
        x = v[k]
        if k == "byzantine":
            parts.append(f"{float(x):.0%} Byzantine")
        elif k == "dropout":
            parts.append(f"dropout {float(x):g}")
        elif k == "bypass_bounds":
            parts.append("group takeover" if x else "bounded attackers")
        elif k == "bucket":
            parts.append(f"bucketing s={int(x)}" if int(x) > 1 else "no bucketing")
        elif k == "momentum":
            parts.append(f"momentum {float(x):g}" if float(x) else "no momentum")
    return ", ".join(parts) or "all runs"


def _ordered(values: Any, order: Sequence[Any]) -> list[Any]:
    vals = list(dict.fromkeys(values))
    return sorted(vals, key=lambda v: (order.index(v) if v in order else len(order), str(v)))


def plot_accuracy(summary: Sequence[Mapping[str, Any]], path: Path, *, rules: Sequence[str] = (),
                  attacks: Sequence[str] = (), title: str = "", chance: float | None = 0.1) -> None:
    """One panel per (data split, attack); y = mean final accuracy over seeds with its 95% CI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not summary:
        return
    ats = _ordered((s["attack"] for s in summary), attacks)
    rls = _ordered((s["rule"] for s in summary), rules)
    splits = _ordered((s.get("non_iid") for s in summary), [None])
    panels = [(a, sp) for sp in splits for a in ats]
    ncol = min(len(ats), 4 if len(ats) > 6 or len(ats) == 4 else 3) if len(panels) > 1 else 1
    nrow = math.ceil(len(panels) / ncol)
    varying = [k for k in _VARIANT_KEYS if len({s.get(k) for s in summary if s["attack"] != "none"}) > 1]
    if any(s["attack"] != "none" for s in summary) and "byzantine" not in varying:
        varying.append("byzantine")  # so the attacked lines are told apart from the clean ones
    variants = _ordered((tuple(s.get(k) for k in _VARIANT_KEYS) for s in summary), [])
    vstyle = {v: i for i, v in enumerate(variants)}
    sizes = sorted({int(s["group_size"]) for s in summary})
    by_size = len(sizes) > 1
    log_x = by_size and sizes[-1] / sizes[0] >= 4
    fig = Figure(figsize=(3.9 * ncol, 3.1 * nrow + 1.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrow, ncol, squeeze=False, sharey=True)
    colors = {r: f"C{i % 10}" for i, r in enumerate(rls)}
    for k, (attack, split) in enumerate(panels):
        ax = axes[k // ncol][k % ncol]
        rows = [s for s in summary if s["attack"] == attack and s.get("non_iid") == split]
        for ri, rule in enumerate(rls):
            for v in variants:
                pts = sorted((int(s["group_size"]), s["final_accuracy_mean"], s.get("final_accuracy_ci95") or 0.0)
                             for s in rows if s["rule"] == rule and tuple(s.get(kk) for kk in _VARIANT_KEYS) == v)
                if not pts:
                    continue
                x, y, e = (list(t) for t in zip(*pts))
                i = vstyle[v]
                style = dict(color=colors[rule], ls=_STYLES[i % len(_STYLES)], marker=_MARKERS[i % len(_MARKERS)],
                             ms=4.5, lw=1.4, alpha=0.9, mfc="white" if i % 2 else colors[rule])
                if by_size:  # small offsets so equal values stay visible side by side
                    off = (ri - (len(rls) - 1) / 2) * 0.035 + (i - (len(variants) - 1) / 2) * 0.012
                    xs = [xx * (1 + off) if log_x else xx + off * 4 for xx in x]
                    ax.plot(xs, y, **style)
                    lo = [max(a - b, 0.0) for a, b in zip(y, e)]
                    hi = [min(a + b, 1.0) for a, b in zip(y, e)]
                    ax.fill_between(xs, lo, hi, color=colors[rule], alpha=0.08, lw=0)
                else:
                    xs = [ri + (i - (len(variants) - 1) / 2) * 0.8 / max(len(variants), 1)]
                    ax.errorbar(xs, y, yerr=e, capsize=2.5, **{**style, "ls": "none"})
        if chance is not None:
            ax.axhline(chance, color="0.4", ls=":", lw=1.0)
        if by_size:
            if log_x:
                ax.set_xscale("log")
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.minorticks_off()
        else:
            ax.set_xticks(range(len(rls)), [r.replace("_", " ") for r in rls], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        head = attack_title(attack)
        ax.set_title(head + ("\n" + _split(split) if len(splits) > 1 or split is not None else ""), fontsize=9)
        if k % ncol == 0:
            ax.set_ylabel("final test accuracy\n(mean, 95% CI)", fontsize=9)
        if by_size and (k // ncol == nrow - 1 or k + ncol >= len(panels)):
            ax.set_xlabel("group size (more privacy ->)" + ("\nlog-spaced" if log_x else ""), fontsize=9)
    for k in range(len(panels), nrow * ncol):
        axes[k // ncol][k % ncol].set_visible(False)
    handles = [Line2D([], [], color=colors[r], lw=6, alpha=0.8) for r in rls]
    labels = [f"rule: {r.replace('_', ' ')}" for r in rls]
    for v, i in vstyle.items():
        handles.append(Line2D([], [], color="0.2", ls=_STYLES[i % len(_STYLES)] if by_size else "none",
                              marker=_MARKERS[i % len(_MARKERS)], mfc="white" if i % 2 else "0.2"))
        labels.append(variant_label(dict(zip(_VARIANT_KEYS, v)), varying) if varying else "line: all runs")
    if chance is not None:
        handles.append(Line2D([], [], color="0.4", ls=":"))
        labels.append(f"chance ({chance:g})")
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
