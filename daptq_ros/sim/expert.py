"""Meta-World's scripted expert as a :class:`~daptq_ros.policy_api.StepPolicy`.

The expert reads the full simulator state (``Observation.state``, the 39-d Meta-World
observation) and is deterministic, so it ignores noise. It generates the demonstrations and is
the evaluator's sanity baseline (MT10 success ~98% within 200 steps).
"""

from __future__ import annotations

import warnings

import numpy as np
from metaworld.policies import ENV_POLICY_MAP

from daptq_ros.policy_api import Observation
from daptq_ros.sim.tasks import check_task, task_for_instruction


class ExpertPolicy:
    """Scripted Meta-World expert; chunk size 1.

    Args:
        task: fix the task up front; when None the task is looked up from the instruction given
            to :meth:`reset` (any canonical instruction or paraphrase of an MT10 task).
    """

    chunk_size: int = 1
    action_dim: int = 4

    def __init__(self, task: str | None = None) -> None:
        self._fixed_task = check_task(task) if task is not None else None
        self.task: str | None = self._fixed_task
        self.instruction: str | None = None
        self._policy = ENV_POLICY_MAP[self.task]() if self.task else None

    def reset(self, instruction: str, seed: int) -> None:
        """Start an episode; resolves the task from ``instruction`` unless fixed at construction.

        Raises:
            ValueError: the instruction names another task than the fixed one, or no MT10 task.
        """
        task = task_for_instruction(instruction)
        if self._fixed_task is not None and task != self._fixed_task:
            raise ValueError(
                f"instruction {instruction!r} belongs to {task}, but this expert is fixed to "
                f"{self._fixed_task}"
            )
        if task != self.task or self._policy is None:
            self._policy = ENV_POLICY_MAP[task]()
            self.task = task
        self.instruction = instruction

    def predict_chunk(self, obs: Observation, noise: np.ndarray | None = None) -> np.ndarray:
        """The expert action for ``obs`` as a (1, 4) float32 chunk, clipped to [-1, 1].

        Raises:
            RuntimeError: called before :meth:`reset`.
            ValueError: ``obs.state`` is missing or not the 39-d Meta-World observation.
        """
        if self._policy is None:
            raise RuntimeError("ExpertPolicy.predict_chunk called before reset(instruction, seed)")
        if obs.state is None:
            raise ValueError("ExpertPolicy needs Observation.state (the 39-d Meta-World observation)")
        state = np.asarray(obs.state, dtype=np.float64).reshape(-1)
        if state.shape != (39,):
            raise ValueError(f"Observation.state must have 39 values, got shape {np.shape(obs.state)}")
        with warnings.catch_warnings():
            # metaworld.policies.move warns on every large gain; the env clips anyway.
            warnings.filterwarnings("ignore", message="Constant", category=UserWarning)
            action = self._policy.get_action(state)
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0).reshape(1, self.action_dim)

    def act(self, obs: Observation) -> np.ndarray:
        """The (4,) action to execute now."""
        return self.predict_chunk(obs)[0]
