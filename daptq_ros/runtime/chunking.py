"""Action-chunk execution: turn predicted chunks (H, A) into one action per control step.

Two strategies, as used by chunked VLA policies (ACT, π0, CogACT):
- ``execute``: run the first ``execute_steps`` actions of each chunk, then re-plan.
- ``ensemble``: re-plan every step and average all chunk predictions that cover the current
  step with exponential weights ``exp(-decay * age)`` (ACT's temporal ensembling; age 0 = newest).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChunkingConfig:
    """How predicted chunks are executed.

    Args:
        mode: ``"execute"`` or ``"ensemble"``.
        execute_steps: actions executed per chunk in ``execute`` mode (1..H).
        ensemble_decay: weight decay per step of age in ``ensemble`` mode (>= 0).
    """

    mode: str = "execute"
    execute_steps: int = 4
    ensemble_decay: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in ("execute", "ensemble"):
            raise ValueError(f"mode must be 'execute' or 'ensemble', got {self.mode!r}")
        if self.execute_steps < 1:
            raise ValueError(f"execute_steps must be >= 1, got {self.execute_steps}")
        if self.ensemble_decay < 0:
            raise ValueError(f"ensemble_decay must be >= 0, got {self.ensemble_decay}")


class ChunkExecutor:
    """Stateful per-episode chunk execution around a chunk predictor.

    Call :meth:`reset` at episode start and :meth:`step` once per control step with a callable
    that predicts a fresh chunk when asked (so prediction happens only when needed).
    """

    def __init__(self, chunk_size: int, config: ChunkingConfig | None = None) -> None:
        self.chunk_size = int(chunk_size)
        self.config = config or ChunkingConfig()
        if self.config.mode == "execute" and self.config.execute_steps > self.chunk_size:
            raise ValueError(
                f"execute_steps={self.config.execute_steps} exceeds the chunk size {self.chunk_size}"
            )
        self.reset()

    def reset(self) -> None:
        """Forget queued actions and past chunks (call at episode start or instruction change)."""
        self._queue: deque[np.ndarray] = deque()
        self._history: deque[tuple[int, np.ndarray]] = deque()
        self._t = 0
        self.replans = 0

    @property
    def at_chunk_boundary(self) -> bool:
        """True when the next :meth:`step` will request a new chunk."""
        return self.config.mode == "ensemble" or not self._queue

    def step(self, predict_chunk: Callable[[], np.ndarray]) -> np.ndarray:
        """Return the action for the current step, calling ``predict_chunk()`` when a re-plan is due."""
        if self.config.mode == "execute":
            if not self._queue:
                chunk = self._check(predict_chunk())
                self.replans += 1
                self._queue.extend(chunk[: self.config.execute_steps])
            action = self._queue.popleft()
        else:
            chunk = self._check(predict_chunk())
            self.replans += 1
            self._history.append((self._t, chunk))
            while self._history and self._history[0][0] <= self._t - self.chunk_size:
                self._history.popleft()
            actions, weights = [], []
            for start, past in self._history:
                age = self._t - start
                actions.append(past[age])
                weights.append(np.exp(-self.config.ensemble_decay * age))
            w = np.asarray(weights)[:, None]
            action = (np.stack(actions) * w).sum(0) / w.sum()
        self._t += 1
        return np.asarray(action, dtype=np.float32)

    def _check(self, chunk: np.ndarray) -> np.ndarray:
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or chunk.shape[0] != self.chunk_size:
            raise ValueError(f"predicted chunk has shape {chunk.shape}, expected ({self.chunk_size}, A)")
        return chunk
