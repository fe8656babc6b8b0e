"""Statistics, markdown table, target checks and plot of ``daptq experiment`` (pure functions).

A *row* is a dict describing one variant (see :func:`daptq_ros.quant.experiment.run_variant`):
``name``, ``method``, ``budget`` (label), ``status`` ("done" / "failed: ..." / "pending"),
``avg_bits``, ``size_ratio_fp16``, ``drift_loss``, ``quant_seconds``, ``notes`` and, once
evaluated, ``eval`` = ``{"successes", "episodes", "success_rate", "ci95", "paired",
"ee_mean", "ee_final", "open_loop", "per_task"}``. The FP row has ``method == "fp"``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


# ------------------------------------------------------------------------------- statistics
def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ with ties (Pearson correlation of average ranks); None if undefined.

    Undefined: fewer than 3 pairs, or one side constant.
    """
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 3:
        return None
    rx, ry = average_ranks(list(x)), average_ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def mcnemar_exact(only_reference: int, only_candidate: int) -> float:
    """Two-sided exact McNemar p-value: binomial(n = discordant pairs, 1/2) on the smaller count."""
    n = only_reference + only_candidate
    if n == 0:
        return 1.0
    k = min(only_reference, only_candidate)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def recipe_hash(payload: Mapping[str, Any], length: int = 16) -> str:
    """Stable short hash of a JSON-able mapping (key order and float formatting independent)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# --------------------------------------------------------------------------------- formatting
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def fp_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((r for r in rows if r.get("method") == "fp"), None)


def _success_cell(ev: Mapping[str, Any]) -> str:
    lo, hi = ev["ci95"]
    return f"{_pct(ev['success_rate'])} ({ev['successes']}/{ev['episodes']}) [{100 * lo:.0f}, {100 * hi:.0f}]"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of all rows (FP first), success with Wilson 95% CI and paired statistics."""
    fp = fp_row(rows)
    fp_rate = fp["eval"]["success_rate"] if fp and fp.get("eval") else None
    head = (
        "| variant | budget | avg bits | size vs fp16 | calib drift loss | success [95% CI] | Δ vs FP | "
        "paired b/r/c/n (McNemar p) | EE drift mean / final (mm) | open-loop err | notes |"
    )
    lines = [head, "|" + "---|" * 11]
    ordered = ([fp] if fp else []) + [r for r in rows if r is not fp]
    for r in ordered:
        ev = r.get("eval")
        status = r.get("status", "pending")
        if ev is None:
            succ = delta = paired = drift = ol = "–"
            if status != "done":
                succ = status
        else:
            succ = _success_cell(ev)
            if r is fp:
                delta, paired, drift, ol = "–", "–", "0 / 0", "0"
            else:
                d = ev["success_rate"] - fp_rate if fp_rate is not None else None
                delta = "–" if d is None else f"{100 * d:+.1f} pp"
                p = ev.get("paired")
                paired = (
                    "–"
                    if not p
                    else f"{p['both']}/{p['only_reference']}/{p['only_candidate']}/{p['neither']} "
                    f"({mcnemar_exact(p['only_reference'], p['only_candidate']):.2g})"
                )
                drift = f"{1000 * ev['ee_mean']:.1f} / {1000 * ev['ee_final']:.1f}"
                ol = _num(ev.get("open_loop"), ".4f")
        lines.append(
            f"| {r['name']} | {r.get('budget', '–')} | {_num(r.get('avg_bits'), '.2f')} | "
            f"{_pct(r.get('size_ratio_fp16'))} | {_num(r.get('drift_loss'), '.3g')} | {succ} | {delta} | "
            f"{paired} | {drift} | {ol} | {r.get('notes', '')} |"
        )
    return "\n".join(lines)


def format_task_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per-task successes (k/n) of every evaluated row."""
    done = [r for r in rows if r.get("eval") and r["eval"].get("per_task")]
    if not done:
        return ""
    fp = fp_row(done)
    if fp is not None:
        done = [fp] + [r for r in done if r is not fp]
    tasks = list(done[0]["eval"]["per_task"])
    short = [t.removesuffix("-v3") for t in tasks]
    lines = ["| variant | " + " | ".join(short) + " |", "|" + "---|" * (len(tasks) + 1)]
    for r in done:
        pt = r["eval"]["per_task"]
        cells = [f"{pt[t]['successes']}/{pt[t]['episodes']}" if t in pt else "–" for t in tasks]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def correlations(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Spearman ρ of calibration drift loss vs success, EE drift and open-loop error over the
    quantized rows, one per distinct run (rtn@W4A8 and rtn@≤4.25 are the same recipe)."""
    q, seen = [], set()
    for r in rows:
        if r.get("method") == "fp" or not r.get("eval") or r.get("drift_loss") is None:
            continue
        if r.get("run") is not None and r["run"] in seen:
            continue
        seen.add(r.get("run"))
        q.append(r)
    loss = [float(r["drift_loss"]) for r in q]
    out: dict[str, Any] = {"n": len(q)}
    out["drift_loss_vs_success"] = spearman(loss, [r["eval"]["success_rate"] for r in q])
    out["drift_loss_vs_ee_mean"] = spearman(loss, [r["eval"]["ee_mean"] for r in q])
    ol = [(a, r["eval"].get("open_loop")) for a, r in zip(loss, q, strict=True)]
    ol = [(a, b) for a, b in ol if b is not None]
    out["drift_loss_vs_open_loop"] = spearman([a for a, _ in ol], [b for _, b in ol])
    return out


# Fewer evaluated variants than this and the rank correlation sentence says why it is omitted.
MIN_RANK_VARIANTS = 5


def format_correlations(corr: Mapping[str, Any]) -> str:
    """One sentence with the Spearman correlations of :func:`correlations`."""

    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:+.2f}"

    if corr["n"] < MIN_RANK_VARIANTS:
        return (
            f"Spearman ρ not reported: {corr['n']} quantized variant(s) evaluated, fewer than "
            f"{MIN_RANK_VARIANTS} (any ranking of so few is ±1 or close to it by chance)."
        )
    return (
        f"Spearman ρ over {corr['n']} quantized variants: calibration drift loss vs success "
        f"{f(corr['drift_loss_vs_success'])}, vs EE drift {f(corr['drift_loss_vs_ee_mean'])}, "
        f"vs open-loop error {f(corr['drift_loss_vs_open_loop'])}."
    )


def _find(rows: Sequence[Mapping[str, Any]], method: str, budget: str) -> Mapping[str, Any] | None:
    return next(
        (
            r
            for r in rows
            if r.get("method") == method
            and r.get("budget") == budget
            and r.get("eval")
            and not r.get("ablation")
        ),
        None,
    )


def target_checks(rows: Sequence[Mapping[str, Any]], budgets: Mapping[str, str]) -> list[dict[str, Any]]:
    """The issue's targets, measured. ``budgets`` maps roles (``b425``, ``b325``) to budget labels.

    Returns one dict per check: ``target``, ``measured`` (text), ``met`` (True/False/None when a
    row is missing).
    """
    fp = fp_row(rows)
    fp_rate = fp["eval"]["success_rate"] if fp and fp.get("eval") else None
    checks: list[dict[str, Any]] = []

    def rel(r):
        return None if r is None or not fp_rate else r["eval"]["success_rate"] / fp_rate

    b425, b325 = budgets.get("b425"), budgets.get("b325")
    d425, r425 = _find(rows, "daptq", b425), _find(rows, "rtn", b425)
    x = rel(d425)
    checks.append(
        {
            "target": f"daptq at {b425}: success ≥ 98% of FP",
            "measured": "–" if x is None else f"{100 * x:.1f}% of FP",
            "met": None if x is None else x >= 0.98,
        }
    )
    if d425 is None or r425 is None:
        checks.append({"target": f"daptq at {b425}: EE drift ≤ ½ RTN's", "measured": "–", "met": None})
    else:
        a, b = d425["eval"]["ee_mean"], r425["eval"]["ee_mean"]
        checks.append(
            {
                "target": f"daptq at {b425}: EE drift ≤ ½ RTN's",
                "measured": f"{1000 * a:.1f} mm vs RTN {1000 * b:.1f} mm ({a / b:.2f}×)" if b else "RTN 0",
                "met": a <= 0.5 * b,
            }
        )
    x = rel(_find(rows, "daptq", b325))
    checks.append(
        {
            "target": f"daptq at {b325}: success ≥ 90% of FP",
            "measured": "–" if x is None else f"{100 * x:.1f}% of FP",
            "met": None if x is None else x >= 0.90,
        }
    )
    worse = []
    compared = []
    for r in rows:
        if r.get("method") != "daptq" or not r.get("eval") or r.get("ablation"):
            continue
        g = _find(rows, "gptq", r["budget"])
        if g is None:
            continue
        compared.append(r["budget"])
        if r["eval"]["successes"] < g["eval"]["successes"]:
            worse.append(f"{r['budget']}: {r['eval']['successes']} vs {g['eval']['successes']}")
    checks.append(
        {
            "target": "daptq never worse than gptq at the same budget (success)",
            "measured": ("worse at " + "; ".join(worse))
            if worse
            else f"not worse at {', '.join(compared) or '–'}",
            "met": None if not compared else not worse,
        }
    )
    return checks


def format_checks(checks: Sequence[Mapping[str, Any]]) -> str:
    mark = {True: "met", False: "**missed**", None: "not measured"}
    lines = ["| target | measured | |", "|---|---|---|"]
    lines += [f"| {c['target']} | {c['measured']} | {mark[c['met']]} |" for c in checks]
    return "\n".join(lines)


def plot_success_vs_bits(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Success (Wilson 95% CI bars) vs average weight bits, one marker per method; FP band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    fp = fp_row(rows)
    if fp and fp.get("eval"):
        ev = fp["eval"]
        ax.axhline(100 * ev["success_rate"], color="k", lw=1, label="FP")
        ax.axhspan(100 * ev["ci95"][0], 100 * ev["ci95"][1], color="k", alpha=0.07)
    markers = "osD^v<>PXh*"
    methods = sorted({r["method"] for r in rows if r.get("method") != "fp"})
    for i, m in enumerate(methods):
        pts = [r for r in rows if r.get("method") == m and r.get("eval") and r.get("avg_bits") is not None]
        if not pts:
            continue
        xs = [r["avg_bits"] for r in pts]
        ys = [100 * r["eval"]["success_rate"] for r in pts]
        lo = [y - 100 * r["eval"]["ci95"][0] for y, r in zip(ys, pts, strict=True)]
        hi = [100 * r["eval"]["ci95"][1] - y for y, r in zip(ys, pts, strict=True)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=markers[i % len(markers)], capsize=3, label=m, alpha=0.85)
        for r, x, y in zip(pts, xs, ys, strict=True):
            if r.get("ablation"):
                ax.annotate(r["name"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("average weight bits (incl. scales; float layers at 16)")
    ax.set_ylabel("closed-loop success (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "average_ranks",
    "correlations",
    "format_checks",
    "format_correlations",
    "format_table",
    "format_task_table",
    "mcnemar_exact",
    "plot_success_vs_bits",
    "recipe_hash",
    "spearman",
    "target_checks",
]
