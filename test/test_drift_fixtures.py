"""Shared helpers for the drift/bag tests: synthetic episodes, tiny real policies and artifacts.

Imported by test_drift_*.py and test_bag_*.py (pytest puts this directory on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from daptq_ros.drift.bag_io import BagTopics
from daptq_ros.drift.bag_writer import EpisodeData
from daptq_ros.policy_api import Observation

INSTRUCTIONS = ("reach the red goal position", "open the drawer", "press the button from the top")
IMAGE_SIDE = 16
CHUNK = 8
ACTION_DIM = 4


def synthetic_episodes(
    n_episodes: int = 3, steps: int = 20, seed: int = 0, side: int = IMAGE_SIDE
) -> list[EpisodeData]:
    """Episodes with random images, a smooth hand trajectory (small steps) and random actions."""
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(n_episodes):
        start = np.array([0.0, 0.6, 0.2, 1.0]) + rng.normal(0, 0.001, 4)
        steps_xyz = rng.normal(0, 0.002, (steps, 4))
        steps_xyz[:, 3] = 0
        episodes.append(
            EpisodeData(
                image=rng.integers(0, 256, (steps, side, side, 3), dtype=np.uint8),
                proprio=(start + np.cumsum(steps_xyz, 0)).astype(np.float32),
                instruction=INSTRUCTIONS[i % len(INSTRUCTIONS)],
                action=rng.uniform(-1, 1, (steps, ACTION_DIM)).astype(np.float32),
            )
        )
    return episodes


class LinearStepPolicy:
    """A small real StepPolicy in numpy: chunk = tanh(W [image stats, proprio, instruction id] + V noise).

    Used to test the replay logic without ONNX; ``scale`` perturbs the weights.
    """

    def __init__(
        self, seed: int = 0, scale: float = 1.0, chunk_size: int = CHUNK, action_dim: int = ACTION_DIM
    ):
        rng = np.random.default_rng(seed)
        self.chunk_size = chunk_size
        self.action_dim = action_dim
        self.w = rng.normal(0, 0.5, (chunk_size * action_dim, 3 + 4 + 1)) * scale
        self.v = rng.normal(0, 0.3, (chunk_size * action_dim, chunk_size * action_dim))
        self._instr = 0.0
        self._rng = np.random.default_rng(0)

    def reset(self, instruction: str, seed: int) -> None:
        self._instr = (sum(map(ord, instruction)) % 97) / 97.0
        self._rng = np.random.default_rng(seed)

    def predict_chunk(self, obs: Observation, noise: np.ndarray | None = None) -> np.ndarray:
        if noise is None:
            noise = self._rng.standard_normal((self.chunk_size, self.action_dim)).astype(np.float32)
        feats = np.concatenate([obs.image.reshape(-1, 3).mean(0) / 255.0, obs.proprio, [self._instr]])
        out = np.tanh(self.w @ feats + self.v @ noise.reshape(-1))
        return out.reshape(self.chunk_size, self.action_dim).astype(np.float32)

    def act(self, obs: Observation) -> np.ndarray:
        return self.predict_chunk(obs)[0]


def export_tiny_artifact(out_dir: Path, perturb: float = 0.0, seed: int = 0) -> Path:
    """Export a tiny flow-style torch policy (contract I/O, 16 px images) to an ONNX artifact dir.

    ``perturb`` adds Gaussian noise of that std to every weight (a deliberately broken candidate).
    """
    import torch
    from torch import nn

    from daptq_ros.export.onnx_export import export_policy

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 4, stride=4)
            self.lang = nn.Linear(8, 8)
            self.prop = nn.Linear(4, 8)
            self.head = nn.Linear(24 + CHUNK * ACTION_DIM, CHUNK * ACTION_DIM)

        def forward(self, image, lang_tokens, lang_mask, proprio, noise):
            v = self.conv(image).mean(dim=(2, 3))
            lang = self.lang((lang_tokens * lang_mask[..., None]).sum(1) / lang_mask.sum(1, keepdim=True))
            x = torch.cat([v, lang, self.prop(proprio), noise.flatten(1)], 1)
            return torch.tanh(self.head(x)).view(-1, CHUNK, ACTION_DIM)

    torch.manual_seed(seed)
    model = Tiny()
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=gen))
    example = {
        "image": torch.rand(1, 3, IMAGE_SIDE, IMAGE_SIDE),
        "lang_tokens": torch.randn(1, 4, 8),
        "lang_mask": torch.ones(1, 4),
        "proprio": torch.randn(1, 4),
        "noise": torch.randn(1, CHUNK, ACTION_DIM),
    }
    rng = np.random.default_rng(123)
    table = {t: (rng.normal(size=(4, 8)).astype(np.float32), np.ones(4, np.float32)) for t in INSTRUCTIONS}
    norm = {
        "proprio_mean": [0.0, 0.6, 0.2, 1.0],
        "proprio_std": [0.1, 0.1, 0.1, 0.5],
        "action_mean": [0.0] * ACTION_DIM,
        "action_std": [1.0] * ACTION_DIM,
    }
    export_policy(
        model,
        example,
        out_dir,
        norm=norm,
        instructions_cache=table,
        method="perturbed" if perturb else "fp32",
    )
    return out_dir


def topics() -> BagTopics:
    """The default topics (what write_episodes_bag and BagFrames agree on)."""
    return BagTopics()
