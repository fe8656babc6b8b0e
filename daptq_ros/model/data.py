"""Demonstration data for training and calibrating the reference VLA.

Demo files follow the contract ``DIR/<task>/<task>_s<seed>.npz`` with ``image`` (T,S,S,3) uint8,
``proprio`` (T,4), ``action`` (T,4), ``instruction``, ``task``, ``seed``. For frame t the target is
the action chunk ``actions[t:t+H]``, padded past the episode end by repeating the final action,
with a per-step validity mask (padding is excluded from the loss).

:class:`DemoDataset` loads everything into memory once; :meth:`DemoDataset.to_device` turns a
split into :class:`DeviceData` — one uint8 image tensor on the GPU, sampled and augmented there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from daptq_ros.model.config import VLAConfig
from daptq_ros.model.io import LoadedPolicy, NormStats
from daptq_ros.model.language import InstructionCache, UnknownInstructionError, normalize_instruction

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = ("image", "proprio", "action", "instruction", "task")


@dataclass
class Episode:
    """One demonstration episode (raw, un-normalized)."""

    path: Path
    task: str
    seed: int
    instruction: str
    image: np.ndarray  # (T, S, S, 3) uint8
    proprio: np.ndarray  # (T, P) float32
    action: np.ndarray  # (T, A) float32

    def __len__(self) -> int:
        return int(self.action.shape[0])


def list_demo_files(demo_dir: str | Path) -> list[Path]:
    """Sorted ``DIR/<task>/*.npz`` files; raises when there are none."""
    demo_dir = Path(demo_dir)
    if not demo_dir.is_dir():
        raise FileNotFoundError(f"demo directory not found: {demo_dir}")
    files = sorted(demo_dir.glob("*/*.npz"))
    if not files:
        raise FileNotFoundError(f"no demo episodes (<task>/*.npz) under {demo_dir}")
    return files


def load_episode(path: str | Path) -> Episode:
    """Read and validate one demo ``.npz`` (errors name the file and the bad array)."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in _REQUIRED_KEYS if k not in data.files]
        if missing:
            raise ValueError(f"{path}: demo file lacks {missing}")
        image, proprio, action = data["image"], data["proprio"], data["action"]
        ep = Episode(
            path=path,
            task=str(data["task"]),
            seed=int(data["seed"]) if "seed" in data.files else -1,
            instruction=str(data["instruction"]),
            image=image,
            proprio=proprio.astype(np.float32),
            action=action.astype(np.float32),
        )
    t = len(action)
    if image.dtype != np.uint8 or image.ndim != 4 or image.shape[-1] != 3 or image.shape[1] != image.shape[2]:
        raise ValueError(f"{path}: image must be (T,S,S,3) uint8, got {image.shape} {image.dtype}")
    if t == 0 or action.ndim != 2 or proprio.ndim != 2 or len(proprio) != t or len(image) != t:
        raise ValueError(
            f"{path}: lengths disagree or empty: image {image.shape}, proprio {proprio.shape}, "
            f"action {action.shape}"
        )
    return ep


def chunk_targets(actions: np.ndarray, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame chunks (T, H, A) of ``actions`` (T, A), final action repeated, and validity (T, H)."""
    t = len(actions)
    idx = np.arange(t)[:, None] + np.arange(chunk_size)[None]
    valid = (idx < t).astype(np.float32)
    return actions[np.minimum(idx, t - 1)], valid


def to_model_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B,H,W,3) → float (B,3,size,size) in [0,1]; bilinear antialiased resize if needed."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(
            0, 1
        )
    return x


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DrQ random shift: replicate-pad by ``pad`` px, then crop back at a random integer offset.

    Implemented with ``grid_sample`` at exact pixel centres (so pixels are copied, not blurred),
    which runs batched on the GPU.
    """
    if pad <= 0:
        return images
    b, _, h, w = images.shape
    if h != w:
        raise ValueError(f"random_shift expects square images, got {h}x{w}")
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    eps = 1.0 / (h + 2 * pad)
    arange = torch.linspace(-1.0 + eps, 1.0 - eps, h + 2 * pad, device=images.device)[:h]
    base = torch.stack(torch.meshgrid(arange, arange, indexing="xy"), dim=-1)[None]  # (1,h,h,2) x,y
    shift = torch.randint(0, 2 * pad + 1, (b, 1, 1, 2), device=images.device, generator=generator).float()
    grid = base + shift * (2.0 / (h + 2 * pad))
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class DeviceData:
    """One split held as tensors on a device; samples augmented training batches there.

    Attributes:
        images: (N,S,S,3) uint8; proprio: (N,P); actions: (N,H,A); valid: (N,H);
        task: (N,) task index; canon: (N,) index of each frame's own instruction;
        lang_tokens: (K,L,D) / lang_mask: (K,L) instruction table;
        candidates: (n_tasks, C) instruction indices per task (-1 padded), n_candidates: (n_tasks,).
    """

    def __init__(self, arrays: dict[str, np.ndarray], device: torch.device) -> None:
        self.device = device
        for key, value in arrays.items():
            setattr(self, key, torch.from_numpy(np.ascontiguousarray(value)).to(device))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(
        self,
        index: torch.Tensor,
        image_size: int,
        generator: torch.Generator | None = None,
        paraphrase_prob: float = 0.0,
        shift_pad: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Training-ready batch for frame ``index``: paraphrase sampling and random shift optional."""
        instr = self.canon[index]
        if paraphrase_prob > 0:
            task = self.task[index]
            n = self.n_candidates[task]
            pick = (
                (torch.rand(len(index), device=self.device, generator=generator) * n).long().clamp_max(n - 1)
            )
            paraphrase = self.candidates[task, pick]
            use = torch.rand(len(index), device=self.device, generator=generator) < paraphrase_prob
            instr = torch.where(use, paraphrase, instr)
        image = to_model_images(self.images[index], image_size)
        if shift_pad > 0:
            image = random_shift(image, shift_pad, generator)
        return {
            "image": image,
            "lang_tokens": self.lang_tokens[instr],
            "lang_mask": self.lang_mask[instr],
            "proprio": self.proprio[index],
            "actions": self.actions[index],
            "action_valid": self.valid[index],
        }


class DemoDataset:
    """All demo episodes of a directory, split by episode into train / validation.

    Args:
        demo_dir: ``DIR/<task>/*.npz``.
        cache: instruction features; must contain every episode's instruction (and the task
            paraphrases listed in ``cache.tasks``, which training samples from).
        chunk_size: H.
        val_fraction: fraction of each task's episodes held out (at least one when a task has
            two or more episodes and the fraction is > 0).
        seed: split seed.
        norm: normalization stats; computed from the training split when None.
        std_floor: minimum std of the computed stats.
        workers: threads decompressing demo files.
    """

    def __init__(
        self,
        demo_dir: str | Path,
        cache: InstructionCache,
        chunk_size: int = 8,
        val_fraction: float = 0.1,
        seed: int = 0,
        norm: NormStats | None = None,
        std_floor: float = 1e-2,
        workers: int | None = None,
    ) -> None:
        self.demo_dir = Path(demo_dir)
        self.cache = cache
        self.chunk_size = chunk_size
        files = list_demo_files(demo_dir)
        workers = workers or min(16, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            self.episodes: list[Episode] = list(pool.map(load_episode, files))
        shapes = {ep.image.shape[1:] for ep in self.episodes}
        if len(shapes) != 1:
            raise ValueError(f"{demo_dir}: demos mix image shapes {sorted(shapes)}")
        self.train_idx, self.val_idx = self._split(val_fraction, seed)
        self.tasks = sorted({ep.task for ep in self.episodes})
        self._instructions = self._instruction_table()
        if norm is None:
            train = [self.episodes[i] for i in self.train_idx]
            norm = NormStats.from_data(
                np.concatenate([e.proprio for e in train]),
                np.concatenate([e.action for e in train]),
                std_floor=std_floor,
            )
        self.norm = norm
        logger.info(
            "loaded %d episodes (%d frames, %d tasks) from %s: %d train / %d val episodes",
            len(self.episodes),
            self.num_frames(),
            len(self.tasks),
            demo_dir,
            len(self.train_idx),
            len(self.val_idx),
        )

    def num_frames(self, split: str | None = None) -> int:
        """Frames in ``split`` ("train", "val") or in all episodes."""
        idx = range(len(self.episodes)) if split is None else self._indices(split)
        return sum(len(self.episodes[i]) for i in idx)

    @property
    def instructions(self) -> list[str]:
        """All instructions training may present (normalized)."""
        return list(self._instructions)

    def _indices(self, split: str) -> list[int]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train_idx if split == "train" else self.val_idx

    def _split(self, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
        rng = np.random.default_rng(seed)
        by_task: dict[str, list[int]] = {}
        for i, ep in enumerate(self.episodes):
            by_task.setdefault(ep.task, []).append(i)
        train, val = [], []
        for task in sorted(by_task):
            idx = list(rng.permutation(by_task[task]))
            n_val = round(val_fraction * len(idx))
            if val_fraction > 0 and len(idx) >= 2:
                n_val = min(max(n_val, 1), len(idx) - 1)
            val += idx[:n_val]
            train += idx[n_val:]
        return sorted(int(i) for i in train), sorted(int(i) for i in val)

    def _instruction_table(self) -> list[str]:
        texts: list[str] = []
        for ep in self.episodes:
            texts.append(normalize_instruction(ep.instruction))
            texts += self.cache.tasks.get(ep.task, [])
        table = list(dict.fromkeys(texts))
        missing = [t for t in table if t not in self.cache]
        if missing:
            raise UnknownInstructionError(
                f"instruction cache lacks {len(missing)} instruction(s) used by the demos in "
                f"{self.demo_dir}: {missing[:5]}; rebuild it (python -m daptq_ros.model.language --out ...)"
            )
        return table

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """Normalized numpy arrays of ``split`` (see :class:`DeviceData` for the keys)."""
        eps = [self.episodes[i] for i in self._indices(split)]
        if not eps:
            raise ValueError(f"the {split!r} split is empty (episodes: {len(self.episodes)})")
        n = sum(len(e) for e in eps)
        h, a = self.chunk_size, eps[0].action.shape[1]
        out = {
            "images": np.empty((n, *eps[0].image.shape[1:]), np.uint8),
            "proprio": np.empty((n, eps[0].proprio.shape[1]), np.float32),
            "actions": np.empty((n, h, a), np.float32),
            "valid": np.empty((n, h), np.float32),
            "task": np.empty(n, np.int64),
            "canon": np.empty(n, np.int64),
        }
        pos = {t: i for i, t in enumerate(self._instructions)}
        start = 0
        for ep in eps:
            end = start + len(ep)
            chunks, valid = chunk_targets(ep.action, h)
            out["images"][start:end] = ep.image
            out["proprio"][start:end] = self.norm.normalize_proprio(ep.proprio)
            out["actions"][start:end] = self.norm.normalize_actions(chunks)
            out["valid"][start:end] = valid
            out["task"][start:end] = self.tasks.index(ep.task)
            out["canon"][start:end] = pos[normalize_instruction(ep.instruction)]
            start = end
        tokens, mask = self.cache.batch(self._instructions)
        cands = [[pos[t] for t in dict.fromkeys(self._task_texts(task))] for task in self.tasks]
        width = max(len(c) for c in cands)
        out["lang_tokens"], out["lang_mask"] = tokens, mask
        out["candidates"] = np.array([c + [-1] * (width - len(c)) for c in cands], np.int64)
        out["n_candidates"] = np.array([len(c) for c in cands], np.int64)
        return out

    def _task_texts(self, task: str) -> list[str]:
        own = [normalize_instruction(e.instruction) for e in self.episodes if e.task == task]
        return [*own, *self.cache.tasks.get(task, [])]

    def to_device(self, split: str, device: str | torch.device) -> DeviceData:
        """Move ``split`` to ``device`` as one set of tensors."""
        return DeviceData(self.arrays(split), torch.device(device))


def calibration_batches(
    demo_dir: str | Path,
    cache: InstructionCache | LoadedPolicy,
    n_frames: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    norm: NormStats | None = None,
    config: VLAConfig | None = None,
    with_actions: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches for the quantizer, matching the Model I/O contract.

    Frames are drawn uniformly across tasks (round robin), then episodes, then time steps; each
    frame uses its episode's own instruction. Flow models get a fixed, seeded ``noise`` per batch.

    Args:
        demo_dir: ``DIR/<task>/*.npz``.
        cache: instruction features, or a :class:`~daptq_ros.model.io.LoadedPolicy` whose norm
            stats and config are then used (unless given) and whose instruction cache is the
            ``instructions.safetensors`` next to its checkpoint file.
        n_frames: total frames.
        batch_size: frames per batch (the last batch may be smaller).
        seed: frame selection and noise seed.
        norm: the policy's normalization stats (from its checkpoint). When None they are computed
            from these demos, which only matches a policy trained on the same data.
        config: model config (image size, chunk size, action dim, head); defaults to VLAConfig().
        with_actions: also add ``actions``, the demonstrated normalized action chunks (B, H, A)
            (final action repeated past the episode end), for methods scored against demonstrations
            (``PolicyAdapter.targets``; DA-PTQ's paper-faithful layer score).

    Returns:
        list of dicts with ``image``, ``lang_tokens``, ``lang_mask``, ``proprio`` (+ ``noise``,
        + ``actions``).
    """
    if isinstance(cache, LoadedPolicy):
        policy = cache
        norm, config = norm or policy.norm, config or policy.config
        cache_path = policy.path.parent / "instructions.safetensors" if policy.path else None
        if cache_path is None or not cache_path.is_file():
            raise FileNotFoundError(
                f"no instruction cache next to the checkpoint ({cache_path}); pass an InstructionCache"
            )
        cache = InstructionCache.load(cache_path)
    config = config or VLAConfig()
    if n_frames < 1 or batch_size < 1:
        raise ValueError(f"n_frames and batch_size must be >= 1, got {n_frames}, {batch_size}")
    files = list_demo_files(demo_dir)
    by_task: dict[str, list[Path]] = {}
    for f in files:
        by_task.setdefault(f.parent.name, []).append(f)
    rng = np.random.default_rng(seed)
    tasks = [sorted(by_task)[i] for i in rng.permutation(len(by_task))]
    picks = []
    for i in range(n_frames):
        candidates = by_task[tasks[i % len(tasks)]]
        picks.append(candidates[rng.integers(len(candidates))])
    episodes = {p: load_episode(p) for p in sorted(set(picks))}
    if norm is None:
        logger.warning("calibration_batches: no norm stats given; computing them from %s", demo_dir)
        norm = NormStats.from_data(
            np.concatenate([e.proprio for e in episodes.values()]),
            np.concatenate([e.action for e in episodes.values()]),
        )
    frames = [(episodes[p], int(rng.integers(len(episodes[p])))) for p in picks]
    batches = []
    for start in range(0, n_frames, batch_size):
        chunk = frames[start : start + batch_size]
        tokens, mask = cache.batch([ep.instruction for ep, _ in chunk])
        images = torch.from_numpy(np.stack([ep.image[t] for ep, t in chunk]))
        batch = {
            "image": to_model_images(images, config.image_size),
            "lang_tokens": torch.from_numpy(tokens),
            "lang_mask": torch.from_numpy(mask),
            "proprio": torch.from_numpy(norm.normalize_proprio(np.stack([ep.proprio[t] for ep, t in chunk]))),
        }
        if config.uses_noise:
            noise = rng.standard_normal((len(chunk), config.chunk_size, config.action_dim)).astype(np.float32)
            batch["noise"] = torch.from_numpy(noise)
        if with_actions:
            chunks = np.stack([chunk_targets(ep.action, config.chunk_size)[0][t] for ep, t in chunk])
            batch["actions"] = torch.from_numpy(norm.normalize_actions(chunks))
        batches.append(batch)
    return batches


def split_summary(dataset: DemoDataset) -> dict[str, object]:
    """Episode / frame counts and held-out seeds per split (for logs and checkpoint metadata)."""

    def seeds(idx: Sequence[int]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i in idx:
            out.setdefault(dataset.episodes[i].task, []).append(dataset.episodes[i].seed)
        return {k: sorted(v) for k, v in out.items()}

    return {
        "train_episodes": len(dataset.train_idx),
        "val_episodes": len(dataset.val_idx),
        "train_frames": dataset.num_frames("train"),
        "val_frames": dataset.num_frames("val") if dataset.val_idx else 0,
        "val_seeds": seeds(dataset.val_idx),
    }
