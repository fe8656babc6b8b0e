"""Episode-result summaries shared by ``sim_bridge`` and the launcher (ROS-free)."""

from __future__ import annotations

from typing import Any

import numpy as np


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over episode records: success rate, steps, missed steps, mean loop latency."""
    lat = [r["mean_loop_latency_ms"] for r in results if r.get("mean_loop_latency_ms") is not None]
    n = len(results)
    return {
        "type": "summary",
        "episodes": n,
        "successes": sum(bool(r["success"]) for r in results),
        "success_rate": (sum(bool(r["success"]) for r in results) / n) if n else 0.0,
        "total_steps": sum(int(r["steps"]) for r in results),
        "missed_steps": sum(int(r["missed_steps"]) for r in results),
        "mean_loop_latency_ms": float(np.mean(lat)) if lat else None,
    }


def format_summary(results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """Human-readable per-episode table plus totals."""
    lines = [f"{'task':<26} {'seed':>7} {'success':>7} {'steps':>5} {'missed':>6} {'loop ms':>8}"]
    for r in results:
        lat = r.get("mean_loop_latency_ms")
        lines.append(f"{r['task']:<26} {r['seed']:>7} {bool(r['success'])!s:>7} {r['steps']:>5} "
                     f"{r['missed_steps']:>6} {'-' if lat is None else f'{lat:.1f}':>8}")
    lat = summary.get("mean_loop_latency_ms")
    lines.append(f"total: {summary['successes']}/{summary['episodes']} successful "
                 f"({summary['success_rate']:.0%}), {summary['total_steps']} steps, "
                 f"{summary['missed_steps']} missed, mean loop latency "
                 f"{'-' if lat is None else f'{lat:.1f} ms'}")
    return "\n".join(lines)
