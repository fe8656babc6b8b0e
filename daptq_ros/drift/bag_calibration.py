"""Calibration batches from a rosbag (``daptq quantize --calib-bag PATH``).

Frames are subsampled across episodes (episodes visited round robin in a seeded random order,
frames drawn without replacement inside each), each with the instruction in force at its time,
and turned into dicts of tensors matching the Model I/O contract: ``image`` (B, 3, S, S) in
[0, 1] resized like the deployed runtime (:func:`~daptq_ros.runtime.image.resize_rgb`),
``lang_tokens``/``lang_mask`` from the instruction cache, normalized ``proprio``, and a fixed
seeded ``noise`` (B, H, A) per batch for flow heads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from daptq_ros.drift.bag_io import BagError, BagFrames, BagTopics, Frame
from daptq_ros.runtime.image import resize_rgb

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path(__file__).resolve().parents[1] / "assets" / "instructions.safetensors"


def select_frames(episodes: np.ndarray, n_frames: int, seed: int) -> list[int]:
    """Frame indices spread across episodes: round robin over shuffled episodes, random frames within.

    Returns ``min(n_frames, len(episodes))`` distinct indices in pick order.
    """
    rng = np.random.default_rng(seed)
    pools = {int(ep): list(rng.permutation(np.flatnonzero(episodes == ep))) for ep in np.unique(episodes)}
    order = [int(e) for e in rng.permutation(list(pools))]
    picks: list[int] = []
    while len(picks) < min(n_frames, len(episodes)):
        for ep in order:
            if pools[ep] and len(picks) < n_frames:
                picks.append(int(pools[ep].pop()))
    return picks


def _features(cache: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) from an InstructionCache (``get``) or an InstructionTable (``lookup``)."""
    try:
        if hasattr(cache, "lookup"):
            return cache.lookup(text)
        return cache.get(text)
    except KeyError as err:
        raise BagError(f"the bag's instruction {text!r} is not in the instruction cache: {err}") from err


def _load_cache(cache: Any) -> Any:
    if cache is None:
        cache = DEFAULT_CACHE
    if isinstance(cache, (str, Path)):
        from daptq_ros.runtime.instructions import InstructionTable

        if not Path(cache).is_file():
            raise BagError(f"instruction cache {cache} not found")
        return InstructionTable.load(cache)
    return cache


def _norm_arrays(norm: Any) -> tuple[np.ndarray, np.ndarray]:
    """proprio mean/std from NormStats-like objects or a manifest-style mapping."""
    if isinstance(norm, Mapping):
        mean, std = norm["proprio_mean"], norm["proprio_std"]
    else:
        mean, std = norm.proprio_mean, norm.proprio_std
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def calibration_batches_from_bag(
    bag: str | Path,
    topics: BagTopics | None = None,
    n_frames: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    cache: Any = None,
    norm: Any = None,
    image_size: int = 128,
    noise_shape: tuple[int, int] | None = (8, 4),
) -> list[dict[str, Any]]:
    """Calibration batches (list of dicts of torch tensors) from a bag's frames.

    Args:
        bag: rosbag2 directory.
        topics: which topics feed the policy (default :class:`BagTopics`).
        n_frames: frames in total (fewer when the bag has fewer).
        batch_size: frames per batch (the last one may be smaller).
        seed: frame selection and noise seed.
        cache: instruction features: an ``InstructionCache``/``InstructionTable`` or a path to
            ``instructions.safetensors`` (default: the package's MT10 cache).
        norm: the policy's normalization stats (``NormStats`` or a mapping with ``proprio_mean``
            and ``proprio_std``); required.
        image_size: model input side S.
        noise_shape: (H, A) of the flow head's noise; None for regression heads (no ``noise``).

    Raises:
        BagError: unusable bag, instruction missing from the cache, or bad arguments.
    """
    import torch

    if n_frames < 1 or batch_size < 1:
        raise BagError(f"n_frames and batch_size must be >= 1, got {n_frames}, {batch_size}")
    if norm is None:
        raise BagError("calibration from a bag needs the policy's normalization stats (norm)")
    p_mean, p_std = _norm_arrays(norm)
    table = _load_cache(cache)
    frames = BagFrames(bag, topics or BagTopics())
    episodes = frames.episode_index()
    picks = select_frames(episodes, n_frames, seed)
    if len(picks) < n_frames:
        logger.warning(
            "bag %s has %d usable frames; calibrating on all of them (asked %d)", bag, len(picks), n_frames
        )
    by_index: dict[int, Frame] = {f.index: f for f in frames.iter_frames(select=set(picks))}
    chosen = [by_index[i] for i in picks]
    logger.info(
        "calibration: %d frames from %d of %d episodes in %s",
        len(chosen),
        len({f.episode for f in chosen}),
        len(np.unique(episodes)),
        bag,
    )
    rng = np.random.default_rng([seed, 1])
    batches = []
    for start in range(0, len(chosen), batch_size):
        part = chosen[start : start + batch_size]
        feats = [_features(table, f.instruction) for f in part]
        proprio = np.stack([f.proprio for f in part]).astype(np.float32)
        if proprio.shape[1] != p_mean.shape[0]:
            raise BagError(
                f"bag proprio has {proprio.shape[1]} values, the policy's norm stats {p_mean.shape[0]}"
            )
        images = np.stack([resize_rgb(f.image, (image_size, image_size)) for f in part])
        batch = {
            "image": torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0),
            "lang_tokens": torch.from_numpy(np.stack([t for t, _ in feats]).astype(np.float32)),
            "lang_mask": torch.from_numpy(np.stack([m for _, m in feats]).astype(np.float32)),
            "proprio": torch.from_numpy((proprio - p_mean) / p_std),
        }
        if noise_shape is not None:
            noise = rng.standard_normal((len(part), *noise_shape)).astype(np.float32)
            batch["noise"] = torch.from_numpy(noise)
        batches.append(batch)
    return batches


def calibration_batches(
    bag: str | Path,
    policy: Any,
    frames: int = 256,
    seed: int = 0,
    batch_size: int = 32,
    topics: BagTopics | None = None,
    cache: Any = None,
) -> list[dict[str, Any]]:
    """``quantize --calib-bag`` entry point: batches for a loaded checkpoint (``model.io.LoadedPolicy``).

    Image size, chunk size, action dim and head come from ``policy.config``, normalization from
    ``policy.norm``; the instruction cache is ``cache``, else ``instructions.safetensors`` next to
    the checkpoint (``policy.path``, as the demo calibration does), else the package's MT10 cache.
    """
    config = policy.config
    ckpt = getattr(policy, "path", None)
    if cache is None and ckpt is not None and (Path(ckpt).parent / "instructions.safetensors").is_file():
        cache = Path(ckpt).parent / "instructions.safetensors"
    noise = (int(config.chunk_size), int(config.action_dim)) if getattr(config, "uses_noise", True) else None
    return calibration_batches_from_bag(
        bag,
        topics,
        n_frames=frames,
        batch_size=batch_size,
        seed=seed,
        cache=cache,
        norm=policy.norm,
        image_size=int(config.image_size),
        noise_shape=noise,
    )
