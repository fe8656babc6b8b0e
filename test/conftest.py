"""Shared test setup: single-threaded torch, headless rendering, ROS isolated to localhost."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a core dependency
    pass


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
