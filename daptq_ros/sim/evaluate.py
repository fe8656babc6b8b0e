"""Closed-loop Meta-World evaluation: success with confidence intervals and kinematic drift.

For every task and every seed ``seed0 .. seed0 + episodes - 1`` (default seed0 = 100_000, never
used by demonstrations) the candidate policy runs one episode from the seed's fixed layout, reset
with the task's canonical instruction and the seed, until success or the step cap (200).

With a reference policy (e.g. the FP model when the candidate is its quantized version), on the
same seeds:

- **open loop**: at every candidate step, both policies predict a chunk for the candidate's
  observation with the same noise (drawn from the evaluator's generator seeded by
  ``(noise_seed, seed)``) → per-DoF absolute action error, per chunk position too;
- **closed loop**: the reference's own rollout → end-effector divergence (mean / final / max
  distance of the hand, shorter rollout padded with its last position) and per-DoF action RMS
  difference over the common prefix;
- **paired success**: both / only reference / only candidate / neither.

Episodes are spread over spawned worker processes; results are sorted by (task, seed) and do not
depend on the number of workers (only the timing section does).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from daptq_ros import __version__
from daptq_ros.policy_api import ACTION_NAMES, StepPolicy
from daptq_ros.sim import metrics
from daptq_ros.sim.dataset_index import write_npz_atomic
from daptq_ros.sim.parallel import imap_unordered, make_executor
from daptq_ros.sim.tasks import EVAL_SEED_START, MT10_TASKS, canonical_instruction, parse_tasks

logger = logging.getLogger(__name__)

RESULT_FORMAT = "daptq-eval"
RESULT_VERSION = 1

PolicySpec = str | os.PathLike | StepPolicy


# ---------------------------------------------------------------------------- policies
def load_policy(spec: str | os.PathLike, threads: int | None = None) -> StepPolicy:
    """Load a StepPolicy from a spec string.

    Args:
        spec: ``"expert"`` (Meta-World's scripted expert), an artifact directory containing
            ``manifest.json`` (ONNX, :class:`daptq_ros.runtime.onnx_policy.OnnxStepPolicy`) or a
            ``.safetensors`` checkpoint, FP or quantized
            (:meth:`daptq_ros.model.torch_policy.TorchPolicy.from_checkpoint`).
        threads: CPU threads for inference (ORT intra-op threads / ``torch.set_num_threads``);
            None keeps the library default. Evaluation workers use 1 so they do not oversubscribe.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the path is neither an artifact directory nor a ``.safetensors`` file.
    """
    kind = policy_kind(spec)
    if kind == "expert":
        from daptq_ros.sim.expert import ExpertPolicy

        return ExpertPolicy()
    if kind == "onnx":
        from daptq_ros.runtime.onnx_policy import OnnxStepPolicy

        return OnnxStepPolicy(str(spec), threads=threads)
    import torch

    from daptq_ros.model.torch_policy import TorchPolicy

    if threads is not None:
        torch.set_num_threads(threads)
    return TorchPolicy.from_checkpoint(str(spec))


def policy_kind(spec: str | os.PathLike) -> str:
    """Classify a policy spec without loading it: ``"expert"``, ``"onnx"`` or ``"torch"``.

    Raises:
        FileNotFoundError / ValueError: as :func:`load_policy`.
    """
    if str(spec) == "expert":
        return "expert"
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"policy {str(spec)!r} not found (expected 'expert', an artifact directory with "
            "manifest.json, or a .safetensors checkpoint)"
        )
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise ValueError(f"policy directory {path} has no manifest.json (not an exported artifact)")
        return "onnx"
    if path.suffix == ".safetensors":
        return "torch"
    raise ValueError(
        f"unsupported policy file {path} (expected 'expert', an artifact directory with "
        "manifest.json, or a .safetensors checkpoint)"
    )


# ---------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how.

    Args:
        tasks: MT10 task names (report order).
        episodes: episodes (seeds) per task.
        seed: first layout seed; seeds ``seed .. seed + episodes - 1`` for every task.
        max_steps: step cap per episode.
        image_size: main camera render size.
        camera: main camera.
        wrist_camera: optional wrist camera passed as ``Observation.wrist_image``.
        workers: worker processes (1 = in-process).
        noise_seed: seeds the open-loop probe noise generator (with the episode seed).
        policy_threads: CPU inference threads of policies loaded from specs (ORT intra-op /
            torch); None keeps the library default. Default 1: measured on the shared 2-core
            machine, the reference VLA's chunk took 22 ms with 1 torch thread and 865 ms with 2
            under load (thread oversubscription next to the renderer and other workers).
    """

    tasks: tuple[str, ...] = MT10_TASKS
    episodes: int = 20
    seed: int = EVAL_SEED_START
    max_steps: int = 200
    image_size: int = 128
    camera: str = "corner4"
    wrist_camera: str | None = None
    workers: int = 2
    noise_seed: int = 0
    policy_threads: int | None = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(parse_tasks(list(self.tasks))))
        for name, low in (("episodes", 1), ("seed", 0), ("max_steps", 1), ("workers", 1), ("noise_seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.policy_threads is not None and (
            isinstance(self.policy_threads, bool) or not isinstance(self.policy_threads, int)
            or self.policy_threads < 1
        ):
            raise ValueError(f"policy_threads must be None or an integer >= 1, got {self.policy_threads!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or not (
            8 <= self.image_size <= 1024
        ):
            raise ValueError(f"image_size must be an integer in [8, 1024], got {self.image_size!r}")


# ---------------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    """One closed-loop episode: hand positions (T+1, 3) incl. the start, applied actions (T, 4)."""

    success: bool
    hand: np.ndarray
    actions: np.ndarray
    act_seconds: float
    aborted: str | None = None
    probe_errors: np.ndarray | None = None  # (T, H, A) open-loop errors vs the reference

    @property
    def steps(self) -> int:
        """Number of control steps taken."""
        return int(self.actions.shape[0])


def rollout(
    env: Any,
    policy: StepPolicy,
    seed: int,
    max_steps: int,
    probe: StepPolicy | None = None,
    noise_seed: int = 0,
) -> Rollout:
    """Run ``policy`` for one episode of ``env`` from layout ``seed``.

    Args:
        env: an open :class:`~daptq_ros.sim.env.MetaWorldEnv`.
        policy: the policy that acts.
        seed: layout seed (also the policy's reset seed).
        max_steps: step cap; the episode ends earlier at success.
        probe: optional reference; at every step both predict a chunk for the same observation
            with the same noise, and the absolute differences are recorded.
        noise_seed: seeds the probe noise generator together with ``seed``.
    """
    instruction = canonical_instruction(env.task)
    obs = env.reset(seed)
    policy.reset(instruction, seed)
    if probe is not None:
        probe.reset(instruction, seed)
    hands = [env.hand_position]
    actions: list[np.ndarray] = []
    errors: list[np.ndarray] = []
    horizon = max(policy.chunk_size, probe.chunk_size) if probe is not None else 0
    noise_rng = np.random.default_rng([noise_seed, seed])
    success, aborted, act_s = False, None, 0.0
    for t in range(max_steps):
        if probe is not None:
            noise = noise_rng.standard_normal((horizon, len(ACTION_NAMES))).astype(np.float32)
            cand = policy.predict_chunk(obs, noise[: policy.chunk_size])
            ref = probe.predict_chunk(obs, noise[: probe.chunk_size])
            errors.append(metrics.open_loop_errors(cand, ref))
        t0 = time.perf_counter()
        action = np.asarray(policy.act(obs), dtype=np.float32).reshape(-1)
        act_s += time.perf_counter() - t0
        if action.shape != (len(ACTION_NAMES),):
            raise ValueError(
                f"policy returned an action of shape {action.shape}, expected ({len(ACTION_NAMES)},)"
            )
        if not np.all(np.isfinite(action)):
            aborted = f"non-finite action at step {t}"
            logger.warning("%s seed %d: %s, episode counted as failed", env.task, seed, aborted)
            break
        obs, success, info = env.step(action)
        actions.append(info["action"])
        hands.append(env.hand_position)
        if success:
            break
    return Rollout(
        success=success,
        hand=np.asarray(hands, dtype=np.float64),
        actions=np.asarray(actions, dtype=np.float32).reshape(-1, len(ACTION_NAMES)),
        act_seconds=act_s,
        aborted=aborted,
        probe_errors=np.asarray(errors, dtype=np.float64) if probe is not None else None,
    )


# ---------------------------------------------------------------------------- worker side
_W: dict[str, Any] = {}


def _as_policy(spec: PolicySpec, threads: int | None) -> StepPolicy:
    return load_policy(spec, threads) if isinstance(spec, (str, os.PathLike)) else spec


def _spec_name(spec: PolicySpec | None) -> str | None:
    if spec is None or isinstance(spec, (str, os.PathLike)):
        return None if spec is None else str(spec)
    return f"<{type(spec).__module__}.{type(spec).__qualname__} instance>"


def _init_worker(
    policy_spec: PolicySpec,
    reference_spec: PolicySpec | None,
    image_size: int,
    camera: str,
    wrist_camera: str | None,
    in_process: bool,
    threads: int | None,
) -> None:
    from daptq_ros.sim.env import EnvCache

    _W.clear()
    _W["envs"] = EnvCache(image_size, camera, wrist_camera, close_at_exit=not in_process)
    torch_specs = [sp for sp in (policy_spec, reference_spec)
                   if isinstance(sp, (str, os.PathLike)) and policy_kind(sp) == "torch"]
    if in_process and threads is not None and torch_specs:
        import torch

        _W["torch_threads"] = torch.get_num_threads()  # restored by _close_worker
    try:
        _W["policy"] = _as_policy(policy_spec, threads)
        _W["reference"] = _as_policy(reference_spec, threads) if reference_spec is not None else None
    except Exception as err:  # reported by the first job: pool initializer errors lose the message
        _W["init_error"] = f"{type(err).__name__}: {err}"
        if in_process:
            raise


def _close_worker() -> None:
    envs = _W.pop("envs", None)
    if envs is not None:
        envs.close()
    if "torch_threads" in _W:  # in-process run: give the caller its torch thread count back
        sys.modules["torch"].set_num_threads(_W.pop("torch_threads"))


def _episode_job(task: str, seed: int, max_steps: int, noise_seed: int) -> dict[str, Any]:
    if "init_error" in _W:
        raise RuntimeError(f"worker could not load the policies: {_W['init_error']}")
    env = _W["envs"].get(task)
    reference = _W["reference"]
    t0 = time.perf_counter()
    cand = rollout(env, _W["policy"], seed, max_steps, probe=reference, noise_seed=noise_seed)
    record: dict[str, Any] = {"task": task, "seed": seed, "candidate": cand}
    if reference is not None:
        record["reference"] = rollout(env, reference, seed, max_steps)
    record["wall_s"] = time.perf_counter() - t0
    return record


# ---------------------------------------------------------------------------- aggregation
def _episode_summary(rec: dict[str, Any]) -> dict[str, Any]:
    cand: Rollout = rec["candidate"]
    out: dict[str, Any] = {"task": rec["task"], "seed": rec["seed"], "success": cand.success,
                           "steps": cand.steps, "aborted": cand.aborted}
    ref: Rollout | None = rec.get("reference")
    if ref is not None:
        div = metrics.trajectory_divergence(cand.hand, ref.hand)
        out.update({
            "reference_success": ref.success,
            "reference_steps": ref.steps,
            "reference_aborted": ref.aborted,
            "ee_mean_distance": div["mean"],
            "ee_final_distance": div["final"],
            "ee_max_distance": div["max"],
            "action_rms_diff": metrics.action_rms_difference(cand.actions, ref.actions).tolist(),
            "action_common_steps": min(cand.steps, ref.steps),
            "open_loop_mae": (cand.probe_errors.mean(axis=(0, 1)).tolist()
                              if cand.probe_errors is not None and cand.probe_errors.size else []),
        })
    return out


def _group_summary(records: list[dict[str, Any]], episodes: list[dict[str, Any]]) -> dict[str, Any]:
    succ = [e["success"] for e in episodes]
    steps = [e["steps"] for e in episodes]
    ok_steps = [e["steps"] for e in episodes if e["success"]]
    out: dict[str, Any] = {
        **metrics.success_summary(succ),
        "mean_steps": float(np.mean(steps)),
        "mean_steps_success": float(np.mean(ok_steps)) if ok_steps else None,
    }
    if episodes and "reference_success" in episodes[0]:
        ref_succ = [e["reference_success"] for e in episodes]
        ref_ok = [e["reference_steps"] for e in episodes if e["reference_success"]]
        out["reference"] = {
            **metrics.success_summary(ref_succ),
            "mean_steps": float(np.mean([e["reference_steps"] for e in episodes])),
            "mean_steps_success": float(np.mean(ref_ok)) if ref_ok else None,
        }
        out["paired"] = metrics.paired_success_counts(succ, ref_succ)
        out["drift"] = {
            "ee_mean_distance": float(np.mean([e["ee_mean_distance"] for e in episodes])),
            "ee_final_distance": float(np.mean([e["ee_final_distance"] for e in episodes])),
            "ee_max_distance": float(np.max([e["ee_max_distance"] for e in episodes])),
            "action_rms_diff_per_dof": metrics.pooled_rms(
                [np.asarray(e["action_rms_diff"]) for e in episodes],
                [e["action_common_steps"] for e in episodes],
            ).tolist(),
            "open_loop": metrics.aggregate_action_errors([r["candidate"].probe_errors for r in records]),
        }
    return out


def _save_trajectory(root: Path, rec: dict[str, Any]) -> None:
    cand: Rollout = rec["candidate"]
    arrays: dict[str, np.ndarray] = {
        "task": np.array(rec["task"]), "seed": np.array(rec["seed"], dtype=np.int64),
        "hand": cand.hand.astype(np.float32), "action": cand.actions,
        "success": np.array(cand.success), "steps": np.array(cand.steps, dtype=np.int64),
    }
    ref: Rollout | None = rec.get("reference")
    if ref is not None:
        arrays.update({
            "ref_hand": ref.hand.astype(np.float32), "ref_action": ref.actions,
            "ref_success": np.array(ref.success), "ref_steps": np.array(ref.steps, dtype=np.int64),
            "open_loop_error": cand.probe_errors.astype(np.float32),
        })
    write_npz_atomic(root / rec["task"] / f"{rec['task']}_s{rec['seed']}.npz", arrays)


@dataclass
class _Timing:
    wall_s: float = 0.0
    env_steps: int = 0
    act_s: dict[str, float] = field(default_factory=lambda: {"candidate": 0.0, "reference": 0.0})
    act_calls: dict[str, int] = field(default_factory=lambda: {"candidate": 0, "reference": 0})


def evaluate(
    policy: PolicySpec,
    reference: PolicySpec | None = None,
    config: EvalConfig | None = None,
    trajectories: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate ``policy`` (and its drift against ``reference``) closed-loop on MT10.

    Args:
        policy: candidate policy spec (see :func:`load_policy`), or a StepPolicy object (e.g. an
            in-memory fake-quant model); objects run in this process (``workers`` is ignored).
        reference: optional reference policy (same forms) for drift metrics.
        config: tasks, episodes, seeds, cap, workers.
        trajectories: directory for per-episode ``<task>/<task>_s<seed>.npz`` trajectories.

    Returns:
        the JSON-serializable result object (``format`` ``daptq-eval`` version 1): ``config``,
        ``tasks`` (per-task summaries), ``overall``, ``episodes`` (per-episode scalars, sorted by
        task then seed) and ``timing``.
    """
    config = config or EvalConfig()
    in_memory = False
    for spec in (policy, reference):
        if isinstance(spec, (str, os.PathLike)):
            policy_kind(spec)  # fail fast, before spawning workers
        elif spec is not None:
            if not isinstance(spec, StepPolicy):
                raise TypeError(f"policy must be a spec or a StepPolicy, got {type(spec).__name__}")
            in_memory = True
    jobs = [(t, s, config.max_steps, config.noise_seed)
            for t in config.tasks for s in range(config.seed, config.seed + config.episodes)]
    workers = 1 if in_memory else min(config.workers, len(jobs))
    in_process = workers == 1
    initargs = (policy if in_memory else str(policy),
                reference if in_memory or reference is None else str(reference), config.image_size,
                config.camera, config.wrist_camera, in_process, config.policy_threads)
    traj_root = Path(trajectories) if trajectories is not None else None
    records: list[dict[str, Any]] = []
    timing = _Timing()
    t0 = time.perf_counter()
    executor = make_executor(workers, _init_worker, initargs, _close_worker)
    try:
        with tqdm(total=len(jobs), desc="evaluate", unit="ep", dynamic_ncols=True) as bar:
            for rec in imap_unordered(executor, _episode_job, jobs, max_inflight=2 * workers):
                records.append(rec)
                if traj_root is not None:
                    _save_trajectory(traj_root, rec)
                for role in ("candidate", "reference"):
                    if role in rec:
                        timing.env_steps += rec[role].steps
                        timing.act_s[role] += rec[role].act_seconds
                        timing.act_calls[role] += rec[role].steps
                bar.update(1)
                bar.set_postfix(success=f"{np.mean([r['candidate'].success for r in records]):.2f}")
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    timing.wall_s = time.perf_counter() - t0

    order = {t: i for i, t in enumerate(config.tasks)}
    records.sort(key=lambda r: (order[r["task"]], r["seed"]))
    episodes = [_episode_summary(r) for r in records]
    tasks = {
        task: _group_summary(
            [r for r in records if r["task"] == task], [e for e in episodes if e["task"] == task]
        )
        for task in config.tasks
    }
    overall = _group_summary(records, episodes)
    overall["mean_task_success_rate"] = float(np.mean([tasks[t]["success_rate"] for t in config.tasks]))
    return {
        "format": RESULT_FORMAT,
        "version": RESULT_VERSION,
        "package_version": __version__,
        "policy": _spec_name(policy),
        "reference": _spec_name(reference),
        "config": {**asdict(config), "tasks": list(config.tasks)},
        "action_names": list(ACTION_NAMES),
        "tasks": tasks,
        "overall": overall,
        "episodes": episodes,
        "timing": {
            "wall_s": timing.wall_s,
            "workers": workers,
            "env_steps": timing.env_steps,
            "env_steps_per_s": timing.env_steps / max(timing.wall_s, 1e-9),
            "episodes_per_min": 60.0 * len(records) / max(timing.wall_s, 1e-9),
            "act_ms": {role: 1e3 * timing.act_s[role] / timing.act_calls[role]
                       for role in timing.act_calls if timing.act_calls[role]},
        },
    }


def format_table(result: dict[str, Any]) -> str:
    """Human-readable per-task table of an :func:`evaluate` result."""
    has_ref = result.get("reference") is not None
    head = f"{'task':<26}{'success':>9}{'95% CI':>15}{'steps':>8}"
    if has_ref:
        head += f"{'ref succ':>10}{'paired b/r/c/n':>16}{'ee mean':>9}{'ee final':>10}{'OL mae':>8}"
    lines = [head, "-" * len(head)]
    rows = [*result["tasks"].items(), ("overall", result["overall"])]
    for name, s in rows:
        lo, hi = s["ci95"]
        line = f"{name:<26}{s['success_rate']:>9.1%}{f'[{lo:.2f}, {hi:.2f}]':>15}{s['mean_steps']:>8.1f}"
        if has_ref:
            p, d = s["paired"], s["drift"]
            ol = d["open_loop"]["mean_per_dof"]
            paired = f"{p['both']}/{p['only_reference']}/{p['only_candidate']}/{p['neither']}"
            line += (f"{s['reference']['success_rate']:>10.1%}{paired:>16}"
                     f"{d['ee_mean_distance']:>9.4f}{d['ee_final_distance']:>10.4f}"
                     f"{(float(np.mean(ol)) if ol else 0.0):>8.4f}")
        lines.append(line)
    t = result["timing"]
    lines.append(f"{t['env_steps']} env steps in {t['wall_s']:.1f} s ({t['env_steps_per_s']:.1f} steps/s, "
                 f"{t['episodes_per_min']:.1f} episodes/min, {t['workers']} worker(s))")
    if has_ref:
        lines.append("paired: both / only reference / only candidate / neither succeeded; ee: hand distance "
                     "(m) between the two rollouts; OL mae: open-loop mean |action error| (DoFs, chunk)")
    return "\n".join(lines)
