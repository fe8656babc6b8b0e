"""Drift summary (report.json), human report (report.md) and plots (PNG) of one replay."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daptq_ros.config_util import to_dict
from daptq_ros.drift.config import DriftConfig
from daptq_ros.drift.metrics import (
    cumulative_drift,
    dof_error_stats,
    evaluate_gate,
    horizon_errors,
    sqnr_db,
    step_displacements,
    time_to_threshold,
)
from daptq_ros.drift.replay import ReplayResult

logger = logging.getLogger(__name__)

REPORT_VERSION = 1
PLOTS = {
    "drift": "drift.png",
    "histogram": "error_hist.png",
    "horizon": "horizon_error.png",
}
WORST_EPISODES = 2


def _finite(x: float) -> float | None:
    """JSON-safe float (inf/nan → None)."""
    return float(x) if math.isfinite(x) else None


def drift_trace(result: ReplayResult, config: DriftConfig) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative EE drift vectors (N, 3) and their norms (N,) in metres."""
    disp = step_displacements(result.reference_actions, result.candidate_actions, config.kinematics)
    drift = cumulative_drift(disp, result.episode)
    return drift, np.linalg.norm(drift, axis=1)


def episode_time_s(result: ReplayResult) -> np.ndarray:
    """Seconds since the first frame of each frame's episode."""
    out = np.zeros(result.n_frames)
    for ep in np.unique(result.episode):
        idx = np.flatnonzero(result.episode == ep)
        out[idx] = (result.t_ns[idx] - result.t_ns[idx[0]]) * 1e-9
    return out


def build_summary(
    result: ReplayResult,
    action_names: Sequence[str],
    config: DriftConfig,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report.json object: statistics, drift, gate verdict and provenance."""
    names = list(action_names)
    if len(names) != result.reference_actions.shape[1]:
        raise ValueError(f"{len(names)} action names for {result.reference_actions.shape[1]} action dims")
    exec_err = result.candidate_actions - result.reference_actions
    stats = dof_error_stats(exec_err)
    chunk_stats = dof_error_stats((result.candidate_chunks - result.reference_chunks).reshape(-1, len(names)))
    _, norm = drift_trace(result, config)
    t_ep = episode_time_s(result)
    level = config.thresholds.time_to_threshold_m
    ttt = time_to_threshold(norm, result.t_s, result.episode, level)
    episodes = []
    for ep, instruction in sorted(result.instructions.items()):
        idx = np.flatnonzero(result.episode == ep)
        episodes.append(
            {
                "episode": ep,
                "instruction": instruction,
                "frames": int(idx.size),
                "duration_s": float(t_ep[idx[-1]]),
                "max_drift_m": float(norm[idx].max()),
                "final_drift_m": float(norm[idx[-1]]),
                "time_to_threshold_s": ttt[ep],
            }
        )
    crossed = [v for v in ttt.values() if v is not None]
    min_ttt = min(crossed) if crossed else None
    max_drift = float(norm.max())
    checks = evaluate_gate(names, stats, max_drift, min_ttt, config.thresholds)
    summary: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "passed": all(c.passed for c in checks),
        "failed_checks": [c.name for c in checks if not c.passed],
        "inputs": inputs or {},
        "frames": result.n_frames,
        "episodes": len(episodes),
        "replay_seconds": result.seconds,
        "ms_per_frame": result.meta.get("ms_per_frame"),
        "predictions": int(result.reference_chunks.shape[0]),
        "action_names": names,
        "action_error": {n: {k: stats[k][j] for k in stats} for j, n in enumerate(names)},
        # Signed mean error: a bias integrates linearly into drift, zero-mean noise only as sqrt(T).
        "action_bias": {n: float(exec_err[:, j].mean()) for j, n in enumerate(names)},
        "chunk_error": {n: {k: chunk_stats[k][j] for k in chunk_stats} for j, n in enumerate(names)},
        "horizon_error": horizon_errors(result.reference_chunks, result.candidate_chunks),
        "sqnr_db": {
            n: _finite(v)
            for n, v in zip(names, sqnr_db(result.reference_actions, result.candidate_actions), strict=True)
        },
        "drift": {
            "kinematics": to_dict(config.kinematics),
            "max_m": max_drift,
            "mean_final_m": float(np.mean([e["final_drift_m"] for e in episodes])),
            "time_to_threshold_m": level,
            "min_time_to_threshold_s": min_ttt,
            "episodes_crossing": len(crossed),
            "per_episode": episodes,
        },
        "gate": [c.to_json() for c in checks],
        "thresholds": to_dict(config.thresholds),
        "chunking": to_dict(config.replay.chunking),
        "recorded_commands": _recorded_command_check(result),
    }
    return summary


def _recorded_command_check(result: ReplayResult) -> dict[str, Any]:
    """How far the reference's executed actions are from the recorded commands (informative only)."""
    cmds = result.recorded_commands
    if cmds is None:
        return {"available": False, "reason": "no frame has a recorded command (or their sizes differ)"}
    if cmds.shape[1] != result.reference_actions.shape[1]:
        return {
            "available": False,
            "reason": f"command vectors have {cmds.shape[1]} values, "
            f"actions {result.reference_actions.shape[1]}",
        }
    have = ~np.isnan(cmds).any(axis=1)
    diff = np.abs(cmds[have] - result.reference_actions[have])
    return {
        "available": True,
        "frames_with_command": int(have.sum()),
        "reference_vs_recorded_mean_abs": diff.mean(axis=0).tolist(),
    }


# ------------------------------------------------------------------------------------------- plots
def _worst_episodes(summary: dict[str, Any], k: int) -> list[int]:
    per_ep = sorted(summary["drift"]["per_episode"], key=lambda e: -e["max_drift_m"])
    return [e["episode"] for e in per_ep[:k]]


def write_plots(
    summary: dict[str, Any], result: ReplayResult, config: DriftConfig, out_dir: Path
) -> list[str]:
    """Write the PNG plots into ``out_dir``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = summary["action_names"]
    files: list[str] = []
    t_ep = episode_time_s(result)
    _, norm = drift_trace(result, config)
    th = config.thresholds

    # Per-DoF action curves of the worst episodes (by max drift).
    for ep in _worst_episodes(summary, WORST_EPISODES):
        idx = np.flatnonzero(result.episode == ep)
        fig, axes = plt.subplots(
            len(names),
            2,
            figsize=(12, 1.8 * len(names) + 0.6),
            sharex=True,
            squeeze=False,
            gridspec_kw={"width_ratios": [3, 2]},
        )
        for j, name in enumerate(names):
            ax = axes[j, 0]
            ax.plot(t_ep[idx], result.reference_actions[idx, j], label="reference", color="tab:blue")
            ax.plot(
                t_ep[idx], result.candidate_actions[idx, j], label="candidate", color="tab:red", alpha=0.8
            )
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            # Right: the signed error and its running mean (a bias is what accumulates into drift).
            err = result.candidate_actions[idx, j] - result.reference_actions[idx, j]
            ax = axes[j, 1]
            ax.plot(t_ep[idx], err, color="tab:gray", lw=1, label="candidate - reference")
            ax.plot(
                t_ep[idx], np.cumsum(err) / np.arange(1, err.size + 1), color="black", label="running mean"
            )
            ax.axhline(0, color="tab:blue", lw=0.8)
            ax.grid(alpha=0.3)
        axes[0, 0].legend(loc="upper right", fontsize=8)
        axes[0, 1].legend(loc="upper right", fontsize=8)
        axes[-1, 0].set_xlabel("time in episode (s)")
        axes[-1, 1].set_xlabel("time in episode (s)")
        fig.suptitle(f"executed actions, episode {ep}: {result.instructions[ep]!r}", fontsize=9)
        fig.tight_layout()
        fname = f"actions_episode{ep}.png"
        fig.savefig(out_dir / fname, dpi=90)
        plt.close(fig)
        files.append(fname)

    fig, ax = plt.subplots(figsize=(8, 4))
    for ep in np.unique(result.episode):
        idx = np.flatnonzero(result.episode == ep)
        ax.plot(t_ep[idx], norm[idx] * 100, lw=1, alpha=0.7)
    if th.drift_m is not None:
        ax.axhline(th.drift_m * 100, color="red", ls="--", label=f"gate {th.drift_m * 100:.2f} cm")
    ax.axhline(
        th.time_to_threshold_m * 100,
        color="orange",
        ls=":",
        label=f"time-to-threshold level {th.time_to_threshold_m * 100:.2f} cm",
    )
    ax.set_xlabel("time in episode (s)")
    ax.set_ylabel("cumulative EE drift |E_t| (cm)")
    ax.set_title(f"cumulative drift per episode ({config.kinematics.model})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / PLOTS["drift"], dpi=90)
    plt.close(fig)
    files.append(PLOTS["drift"])

    err = np.abs(result.candidate_actions - result.reference_actions)
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), squeeze=False)
    for j, name in enumerate(names):
        ax = axes[0, j]
        ax.hist(err[:, j], bins=40, color="tab:gray")
        lim = th.for_dof(name)
        for stat, style in (("p95", ":"), ("max", "--")):
            if getattr(lim, stat) is not None:
                ax.axvline(getattr(lim, stat), color="red", ls=style, label=f"{stat} limit")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("|cand - ref|")
    axes[0, 0].set_ylabel("frames")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / PLOTS["histogram"], dpi=90)
    plt.close(fig)
    files.append(PLOTS["histogram"])

    hor = np.asarray(summary["horizon_error"]["mean"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for j, name in enumerate(names):
        ax.plot(np.arange(hor.shape[0]), hor[:, j], marker="o", label=name)
    ax.set_xlabel("chunk horizon index")
    ax.set_ylabel("mean |cand - ref|")
    ax.set_title("error growth over the action chunk", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / PLOTS["horizon"], dpi=90)
    plt.close(fig)
    files.append(PLOTS["horizon"])
    return files


# ------------------------------------------------------------------------------------------ report
def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def render_markdown(summary: dict[str, Any], plots: Sequence[str]) -> str:
    """report.md text."""
    verdict = "PASS" if summary["passed"] else "FAIL"
    inp = summary["inputs"]
    lines = [f"# Drift check: {verdict}", ""]
    for key in (
        "bag",
        "reference",
        "candidate",
        "reference_method",
        "candidate_method",
        "candidate_avg_bits",
    ):
        if key in inp:
            lines.append(f"- {key.replace('_', ' ')}: `{inp[key]}`")
    lines += [
        f"- frames: {summary['frames']} in {summary['episodes']} episodes; "
        f"replay {summary['replay_seconds']:.1f} s"
        f" ({_fmt(summary['ms_per_frame'], 3)} ms/frame)",
        f"- executed actions: chunking `{summary['chunking']['mode']}`"
        f" (execute_steps {summary['chunking']['execute_steps']}); {summary['predictions']} chunk predictions"
        " per artifact",
        "",
        "## Gate",
        "",
        "| check | value | limit | result |",
        "|---|---|---|---|",
    ]
    for c in summary["gate"]:
        lines.append(
            f"| {c['name']} | {_fmt(c['value'])} | {_fmt(c['limit'])} | "
            f"{'pass' if c['passed'] else '**FAIL**'} |"
        )
    lines += [
        "",
        "## Per-DoF action error (executed actions, raw units)",
        "",
        "| DoF | mean | p95 | max | bias (signed mean) | SQNR dB | mean over whole chunk |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in summary["action_names"]:
        e, c = summary["action_error"][name], summary["chunk_error"][name]
        lines.append(
            f"| {name} | {_fmt(e['mean'])} | {_fmt(e['p95'])} | {_fmt(e['max'])} | "
            f"{_fmt(summary['action_bias'][name], 3)} | {_fmt(summary['sqnr_db'][name], 3)} | "
            f"{_fmt(c['mean'])} |"
        )
    hor = np.asarray(summary["horizon_error"]["mean"])
    growth = hor.mean(axis=1)
    lines += [
        "",
        "## Error growth over the chunk horizon",
        "",
        "mean |Δ| over DoFs per horizon index: " + ", ".join(_fmt(float(g), 3) for g in growth),
        "",
    ]
    d = summary["drift"]
    kin = d["kinematics"]
    lines += [
        "## Cumulative end-effector drift",
        "",
        f"Model `{kin['model']}`, action scale {kin['action_scale']} m/unit; "
        "E_t = Σ J ε_t restarted per episode.",
        f"Max |E_t| = {d['max_m'] * 100:.3f} cm; mean final |E_T| = {d['mean_final_m'] * 100:.3f} cm; "
        f"{d['episodes_crossing']}/{summary['episodes']} episodes cross "
        f"{d['time_to_threshold_m'] * 100:.2f} cm "
        f"(earliest after {_fmt(d['min_time_to_threshold_s'], 3)} s).",
        "",
        "| episode | instruction | frames | max drift (cm) | final (cm) | time to threshold (s) |",
        "|---|---|---|---|---|---|",
    ]
    for e in sorted(d["per_episode"], key=lambda e: -e["max_drift_m"])[:10]:
        lines.append(
            f"| {e['episode']} | {e['instruction']} | {e['frames']} | {e['max_drift_m'] * 100:.3f} | "
            f"{e['final_drift_m'] * 100:.3f} | {_fmt(e['time_to_threshold_s'], 3)} |"
        )
    lines += ["", "## Why", "", _explain(summary), "", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots]
    rc = summary["recorded_commands"]
    if rc.get("available"):
        lines += [
            "",
            "Reference vs recorded commands (informative; closed-loop noise differs): mean |Δ| "
            + ", ".join(_fmt(v, 3) for v in rc["reference_vs_recorded_mean_abs"]),
        ]
    return "\n".join(lines) + "\n"


def _explain(summary: dict[str, Any]) -> str:
    names = summary["action_names"]
    worst = max(names, key=lambda n: summary["action_error"][n]["mean"])
    d = summary["drift"]
    ep = max(d["per_episode"], key=lambda e: e["max_drift_m"])
    biased = max(
        names, key=lambda n: abs(summary["action_bias"][n]) / (summary["action_error"][n]["mean"] or 1.0)
    )
    bias = summary["action_bias"][biased]
    share = abs(bias) / (summary["action_error"][biased]["mean"] or 1.0)
    hor = np.asarray(summary["horizon_error"]["mean"]).mean(axis=1)
    text = (
        f"The largest mean action error is on `{worst}` ({_fmt(summary['action_error'][worst]['mean'])}); "
        f"the worst episode is {ep['episode']} ({ep['instruction']!r}) with {ep['max_drift_m'] * 100:.3f} cm "
        f"of accumulated drift. The most systematic error is on `{biased}`: a signed mean of {_fmt(bias, 3)} "
        f"({share:.0%} of its mean |error|); a bias integrates linearly into drift while zero-mean noise "
        f"largely cancels. Over the chunk the error goes from {_fmt(float(hor[0]), 3)} (index 0) to "
        f"{_fmt(float(hor[-1]), 3)} (index {len(hor) - 1})."
    )
    if not summary["passed"]:
        text += " Failed: " + ", ".join(f"`{n}`" for n in summary["failed_checks"]) + "."
    return text


def write_report(
    summary: dict[str, Any], result: ReplayResult, config: DriftConfig, out_dir: str | Path
) -> Path:
    """Write report.json, report.md and the plots into ``out_dir`` (created); returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(summary, result, config, out)
    summary = {**summary, "plots": plots}
    (out / "report.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(render_markdown(summary, plots))
    return out
