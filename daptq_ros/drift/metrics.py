"""Drift metrics of an open-loop replay (pure numpy) and the pass/fail gate.

Kinematic drift follows DA-PTQ (papers.md §1): an action error ε_t moves the end effector by
δe_t = J_t ε_t and the drift after T steps is E_T = Σ_t J_t ε_t. Here ε_t is the executed-action
difference candidate − reference at step t, J_t comes from :class:`KinematicsConfig` and the
sum restarts at every episode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from daptq_ros.drift.config import KinematicsConfig, Thresholds
from daptq_ros.sim.metrics import open_loop_errors


def dof_error_stats(errors: np.ndarray) -> dict[str, list[float]]:
    """Mean, 95th percentile and max of absolute errors (N, A), per DoF (column)."""
    err = np.abs(np.asarray(errors, dtype=np.float64))
    if err.ndim != 2 or err.shape[0] == 0:
        raise ValueError(f"errors must be (N>=1, A), got shape {err.shape}")
    return {
        "mean": err.mean(axis=0).tolist(),
        "p95": np.percentile(err, 95, axis=0).tolist(),
        "max": err.max(axis=0).tolist(),
    }


def horizon_errors(
    reference_chunks: np.ndarray, candidate_chunks: np.ndarray
) -> dict[str, list[list[float]]]:
    """Error growth over the chunk horizon: mean and p95 |Δ| per (horizon index, DoF) → (H, A) lists."""
    err = open_loop_errors(candidate_chunks, reference_chunks)
    if err.ndim != 3:
        raise ValueError(f"chunks must be (N, H, A), got {np.shape(reference_chunks)}")
    return {"mean": err.mean(axis=0).tolist(), "p95": np.percentile(err, 95, axis=0).tolist()}


def virtual_chain_jacobian(q: np.ndarray) -> np.ndarray:
    """DA-PTQ's structural Jacobian (3, n) of a virtual planar chain with joint increments ``q``.

    θ_j = Σ_{i≤j} q_i; J_x^(j) = −Σ_{k≥j} sin θ_k, J_y^(j) = Σ_{k≥j} cos θ_k, J_θ^(j) = 1, except
    that the last joint has no link after it (zero translation entries), as in the paper.
    """
    q = np.asarray(q, dtype=np.float64).reshape(-1)
    n = q.size
    theta = np.cumsum(q)
    sin_tail = np.cumsum(np.sin(theta)[::-1])[::-1]
    cos_tail = np.cumsum(np.cos(theta)[::-1])[::-1]
    jac = np.stack([-sin_tail, cos_tail, np.ones(n)])
    if n:
        jac[:2, -1] = 0.0
        # Sums run to the second-to-last joint: the last joint's own link is absent.
        jac[0, :-1] += np.sin(theta[-1])
        jac[1, :-1] -= np.cos(theta[-1])
    return jac


def step_displacements(
    reference: np.ndarray, candidate: np.ndarray, kinematics: KinematicsConfig
) -> np.ndarray:
    """Per-step end-effector displacement error δe_t (N, 3) in metres from executed actions (N, A)."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape or ref.ndim != 2:
        raise ValueError(f"actions must be (N, A) and equal in shape, got {ref.shape} and {cand.shape}")
    eps = cand - ref
    n, a = eps.shape
    out = np.zeros((n, 3))
    if kinematics.model == "ee_delta":
        dims = list(kinematics.translation_dims)
        if max(dims) >= a:
            raise ValueError(f"translation_dims {dims} exceed the action size {a}")
        out[:, : len(dims)] = eps[:, dims]
    elif kinematics.model == "matrix":
        jac = np.asarray(kinematics.jacobian, dtype=np.float64)
        if jac.shape != (3, a):
            raise ValueError(f"jacobian has shape {jac.shape}, the actions need (3, {a})")
        out = eps @ jac.T
    else:
        for t in range(n):
            jac = virtual_chain_jacobian(ref[t])
            out[t, :2] = jac[:2] @ eps[t]
    return out * kinematics.action_scale


def cumulative_drift(displacements: np.ndarray, episodes: np.ndarray) -> np.ndarray:
    """E_t = Σ δe_s over the steps s ≤ t of the same episode (N, 3); restarts per episode."""
    disp = np.asarray(displacements, dtype=np.float64)
    ep = np.asarray(episodes)
    if disp.ndim != 2 or ep.shape != (disp.shape[0],):
        raise ValueError(f"displacements (N, D) and episodes (N,) required, got {disp.shape} and {ep.shape}")
    out = np.cumsum(disp, axis=0)
    starts = np.flatnonzero(np.r_[True, ep[1:] != ep[:-1]])
    for s, e in zip(starts, [*starts[1:], len(ep)], strict=True):
        out[s:e] = np.cumsum(disp[s:e], axis=0)
    return out


def time_to_threshold(
    drift_norm: np.ndarray, t_s: np.ndarray, episodes: np.ndarray, threshold: float
) -> dict[int, float | None]:
    """Seconds from each episode's first frame until |E_t| first exceeds ``threshold`` (None = never)."""
    drift_norm = np.asarray(drift_norm, dtype=np.float64)
    t_s = np.asarray(t_s, dtype=np.float64)
    episodes = np.asarray(episodes)
    out: dict[int, float | None] = {}
    for ep in dict.fromkeys(episodes.tolist()):
        idx = np.flatnonzero(episodes == ep)
        over = idx[drift_norm[idx] > threshold]
        out[int(ep)] = float(t_s[over[0]] - t_s[idx[0]]) if over.size else None
    return out


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> list[float]:
    """Per-DoF signal-to-quantization-noise ratio 10·log10(Σ ref² / Σ (cand − ref)²) of (N, A) actions."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = np.sum((np.asarray(candidate, dtype=np.float64) - ref) ** 2, axis=0)
    signal = np.sum(ref**2, axis=0)
    return [
        math.inf if n == 0 else (10 * math.log10(s / n) if s > 0 else -math.inf)
        for s, n in zip(signal.tolist(), noise.tolist(), strict=True)
    ]


@dataclass
class GateCheck:
    """One gated quantity: its measured value, its limit and whether it passed."""

    name: str
    value: float | None
    limit: float
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit, "passed": self.passed}


def evaluate_gate(
    action_names: Sequence[str],
    stats: dict[str, list[float]],
    max_drift_m: float,
    min_time_to_threshold_s: float | None,
    thresholds: Thresholds,
) -> list[GateCheck]:
    """Compare the measured statistics with the thresholds; returns one check per configured limit."""
    checks: list[GateCheck] = []
    unknown = sorted(set(thresholds.per_dof) - set(action_names))
    if unknown:
        raise ValueError(
            f"thresholds.per_dof names unknown DoF(s) {unknown}; actions are {list(action_names)}"
        )
    for j, name in enumerate(action_names):
        limits = thresholds.for_dof(name)
        for stat in ("mean", "p95", "max"):
            limit = getattr(limits, stat)
            if limit is not None:
                value = float(stats[stat][j])
                checks.append(GateCheck(f"{name}.{stat}", value, float(limit), value <= limit))
    if thresholds.drift_m is not None:
        checks.append(
            GateCheck(
                "drift_m", float(max_drift_m), float(thresholds.drift_m), max_drift_m <= thresholds.drift_m
            )
        )
    if thresholds.min_time_to_threshold_s is not None:
        limit = float(thresholds.min_time_to_threshold_s)
        passed = min_time_to_threshold_s is None or min_time_to_threshold_s >= limit
        checks.append(GateCheck("min_time_to_threshold_s", min_time_to_threshold_s, limit, passed))
    return checks
