"""Scripted demonstrations: run Meta-World's experts and store successful episodes.

Each task gets ``episodes_per_task`` successful episodes from seeds ``seed0, seed0 + 1, ...``;
when an episode fails (cap reached) the next unused seed is tried, so the stored set is always
"the first N successful seeds", independent of the number of workers. Files are written to a
temporary name and renamed, so a killed run never leaves a half-written episode, and a rerun
skips episodes that already exist (resume).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from daptq_ros.sim.dataset_index import episode_path, list_episodes, parse_episode_name, write_npz_atomic
from daptq_ros.sim.parallel import make_executor
from daptq_ros.sim.tasks import EVAL_SEED_START, canonical_instruction, parse_tasks

logger = logging.getLogger(__name__)

DEFAULT_MAX_STEPS = 200


@dataclass
class TaskDemoSummary:
    """Outcome of demo generation for one task."""

    task: str
    requested: int
    existing: int = 0
    written: int = 0
    failed_seeds: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    @property
    def available(self) -> int:
        """Episodes on disk for this task after the run."""
        return self.existing + self.written

    @property
    def complete(self) -> bool:
        """True when the task has at least the requested number of episodes."""
        return self.available >= self.requested


def record_episode(env: Any, expert: Any, seed: int, max_steps: int) -> dict[str, Any]:
    """Roll out ``expert`` in ``env`` from layout ``seed`` until success or ``max_steps``.

    Args:
        env: an open :class:`~daptq_ros.sim.env.MetaWorldEnv`.
        expert: a StepPolicy (normally :class:`~daptq_ros.sim.expert.ExpertPolicy`).
        seed: layout seed.
        max_steps: step cap.

    Returns:
        the episode dict in the on-disk format (per-step observations and the clipped action
        taken at each of them; ``success`` tells whether the last step reached the goal).
    """
    instruction = canonical_instruction(env.task)
    obs = env.reset(seed)
    expert.reset(instruction, seed)
    images, proprio, state, actions = [], [], [], []
    success = False
    for _ in range(max_steps):
        action = np.clip(np.asarray(expert.act(obs), dtype=np.float32), -1.0, 1.0)
        images.append(obs.image)
        proprio.append(obs.proprio)
        state.append(obs.state)
        actions.append(action)
        obs, success, _info = env.step(action)
        if success:
            break
    return {
        "image": np.stack(images).astype(np.uint8),
        "proprio": np.stack(proprio).astype(np.float32),
        "state": np.stack(state).astype(np.float32),
        "action": np.stack(actions).astype(np.float32),
        "instruction": instruction,
        "task": env.task,
        "seed": int(seed),
        "success": bool(success),
    }


def save_episode(path: str | Path, episode: dict[str, Any]) -> Path:
    """Write ``episode`` atomically (temp file + rename) with ``np.savez_compressed``."""
    arrays = {
        "image": np.asarray(episode["image"], dtype=np.uint8),
        "proprio": np.asarray(episode["proprio"], dtype=np.float32),
        "state": np.asarray(episode["state"], dtype=np.float32),
        "action": np.asarray(episode["action"], dtype=np.float32),
        "instruction": np.array(str(episode["instruction"])),
        "task": np.array(str(episode["task"])),
        "seed": np.array(int(episode["seed"]), dtype=np.int64),
        "success": np.array(bool(episode["success"])),
    }
    return write_npz_atomic(path, arrays)


# ---------------------------------------------------------------------------- worker side
_WORKER: dict[str, Any] = {}


def _init_worker(image_size: int) -> None:
    from daptq_ros.sim.env import EnvCache

    _WORKER["envs"] = EnvCache(image_size=image_size, close_at_exit=True)


def _demo_job(out_dir: str, task: str, seed: int, max_steps: int) -> tuple[str, int, bool, int]:
    """Run one expert episode; save it when successful. Returns (task, seed, success, steps)."""
    from daptq_ros.sim.expert import ExpertPolicy

    env = _WORKER["envs"].get(task)
    episode = record_episode(env, ExpertPolicy(task), seed, max_steps)
    if episode["success"]:
        save_episode(episode_path(out_dir, task, seed), episode)
    return task, seed, episode["success"], int(episode["action"].shape[0])


def _close_worker() -> None:
    envs = _WORKER.pop("envs", None)
    if envs is not None:
        envs.close()


# ---------------------------------------------------------------------------- driver
def _existing_seeds(out_dir: Path, task: str) -> set[int]:
    if not out_dir.is_dir():
        return set()
    return {parse_episode_name(p)[1] for p in list_episodes(out_dir, [task])}


def generate_demos(
    out_dir: str | Path,
    tasks: str | list[str] = "all",
    episodes_per_task: int = 50,
    seed: int = 0,
    workers: int = 2,
    image_size: int = 128,
    max_steps: int = DEFAULT_MAX_STEPS,
    max_extra_seeds: int | None = None,
) -> list[TaskDemoSummary]:
    """Generate (or complete) a demonstration dataset.

    Args:
        out_dir: dataset root; episodes go to ``out_dir/<task>/<task>_s<seed>.npz``.
        tasks: ``"all"``, ``"t1,t2"`` or a list of MT10 task names.
        episodes_per_task: successful episodes wanted per task (existing files count).
        seed: first layout seed ``seed0``; seeds ``seed0, seed0 + 1, ...`` are used in order.
        workers: processes (spawn); 1 runs in this process.
        image_size: render size of the ``corner4`` camera.
        max_steps: step cap per episode (failed episodes are dropped).
        max_extra_seeds: failed episodes tolerated per task before giving up
            (default: max(5, episodes_per_task)).

    Returns:
        one :class:`TaskDemoSummary` per task, in task order.
    """
    task_list = parse_tasks(tasks)
    for name, value, low in (("episodes_per_task", episodes_per_task, 1), ("workers", workers, 1),
                             ("max_steps", max_steps, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    extra_limit = max(5, episodes_per_task) if max_extra_seeds is None else int(max_extra_seeds)
    if seed + episodes_per_task + extra_limit > EVAL_SEED_START:
        logger.warning("demo seeds from %d may reach the evaluation seeds (>= %d): evaluation layouts "
                       "would no longer be held out", seed, EVAL_SEED_START)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*/*.npz.tmp*"):  # left by a killed run; never a complete episode
        stale.unlink(missing_ok=True)

    summaries = {t: TaskDemoSummary(task=t, requested=episodes_per_task) for t in task_list}
    queue: deque[tuple[str, int]] = deque()
    next_seed: dict[str, int] = {}
    taken: dict[str, set[int]] = {}
    for task in task_list:
        existing = _existing_seeds(out, task)
        summaries[task].existing = len(existing)
        taken[task] = existing
        next_seed[task] = seed
        for _ in range(max(0, episodes_per_task - len(existing))):
            queue.append((task, _claim_seed(task, next_seed, taken)))
    total = len(queue)
    for s in summaries.values():
        if s.existing:
            logger.info("%s: %d episode(s) already present", s.task, s.existing)
    if total == 0:
        return list(summaries.values())

    workers = min(workers, total)
    t0 = time.perf_counter()
    executor = make_executor(workers, _init_worker, (image_size,), _close_worker)
    inflight: dict[Future, tuple[str, int]] = {}
    try:
        with tqdm(total=total, desc="demos", unit="ep", dynamic_ncols=True) as bar:
            while queue or inflight:
                while queue and len(inflight) < 2 * workers:
                    task, s = queue.popleft()
                    inflight[executor.submit(_demo_job, str(out), task, s, max_steps)] = (task, s)
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in done:
                    inflight.pop(fut)
                    task, s, success, steps = fut.result()
                    summary = summaries[task]
                    if success:
                        summary.written += 1
                        summary.steps.append(steps)
                        bar.update(1)
                        continue
                    summary.failed_seeds.append(s)
                    logger.debug("%s seed %d failed after %d steps", task, s, steps)
                    if len(summary.failed_seeds) <= extra_limit:
                        queue.appendleft((task, _claim_seed(task, next_seed, taken)))
                    else:
                        logger.warning("%s: giving up after %d failed seeds", task, len(summary.failed_seeds))
                bar.set_postfix(failed=sum(len(v.failed_seeds) for v in summaries.values()))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    elapsed = time.perf_counter() - t0
    steps = sum(sum(v.steps) for v in summaries.values())
    logger.info("wrote %d episode(s), %d frames in %.1f s (%.1f frames/s)",
                sum(v.written for v in summaries.values()), steps, elapsed, steps / max(elapsed, 1e-9))
    return list(summaries.values())


def _claim_seed(task: str, next_seed: dict[str, int], taken: dict[str, set[int]]) -> int:
    s = next_seed[task]
    while s in taken[task]:
        s += 1
    taken[task].add(s)
    next_seed[task] = s + 1
    return s
