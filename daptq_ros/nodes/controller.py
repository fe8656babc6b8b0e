"""ROS-free core of ``policy_node``: instruction handling, chunk execution and the safety filter.

The node feeds it observations and publishes what it returns; everything that decides *what*
is sent to the robot lives here, so it is testable without DDS:

- instructions take effect at a chunk boundary and are encoded once (``policy.reset``);
- each step asks :class:`~daptq_ros.runtime.chunking.ChunkExecutor` for the action to execute;
- a non-finite action (or a model that raises on one) is never sent: the step reports a fault and
  the executor is reset so the bad chunk is discarded;
- finite actions pass the :class:`SafetyFilter` (scale/offset, per-DoF limits, per-step delta).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daptq_ros.policy_api import Observation
from daptq_ros.runtime.chunking import ChunkExecutor, ChunkingConfig

logger = logging.getLogger(__name__)


class SafetyFilter:
    """Scale, offset, clamp to per-DoF limits and rate-limit one action.

    Args:
        scale / offset: per-DoF affine map applied to the raw action.
        low / high: per-DoF limits of the mapped action.
        max_delta: per-DoF maximum change from the previous command (0 = unlimited).
    """

    def __init__(self, scale: Sequence[float], offset: Sequence[float], low: Sequence[float],
                 high: Sequence[float], max_delta: Sequence[float]) -> None:
        self.scale = np.asarray(scale, dtype=np.float64)
        self.offset = np.asarray(offset, dtype=np.float64)
        self.low = np.asarray(low, dtype=np.float64)
        self.high = np.asarray(high, dtype=np.float64)
        self.max_delta = np.asarray(max_delta, dtype=np.float64)
        shapes = {a.shape for a in (self.scale, self.offset, self.low, self.high, self.max_delta)}
        if len(shapes) != 1:
            raise ValueError(f"per-DoF safety parameters have different lengths: {sorted(shapes)}")
        self.dim = int(self.scale.shape[0])
        self.previous: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the previous command (rate limiting restarts from the next action)."""
        self.previous = None

    def zero(self) -> np.ndarray:
        """The zero action mapped through offset and limits (what ``fault_action: zero`` sends)."""
        return np.clip(self.offset, self.low, self.high).astype(np.float32)

    def apply(self, raw: np.ndarray) -> tuple[np.ndarray, bool]:
        """Return ``(command, clamped)``; ``raw`` must be finite with ``dim`` values."""
        raw = np.asarray(raw, dtype=np.float64).reshape(-1)
        if raw.shape != (self.dim,):
            raise ValueError(f"action has {raw.shape[0]} values, the safety filter expects {self.dim}")
        cmd = raw * self.scale + self.offset
        out = np.clip(cmd, self.low, self.high)
        if self.previous is not None:
            limited = self.max_delta > 0
            lo = np.where(limited, self.previous - self.max_delta, -np.inf)
            hi = np.where(limited, self.previous + self.max_delta, np.inf)
            out = np.clip(out, lo, hi)
        clamped = bool(np.any(np.abs(out - cmd) > 1e-9))
        self.previous = out
        return out.astype(np.float32), clamped


class LatencyWindow:
    """Sliding window of durations (seconds) with percentiles in milliseconds."""

    def __init__(self, size: int = 512) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._values.append(float(seconds))

    def percentile_ms(self, q: float) -> float:
        """``q``-th percentile in ms (NaN when empty)."""
        if not self._values:
            return float("nan")
        return float(np.percentile(np.fromiter(self._values, float), q) * 1e3)

    def __len__(self) -> int:
        return len(self._values)


@dataclass
class Counters:
    """Event counters reported on /diagnostics (monotonic over the node's life)."""

    commands: int = 0
    predictions: int = 0
    dropped_frames: int = 0
    overruns: int = 0
    clamps: int = 0
    stale_events: int = 0
    nonfinite_events: int = 0
    bad_images: int = 0
    bad_states: int = 0
    bad_instructions: int = 0
    unknown_instructions: int = 0
    inference_errors: int = 0
    fault_commands: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class StepOutcome:
    """Result of one control step.

    ``status`` is ``"ok"`` (``command`` is safe to send), ``"no_instruction"`` (nothing to do
    yet), ``"nonfinite"`` or ``"error"`` (a fault: send the configured fault action).
    """

    status: str
    command: np.ndarray | None = None
    raw: np.ndarray | None = None
    chunk: np.ndarray | None = None
    clamped: bool = False
    inference_s: float = 0.0
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class PolicyController:
    """Turns observations into safe commands with a StepPolicy-like ``policy``.

    Args:
        policy: object with ``reset(instruction, seed)``, ``predict_chunk(obs)`` and ``chunk_size``.
        chunking: chunk execution config.
        safety: the safety filter for this policy's action dimension.
        seed: noise seed of the first instruction (incremented for each later one).
        default_instruction: instruction used until :meth:`set_instruction` is called ('' = none).
        counters: shared counter object (the node's diagnostics read it).
    """

    def __init__(self, policy: Any, chunking: ChunkingConfig, safety: SafetyFilter, seed: int = 0,
                 default_instruction: str = "", counters: Counters | None = None) -> None:
        self.policy = policy
        self.executor = ChunkExecutor(int(policy.chunk_size), chunking)
        self.safety = safety
        self.counters = counters or Counters()
        self._seed = int(seed)
        self._pending: str | None = default_instruction or None
        self.active_instruction: str | None = None
        self.inference = LatencyWindow()

    def set_instruction(self, text: str) -> None:
        """Queue ``text``; it takes effect at the next chunk boundary (also when unchanged: a
        repeated instruction restarts the task, e.g. at a new episode)."""
        self._pending = text

    @property
    def pending_instruction(self) -> str | None:
        return self._pending

    def _maybe_switch(self) -> str | None:
        """Apply a pending instruction at a chunk boundary; returns an error text on failure."""
        if self._pending is None:
            return None
        if self.active_instruction is not None and not self.executor.at_chunk_boundary:
            return None
        text, self._pending = self._pending, None
        try:
            self.policy.reset(text, self._seed)
        except Exception as err:  # UnknownInstructionError and friends: keep the old instruction
            self.counters.unknown_instructions += 1
            logger.error("instruction rejected by the policy: %r (%s)", text[:80], err)
            return f"instruction rejected: {err}"
        self._seed += 1
        self.executor.reset()
        self.safety.reset()
        self.active_instruction = text
        logger.info("instruction active: %r", text)
        return None

    def step(self, obs: Observation) -> StepOutcome:
        """Run one control step on ``obs`` (raw image + proprio)."""
        error = self._maybe_switch()
        if self.active_instruction is None:
            return StepOutcome("no_instruction", detail=error or "no instruction yet")
        chunk_box: list[np.ndarray] = []

        def predict() -> np.ndarray:
            t0 = time.perf_counter()
            chunk = np.asarray(self.policy.predict_chunk(obs), dtype=np.float32)
            self.inference.add(time.perf_counter() - t0)
            self.counters.predictions += 1
            chunk_box.append(chunk)
            return chunk

        t0 = time.perf_counter()
        try:
            action = self.executor.step(predict)
        except Exception as err:
            # NonFiniteActionError from the runtime counts as non-finite, anything else as error.
            nonfinite = "finite" in type(err).__name__.lower() or "finite" in str(err).lower()
            self.executor.reset()
            if nonfinite:
                self.counters.nonfinite_events += 1
                return StepOutcome("nonfinite", detail=str(err), inference_s=time.perf_counter() - t0)
            self.counters.inference_errors += 1
            logger.error("inference failed: %s: %s", type(err).__name__, err)
            return StepOutcome("error", detail=f"{type(err).__name__}: {err}",
                               inference_s=time.perf_counter() - t0)
        chunk = chunk_box[0] if chunk_box else None
        if not np.all(np.isfinite(action)) or (chunk is not None and not np.all(np.isfinite(chunk))):
            self.counters.nonfinite_events += 1
            self.executor.reset()
            return StepOutcome("nonfinite", chunk=chunk, detail="non-finite action from the model",
                               inference_s=time.perf_counter() - t0)
        command, clamped = self.safety.apply(action)
        if clamped:
            self.counters.clamps += 1
        return StepOutcome("ok", command=command, raw=action, chunk=chunk, clamped=clamped,
                           inference_s=time.perf_counter() - t0)
