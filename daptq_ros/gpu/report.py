"""Pure helpers of the GPU benchmark: floors, ratios, validity, targets, markdown table, plot.

Nothing here touches a device, so all of it is unit-tested on the CPU with known inputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Targets (issue 4, item 4): GPU, VLA-sized trunk at batch 1.
TARGET_SPEEDUP = 1.6
TARGET_X_FLOOR = 2.0
VLA_SIZED_MIN_PARAMS = 300_000_000
# A quantized model's output must match its own float32 reference this closely (relative L2),
# or within ERR_BAND_FACTOR × the bf16 baseline's own error vs its float32 reference.
ERR_BAND_MIN = 2e-2
ERR_BAND_FACTOR = 4.0


def bandwidth_floor_ms(weight_bytes: int, bw_gbs: float) -> float:
    """Time to stream ``weight_bytes`` once at ``bw_gbs`` GB/s (1 GB = 1e9 bytes), in ms."""
    if bw_gbs <= 0:
        raise ValueError(f"bandwidth must be > 0 GB/s, got {bw_gbs}")
    return weight_bytes / (bw_gbs * 1e9) * 1e3


def compute_floor_ms(m: int, linear_params: int, tflops: float) -> float:
    """Time of the 2·M·params multiply-adds of the Linears at ``tflops`` TFLOP/s, in ms."""
    if tflops <= 0:
        raise ValueError(f"rate must be > 0 TFLOP/s, got {tflops}")
    return 2.0 * m * linear_params / (tflops * 1e12) * 1e3


def error_band(bf16_err: float | None) -> float:
    """Largest acceptable relative error of a quantized model vs its own float32 reference."""
    if bf16_err is None or not math.isfinite(bf16_err):
        return ERR_BAND_MIN
    return max(ERR_BAND_MIN, ERR_BAND_FACTOR * bf16_err)


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or den is not positive."""
    if num is None or den is None or den <= 0:
        return None
    return num / den


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Fill ``speedup_*`` (bf16 time / variant time, same model and M) and ``x_floor_*`` in place."""
    base: dict[tuple[str, Any], dict[str, Any]] = {
        (r["model"], r["M"]): r for r in rows if r["variant"] == "bf16" and r.get("status") == "ok"
    }
    for r in rows:
        b = base.get((r["model"], r["M"]))
        for part in ("trunk", "linears"):
            t = r.get(f"{part}_ms")
            r[f"speedup_{part}"] = ratio(b.get(f"{part}_ms"), t) if b else None
            r[f"x_floor_{part}"] = ratio(t, r.get("floor_ms"))


def target_summary(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per VLA-sized model and M: the fastest *valid* quantized variant and the two target checks.

    The check uses the full trunk forward (``trunk_ms``); ``linears_ms`` is reported beside it.
    """
    best: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in rows:
        if (r["variant"] == "bf16" or r.get("status") != "ok" or not r.get("valid")
                or (r.get("params") or 0) < VLA_SIZED_MIN_PARAMS or r.get("speedup_trunk") is None):
            continue
        key = (r["model"], r["M"])
        if key not in best or r["speedup_trunk"] > best[key]["speedup_trunk"]:
            best[key] = r
    out = []
    for (model, m), r in sorted(best.items(), key=lambda kv: (kv[0][0], str(kv[0][1]).zfill(6))):
        out.append({
            "model": model, "M": m, "variant": r["variant"], "trunk_ms": r.get("trunk_ms"),
            "speedup": r["speedup_trunk"], "x_floor": r.get("x_floor_trunk"),
            "speedup_linears": r.get("speedup_linears"), "x_floor_linears": r.get("x_floor_linears"),
            "pass_speedup": r["speedup_trunk"] >= TARGET_SPEEDUP,
            "pass_floor": r.get("x_floor_trunk") is not None and r["x_floor_trunk"] <= TARGET_X_FLOOR,
        })
    return out


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return format(v, spec)
    return str(v)


# (header, row key, format spec)
TABLE_COLUMNS: list[tuple[str, str, str]] = [
    ("model", "model", ""), ("params", "params_m", ".1f"), ("M", "M", ""), ("variant", "variant", ""),
    ("status", "status", ""), ("trunk ms", "trunk_ms", ".4f"), ("linears ms", "linears_ms", ".4f"),
    ("× bf16 (trunk)", "speedup_trunk", ".2f"), ("× bf16 (lin)", "speedup_linears", ".2f"),
    ("weight MB", "weight_mb", ".1f"), ("floor ms", "floor_ms", ".4f"),
    ("GEMM floor ms", "compute_floor_ms", ".4f"),
    ("trunk/floor", "x_floor_trunk", ".2f"), ("lin/floor", "x_floor_linears", ".2f"),
    ("rel err", "rel_err_kernel", ".1e"), ("quant err", "rel_err_quant", ".1e"),
]


# The summary printed last: fewer columns.
COMPACT_COLUMNS: list[tuple[str, str, str]] = [
    ("model", "model", ""), ("M", "M", ""), ("variant", "variant", ""), ("status", "status", ""),
    ("trunk ms", "trunk_ms", ".4f"), ("lin ms", "linears_ms", ".4f"), ("×bf16", "speedup_trunk", ".2f"),
    ("×bf16 lin", "speedup_linears", ".2f"), ("/floor", "x_floor_trunk", ".2f"),
    ("lin/floor", "x_floor_linears", ".2f"), ("err", "rel_err_kernel", ".0e"),
]


def markdown_table(rows: Sequence[dict[str, Any]],
                   columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS) -> str:
    """Render ``rows`` as a GitHub markdown table (missing values as "–")."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        view = dict(r)
        if view.get("params") is not None:
            view["params_m"] = view["params"] / 1e6
        if view.get("weight_bytes") is not None:
            view["weight_mb"] = view["weight_bytes"] / 1e6
        lines.append("| " + " | ".join(_fmt(view.get(k), spec) for _, k, spec in columns) + " |")
    return "\n".join(lines)


def targets_table(summary: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`target_summary`."""
    cols = [("model", "model", ""), ("M", "M", ""), ("best valid variant", "variant", ""),
            ("trunk ms", "trunk_ms", ".4f"), ("× bf16", "speedup", ".2f"),
            (f"≥{TARGET_SPEEDUP}×", "pass_speedup", ""), ("× floor", "x_floor", ".2f"),
            (f"≤{TARGET_X_FLOOR}× floor", "pass_floor", ""), ("× bf16 (lin)", "speedup_linears", ".2f"),
            ("lin × floor", "x_floor_linears", ".2f")]
    return markdown_table(summary, cols)


def write_plot(rows: Sequence[dict[str, Any]], path: Path, m: int) -> Path | None:
    """Speed-up vs parameter count at token count ``m`` (one line per variant; floor ratios dashed).

    The dashed line of a variant is its ideal speed-up bf16 floor / variant floor (weight bytes
    ratio). Returns the path, or None when matplotlib is missing or nothing matches.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        log.info("no plot: matplotlib unavailable (%s)", exc)
        return None
    sel = [r for r in rows if r["M"] == m and r.get("status") == "ok" and r.get("params")]
    variants = sorted({r["variant"] for r in sel if r["variant"] != "bf16"})
    if not variants:
        return None
    base_floor = {r["model"]: r.get("floor_ms") for r in sel if r["variant"] == "bf16"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, v in enumerate(variants):
        pts = sorted((r["params"], r.get("speedup_trunk"),
                      ratio(base_floor.get(r["model"]), r.get("floor_ms")))
                     for r in sel if r["variant"] == v and r.get("speedup_trunk") is not None)
        if not pts:
            continue
        color = f"C{i}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"{v} (measured)")
        ideal = [(p[0], p[2]) for p in pts if p[2] is not None]
        if ideal:
            ax.plot([p[0] for p in ideal], [p[1] for p in ideal], "--", color=color, alpha=0.6,
                    label=f"{v} (bandwidth-floor ratio)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(TARGET_SPEEDUP, color="red", lw=0.8, ls=":", label=f"target {TARGET_SPEEDUP}×")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("speed-up over bf16 (full trunk forward)")
    ax.set_title(f"Quantized vs bf16 at batch 1, M = {m} tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
