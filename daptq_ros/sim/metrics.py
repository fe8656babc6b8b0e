"""Success statistics and kinematic drift metrics (pure numpy; reused by the drift tools).

Conventions:
- Trajectories are (T, D) arrays aligned by control step. When two rollouts have different
  lengths (an episode ends at success), end-effector positions of the shorter one are padded with
  its last position (the arm holds still after the episode ends).
- Action differences between two closed-loop rollouts are taken over the common prefix only
  (there is no action after an episode ends).
- Open-loop action errors are (T, H, A) arrays: per control step, per chunk position, per DoF.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054
"""Two-sided 95% standard-normal quantile."""


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Args:
        successes: number of successes (0..n).
        n: number of trials; n == 0 gives the uninformative (0, 1).
        z: normal quantile (default: 95% two-sided).

    Raises:
        ValueError: negative n or successes outside [0, n].
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def success_summary(successes: Sequence[bool], z: float = Z_95) -> dict[str, float | int | list[float]]:
    """Count, rate and Wilson interval of a sequence of episode outcomes."""
    k = int(sum(bool(s) for s in successes))
    n = len(successes)
    lo, hi = wilson_interval(k, n, z)
    return {"episodes": n, "successes": k, "success_rate": k / n if n else 0.0, "ci95": [lo, hi]}


def pad_to_length(traj: np.ndarray, length: int) -> np.ndarray:
    """Pad a (T, D) trajectory to ``length`` rows by repeating its last row (T >= 1)."""
    traj = np.asarray(traj)
    if traj.ndim != 2 or traj.shape[0] < 1:
        raise ValueError(f"trajectory must be (T>=1, D), got shape {traj.shape}")
    if length < traj.shape[0]:
        raise ValueError(f"cannot pad a trajectory of {traj.shape[0]} steps to {length}")
    if length == traj.shape[0]:
        return traj
    tail = np.repeat(traj[-1:], length - traj.shape[0], axis=0)
    return np.concatenate([traj, tail], axis=0)


def trajectory_divergence(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Euclidean distance between two position trajectories aligned by step.

    Args:
        a: (Ta, D) positions (e.g. hand xyz per step).
        b: (Tb, D) positions; the shorter trajectory is padded with its last position.

    Returns:
        ``{"mean", "final", "max"}`` distances (same unit as the input).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"trajectories must be (T, D) with the same D, got {a.shape} and {b.shape}")
    length = max(a.shape[0], b.shape[0])
    dist = np.linalg.norm(pad_to_length(a, length) - pad_to_length(b, length), axis=1)
    return {"mean": float(dist.mean()), "final": float(dist[-1]), "max": float(dist.max())}


def action_rms_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-DoF RMS difference of two (T, A) action sequences over their common prefix.

    Returns:
        (A,) float64; zeros when either sequence is empty.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"action sequences must be (T, A) with the same A, got {a.shape} and {b.shape}")
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return np.zeros(a.shape[1])
    return np.sqrt(np.mean((a[:n] - b[:n]) ** 2, axis=0))


def pooled_rms(rms: Sequence[np.ndarray], counts: Sequence[int]) -> np.ndarray:
    """Combine per-episode RMS values (each (A,), over ``counts[i]`` steps) into one RMS over all
    steps: ``sqrt(sum(n_i * rms_i**2) / sum(n_i))``. Zeros when no steps."""
    if len(rms) != len(counts):
        raise ValueError(f"got {len(rms)} RMS vectors but {len(counts)} counts")
    n = np.asarray(counts, dtype=np.float64)
    if not len(rms) or n.sum() == 0:
        return np.zeros(np.asarray(rms[0]).shape if len(rms) else (0,))
    sq = np.stack([np.asarray(r, dtype=np.float64) ** 2 for r in rms])
    return np.sqrt((n[:, None] * sq).sum(axis=0) / n.sum())


def open_loop_errors(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Absolute per-DoF error of paired chunk predictions over their common horizon.

    Args:
        candidate: (T, Hc, A) or (Hc, A) chunks.
        reference: (T, Hr, A) or (Hr, A) chunks predicted from the same inputs and noise.

    Returns:
        (..., min(Hc, Hr), A) absolute errors.
    """
    c = np.asarray(candidate, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if c.ndim != r.ndim or c.ndim not in (2, 3) or c.shape[-1] != r.shape[-1] or c.shape[:-2] != r.shape[:-2]:
        raise ValueError(
            f"chunks must be (T, H, A) or (H, A) with matching T and A, got {c.shape}, {r.shape}"
        )
    h = min(c.shape[-2], r.shape[-2])
    return np.abs(c[..., :h, :] - r[..., :h, :])


def aggregate_action_errors(errors: Sequence[np.ndarray]) -> dict[str, list]:
    """Pool open-loop errors of many episodes, each (T_i, H, A), weighting every step equally.

    Returns:
        ``mean_per_dof`` (A,), ``rms_per_dof`` (A,), ``max_per_dof`` (A,), ``mean_first_action``
        (A,) (chunk position 0, the action that would be executed now), ``mean_per_horizon``
        (H, A) and ``steps`` (number of pooled steps). Empty input gives ``steps`` 0 and empty lists.
    """
    arrays = [np.asarray(e, dtype=np.float64) for e in errors if np.asarray(e).size]
    if not arrays:
        return {"steps": 0, "mean_per_dof": [], "rms_per_dof": [], "max_per_dof": [],
                "mean_first_action": [], "mean_per_horizon": []}
    shapes = {e.shape[1:] for e in arrays}
    if len(shapes) != 1 or arrays[0].ndim != 3:
        raise ValueError(f"errors must all be (T, H, A) with the same H and A, got {sorted(shapes)}")
    err = np.concatenate(arrays, axis=0)
    return {
        "steps": int(err.shape[0]),
        "mean_per_dof": err.mean(axis=(0, 1)).tolist(),
        "rms_per_dof": np.sqrt((err**2).mean(axis=(0, 1))).tolist(),
        "max_per_dof": err.max(axis=(0, 1)).tolist(),
        "mean_first_action": err[:, 0, :].mean(axis=0).tolist(),
        "mean_per_horizon": err.mean(axis=0).tolist(),
    }


def paired_success_counts(candidate: Sequence[bool], reference: Sequence[bool]) -> dict[str, int]:
    """Paired outcome table of two policies evaluated on the same seeds.

    Returns:
        ``{"both", "only_reference", "only_candidate", "neither"}`` episode counts.
    """
    if len(candidate) != len(reference):
        raise ValueError(f"paired outcomes need equal lengths, got {len(candidate)} and {len(reference)}")
    c = np.asarray(candidate, dtype=bool)
    r = np.asarray(reference, dtype=bool)
    return {
        "both": int(np.sum(c & r)),
        "only_reference": int(np.sum(r & ~c)),
        "only_candidate": int(np.sum(c & ~r)),
        "neither": int(np.sum(~c & ~r)),
    }
