"""Listing and validated loading of demonstration episodes.

Layout (see docs/architecture.md, "Demo episodes"): ``DIR/<task>/<task>_s<seed>.npz`` written with
``np.savez_compressed``; keys ``image`` (T,H,W,3) uint8, ``proprio`` (T,4) float32, ``state``
(T,39) float32, ``action`` (T,4) float32, ``instruction`` (str), ``task`` (str), ``seed`` (int),
``success`` (bool). Files are loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

EPISODE_KEYS: tuple[str, ...] = (
    "image", "proprio", "state", "action", "instruction", "task", "seed", "success",
)
_NAME_RE = re.compile(r"^(?P<task>.+)_s(?P<seed>\d+)\.npz$")


class EpisodeFormatError(ValueError):
    """A demonstration file is missing keys or has wrong shapes/dtypes; names file and key."""


def write_npz_atomic(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez_compressed`` to a temporary name, fsync, then rename over ``path``.

    A killed writer therefore never leaves a half-written ``.npz`` behind (only a ``*.tmp<pid>``
    file, which readers ignore).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def episode_path(root: str | Path, task: str, seed: int) -> Path:
    """Where the episode of ``task`` with layout ``seed`` lives under ``root``."""
    return Path(root) / task / f"{task}_s{int(seed)}.npz"


def parse_episode_name(path: str | Path) -> tuple[str, int]:
    """``(task, seed)`` from an episode file name like ``push-v3_s12.npz``.

    Raises:
        ValueError: the name does not follow the ``<task>_s<seed>.npz`` pattern.
    """
    match = _NAME_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not an episode file name (<task>_s<seed>.npz)")
    return match["task"], int(match["seed"])


def list_episodes(root: str | Path, tasks: list[str] | None = None) -> list[Path]:
    """All episode files under ``root``, sorted by task directory then seed.

    Args:
        root: the dataset directory.
        tasks: restrict to these task directories (all when None).

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"episode directory not found: {root}")
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if tasks is not None:
        dirs = [d for d in dirs if d.name in set(tasks)]
    out: list[Path] = []
    for d in dirs:
        files = [p for p in d.glob("*.npz") if _NAME_RE.match(p.name) and p.name.startswith(d.name + "_s")]
        out.extend(sorted(files, key=lambda p: parse_episode_name(p)[1]))
    return out


def _scalar(path: Path, key: str, value: np.ndarray, kind: type) -> Any:
    if value.shape != ():
        raise EpisodeFormatError(f"{path}: key {key!r} must be a scalar, got shape {value.shape}")
    item = value.item()
    if kind is str and not isinstance(item, str):
        raise EpisodeFormatError(f"{path}: key {key!r} must be a string, got {value.dtype}")
    if kind is int and (isinstance(item, bool) or not isinstance(item, int)):
        raise EpisodeFormatError(f"{path}: key {key!r} must be an integer, got {value.dtype}")
    if kind is bool and not isinstance(item, bool):
        raise EpisodeFormatError(f"{path}: key {key!r} must be a bool, got {value.dtype}")
    return item


def _check_array(path: Path, key: str, arr: np.ndarray, dtype: type, tail: tuple[int | None, ...]) -> None:
    if arr.dtype != dtype:
        raise EpisodeFormatError(f"{path}: key {key!r} must be {np.dtype(dtype)}, got {arr.dtype}")
    bad_dims = arr.ndim != 1 + len(tail) or any(
        t is not None and s != t for s, t in zip(arr.shape[1:], tail, strict=True)
    )
    if bad_dims:
        want = "(T, " + ", ".join("?" if t is None else str(t) for t in tail) + ")"
        raise EpisodeFormatError(f"{path}: key {key!r} must have shape {want}, got {arr.shape}")


def load_episode(path: str | Path) -> dict[str, Any]:
    """Load and validate one episode file.

    Returns:
        dict with numpy arrays ``image``, ``proprio``, ``state``, ``action`` and Python scalars
        ``instruction`` (str), ``task`` (str), ``seed`` (int), ``success`` (bool).

    Raises:
        FileNotFoundError: no such file.
        EpisodeFormatError: unreadable file, missing key, wrong dtype/shape, inconsistent T, or
            task/seed contents that contradict a ``<task>_s<seed>.npz`` file name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"episode file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in EPISODE_KEYS if k not in data.files]
            if missing:
                raise EpisodeFormatError(
                    f"{path}: missing key(s) {', '.join(missing)} (has {', '.join(sorted(data.files))})"
                )
            raw = {k: data[k] for k in EPISODE_KEYS}
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        if isinstance(err, EpisodeFormatError):
            raise
        raise EpisodeFormatError(f"{path}: not a readable npz episode ({err})") from err
    _check_array(path, "image", raw["image"], np.uint8, (None, None, 3))
    _check_array(path, "proprio", raw["proprio"], np.float32, (4,))
    _check_array(path, "state", raw["state"], np.float32, (39,))
    _check_array(path, "action", raw["action"], np.float32, (4,))
    lengths = {k: raw[k].shape[0] for k in ("image", "proprio", "state", "action")}
    if len(set(lengths.values())) != 1:
        raise EpisodeFormatError(f"{path}: per-step arrays disagree on the episode length: {lengths}")
    if lengths["action"] == 0:
        raise EpisodeFormatError(f"{path}: empty episode (0 steps)")
    episode: dict[str, Any] = {k: raw[k] for k in ("image", "proprio", "state", "action")}
    episode["instruction"] = _scalar(path, "instruction", raw["instruction"], str)
    episode["task"] = _scalar(path, "task", raw["task"], str)
    episode["seed"] = _scalar(path, "seed", raw["seed"], int)
    episode["success"] = _scalar(path, "success", raw["success"], bool)
    if _NAME_RE.match(path.name):
        name_task, name_seed = parse_episode_name(path)
        if (name_task, name_seed) != (episode["task"], episode["seed"]):
            raise EpisodeFormatError(
                f"{path}: file name says task {name_task!r} seed {name_seed}, contents say task "
                f"{episode['task']!r} seed {episode['seed']}"
            )
    return episode
