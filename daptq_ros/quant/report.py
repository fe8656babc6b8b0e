"""Quantization report: ``report.md`` + ``report.json`` + ``layers.png`` (per-layer bits, sensitivity)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def plot_layers(result: Any, path: Path) -> Path:
    """Bar chart of per-layer bits (top) and sensitivity (bottom, log scale when positive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.layers)
    bits = [
        s.w_bits if s.channel_bits is None else sum(s.channel_bits) / len(s.channel_bits)
        for s in result.layers.values()
    ]
    sens = [result.sensitivity.get(n) for n in names]
    has_sens = any(v is not None for v in sens)
    fig, axes = plt.subplots(
        2 if has_sens else 1,
        1,
        figsize=(max(8, 0.28 * len(names)), 6 if has_sens else 3.5),
        sharex=True,
        squeeze=False,
    )
    ax = axes[0][0]
    ax.bar(range(len(names)), bits, color=["#888888" if b >= 16 else "#1f77b4" for b in bits])
    ax.set_ylabel("weight bits")
    ax.set_title(f"{result.method}: {result.avg_bits:.3f} avg bits, drift loss {result.drift_loss:.3g}")
    if has_sens:
        ax2 = axes[1][0]
        vals = [v if v is not None else 0.0 for v in sens]
        ax2.bar(range(len(names)), vals, color="#d62728")
        ax2.set_ylabel("sensitivity")
        if all(v > 0 for v in vals):
            ax2.set_yscale("log")
    axes[-1][0].set_xticks(range(len(names)))
    axes[-1][0].set_xticklabels(names, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: Any, out_dir: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write report.md, report.json and layers.png into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {**result.to_json(), **(extra or {})}
    json_path = out / "report.json"
    json_path.write_text(json.dumps(data, indent=2, default=str))
    png = plot_layers(result, out / "layers.png")
    size = result.size
    lines = [
        f"# Quantization report: `{result.method}`",
        "",
        f"- average weight bits (incl. scales/zero points): **{result.avg_bits:.3f}**"
        + (f" (budget {result.budget})" if result.budget is not None else ""),
        f"- calibration drift loss vs FP: **{result.drift_loss:.4g}** on {result.calib_frames} frames",
        f"- weight bytes: {_fmt_bytes(size['quant_bytes'])} vs fp32 {_fmt_bytes(size['fp32_bytes'])} "
        f"({size['ratio_vs_fp32']:.1%}) and fp16 {_fmt_bytes(size['fp16_bytes'])} "
        f"({size['ratio_vs_fp16']:.1%})",
        f"- rounding: {result.recipe.get('rounding')}, group size {result.recipe.get('group_size')}, "
        f"activations A{result.recipe.get('a_bits')} ({result.recipe.get('act_granularity')})",
        f"- wall time: {result.seconds:.1f} s",
        "",
        "| layer | w bits | group | sym | a bits | act | sensitivity |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in result.layers.items():
        bits = (
            str(s.w_bits)
            if s.channel_bits is None
            else f"mixed ≤{s.w_bits} ({sum(s.channel_bits) / len(s.channel_bits):.2f})"
        )
        sens = result.sensitivity.get(name)
        lines.append(
            f"| `{name}` | {bits} | {s.group_size} | {s.symmetric} | {s.a_bits} | {s.act_granularity} | "
            f"{'' if sens is None else f'{sens:.3g}'} |"
        )
    lines += ["", "![per-layer bits and sensitivity](layers.png)", ""]
    if result.extras:
        lines += [
            "## Method details",
            "",
            "```json",
            json.dumps(result.extras, indent=1, default=str)[:20000],
            "```",
            "",
        ]
    md_path = out / "report.md"
    md_path.write_text("\n".join(lines))
    logger.info("wrote %s, %s, %s", md_path, json_path, png)
    return {"md": md_path, "json": json_path, "png": png}
