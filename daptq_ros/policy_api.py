"""The policy contract shared by the simulator, the evaluator, the ROS node and the drift tools.

Anything that can drive the robot one control step at a time implements :class:`StepPolicy`:
the torch reference/quantized policy (`daptq_ros.model.torch_policy.TorchPolicy`) and the ONNX
artifact (`daptq_ros.runtime.onnx_policy.OnnxStepPolicy`). Observations and actions are raw
(un-normalized) numpy arrays; normalization is each policy's own business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

# Meta-World action: [dx, dy, dz, gripper], each in [-1, 1]; proprio: [hand x, y, z, gripper].
ACTION_NAMES: tuple[str, ...] = ("dx", "dy", "dz", "gripper")
PROPRIO_NAMES: tuple[str, ...] = ("hand_x", "hand_y", "hand_z", "gripper_opening")


def normalize_instruction(text: str) -> str:
    """Canonical instruction key shared by training, caches and runtimes.

    Lower case, single spaces, no trailing ``.``/``!``: "Open the drawer." == "open  the drawer".
    """
    if not isinstance(text, str):
        raise TypeError(f"instruction must be a string, got {type(text).__name__}")
    return " ".join(text.lower().split()).rstrip(" .!")


@dataclass(frozen=True)
class Observation:
    """One control-step observation, as the robot (or the simulator) sees it.

    Attributes:
        image: main camera, uint8 RGB, shape (H, W, 3), upright.
        proprio: float32 (4,) = hand xyz (m) + gripper opening.
        wrist_image: optional wrist camera, uint8 RGB (H, W, 3).
        state: optional full simulator state (Meta-World's 39-d observation). Learned policies
            never read it; scripted experts and metrics may.
    """

    image: np.ndarray
    proprio: np.ndarray
    wrist_image: np.ndarray | None = None
    state: np.ndarray | None = None


@runtime_checkable
class StepPolicy(Protocol):
    """A closed-loop policy: predicts action chunks, executes them step by step.

    Noise for generative heads is drawn from a generator seeded in :meth:`reset`, so two policies
    reset with the same seed see identical noise at the same chunk index (paired comparisons).
    """

    chunk_size: int

    def reset(self, instruction: str, seed: int) -> None:
        """Start an episode: set the instruction (encoded once) and seed the noise generator."""

    def predict_chunk(self, obs: Observation, noise: np.ndarray | None = None) -> np.ndarray:
        """Predict a raw action chunk (chunk_size, action_dim) for ``obs`` without executing it.

        ``noise`` (chunk_size, action_dim), standard normal, is the flow/diffusion head's initial
        noise; when None one draw is taken from the generator seeded in :meth:`reset`.
        Deterministic policies ignore it.
        """

    def act(self, obs: Observation) -> np.ndarray:
        """Return the raw action (action_dim,) to execute now (re-plans at chunk boundaries)."""
