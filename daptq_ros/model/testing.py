"""Small synthetic fixtures for tests of anything that consumes the reference VLA.

Everything here is deterministic and needs neither Meta-World nor MiniLM: demo episodes in the
contract's npz format, an instruction cache with pseudo-random features, a tiny model config and
a tiny checkpoint (with ``instructions.safetensors`` beside it).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from daptq_ros.model.config import VLAConfig
from daptq_ros.model.io import NormStats, save_checkpoint
from daptq_ros.model.language import FEATURE_DIM, MAX_TOKENS, InstructionCache, normalize_instruction
from daptq_ros.model.vla import ReferenceVLA

SYNTHETIC_TASKS: dict[str, list[str]] = {
    "reach-v3": ["reach the red goal position", "move the gripper to the red goal"],
    "push-v3": ["push the puck to the goal", "slide the puck over to the goal"],
}


def tiny_config(**overrides: object) -> VLAConfig:
    """A ~30k-parameter config (32 px images, chunk 4) for fast CPU tests."""
    base = dict(
        image_size=32,
        d_model=32,
        heads=2,
        trunk_layers=1,
        mlp_ratio=2,
        readout_tokens=2,
        chunk_size=4,
        head_layers=1,
        head_dim=32,
        flow_steps=2,
    )
    return VLAConfig(**{**base, **overrides})


def synthetic_features(
    text: str,
    max_tokens: int = MAX_TOKENS,
    dim: int = FEATURE_DIM,
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic pseudo-features for ``text``: one valid token per word + 2 (CLS/SEP)."""
    key = normalize_instruction(text)
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    n_valid = min(max_tokens, len(key.split()) + 2)
    mask = np.zeros(max_tokens, np.float32)
    mask[:n_valid] = 1.0
    tokens = rng.standard_normal((max_tokens, dim)).astype(np.float32) * mask[:, None]
    return tokens, mask


def synthetic_cache(tasks: Mapping[str, Sequence[str]] = SYNTHETIC_TASKS) -> InstructionCache:
    """Instruction cache with :func:`synthetic_features` for every instruction of ``tasks``."""
    cache = InstructionCache(tasks=tasks)
    for texts in tasks.values():
        for text in texts:
            cache.add(text, *synthetic_features(text))
    return cache


def write_synthetic_demos(
    root: str | Path,
    tasks: Sequence[str] = tuple(SYNTHETIC_TASKS),
    episodes_per_task: int = 2,
    length: int = 10,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """Write ``root/<task>/<task>_s<seed>.npz`` demo episodes in the contract's format.

    Episode k of task j has ``length + k`` frames; the image brightness encodes the time step and
    the task, and actions are a smooth function of both, so a policy can learn them.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for j, task in enumerate(tasks):
        (root / task).mkdir(parents=True, exist_ok=True)
        instruction = SYNTHETIC_TASKS.get(task, [task.replace("-", " ")])[0]
        for k in range(episodes_per_task):
            t_len = length + k
            phase = np.linspace(0.0, 1.0, t_len, dtype=np.float32)
            image = np.zeros((t_len, image_size, image_size, 3), np.uint8)
            image[..., j % 3] = (phase * 200 + 20).astype(np.uint8)[:, None, None]
            image[:, : image_size // 2, : image_size // 2, :] = 60 * j + 40
            action = np.stack(
                [np.sin(3 * phase + j), np.cos(2 * phase), phase - 0.5, np.where(phase > 0.5, 1.0, -1.0)],
                axis=1,
            ).astype(np.float32)
            proprio = np.concatenate(
                [
                    np.cumsum(action[:, :3] * 0.01, axis=0) + np.array([0.0, 0.6, 0.2]),
                    (action[:, 3:] + 1) / 2,
                ],
                axis=1,
            ).astype(np.float32)
            state = rng.standard_normal((t_len, 39)).astype(np.float32)
            episode_seed = 1000 * j + k
            np.savez_compressed(
                root / task / f"{task}_s{episode_seed}.npz",
                image=image,
                proprio=proprio,
                state=state,
                action=action,
                instruction=np.array(instruction),
                task=np.array(task),
                seed=np.array(episode_seed),
                success=np.array(True),
            )
    return root


def write_tiny_checkpoint(
    directory: str | Path,
    config: VLAConfig | None = None,
    seed: int = 0,
    cache: InstructionCache | None = None,
    nontrivial_head: bool = True,
) -> Path:
    """Randomly initialized tiny checkpoint ``directory/policy.safetensors`` + its instruction cache.

    Args:
        directory: output directory (created).
        config: model config (default :func:`tiny_config`).
        seed: weight seed.
        cache: instruction cache written beside it (default :func:`synthetic_cache`).
        nontrivial_head: perturb the action head, whose adaLN-zero / zero-initialized output
            layers would otherwise make a fresh flow head return its noise unchanged.
    """
    directory = Path(directory)
    config = config or tiny_config()
    torch.manual_seed(seed)
    model = ReferenceVLA(config)
    if nontrivial_head:
        with torch.no_grad():
            for p in model.action_head.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    norm = NormStats(
        np.zeros(config.proprio_dim),
        np.ones(config.proprio_dim) * 0.5,
        np.zeros(config.action_dim),
        np.ones(config.action_dim) * 0.5,
    )
    cache = cache or synthetic_cache()
    cache.save(directory / "instructions.safetensors")
    return save_checkpoint(
        directory / "policy.safetensors", model, norm, {"instructions": cache.instructions}
    )
