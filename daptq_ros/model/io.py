"""Checkpoint IO and normalization statistics of the reference VLA.

A checkpoint is one ``.safetensors`` file: the model's state dict (float32) plus the metadata key
``daptq.checkpoint`` holding JSON ``{"format": "daptq-vla", "version": 1, "config": {...},
"norm": {...}, "instructions": [...], "train": {...}}`` (see ``docs/architecture.md``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daptq_ros.config_util import ConfigError, from_dict, to_dict
from daptq_ros.model.config import VLAConfig
from daptq_ros.model.vla import ReferenceVLA

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "daptq.checkpoint"
QUANT_KEY = "daptq.quant"
CHECKPOINT_FORMAT = "daptq-vla"
CHECKPOINT_VERSION = 1
_NORM_FIELDS = ("proprio_mean", "proprio_std", "action_mean", "action_std")


class CheckpointError(ValueError):
    """A checkpoint file is missing pieces, foreign, or does not fit its own config."""


@dataclass
class NormStats:
    """Proprio / action normalization: ``normalized = (raw - mean) / std``.

    Attributes:
        proprio_mean, proprio_std: (proprio_dim,) float32.
        action_mean, action_std: (action_dim,) float32.
    """

    proprio_mean: np.ndarray
    proprio_std: np.ndarray
    action_mean: np.ndarray
    action_std: np.ndarray

    def __post_init__(self) -> None:
        for name in _NORM_FIELDS:
            value = np.asarray(getattr(self, name), dtype=np.float32)
            if value.ndim != 1 or not np.all(np.isfinite(value)):
                raise ValueError(f"norm.{name} must be a finite 1-D array, got {value!r}")
            if name.endswith("_std") and np.any(value <= 0):
                raise ValueError(f"norm.{name} must be > 0, got {value.tolist()}")
            setattr(self, name, value)
        for kind in ("proprio", "action"):
            mean, std = getattr(self, f"{kind}_mean"), getattr(self, f"{kind}_std")
            if mean.shape != std.shape:
                raise ValueError(f"norm.{kind}_mean {mean.shape} and norm.{kind}_std {std.shape} differ")

    @classmethod
    def from_data(cls, proprio: np.ndarray, actions: np.ndarray, std_floor: float = 1e-2) -> NormStats:
        """Statistics of raw ``proprio`` (N, P) and ``actions`` (N, A), std floored at ``std_floor``."""
        proprio = np.asarray(proprio, dtype=np.float64)
        actions = np.asarray(actions, dtype=np.float64)
        if proprio.ndim != 2 or actions.ndim != 2 or len(proprio) == 0 or len(actions) == 0:
            raise ValueError(
                f"need non-empty (N, D) arrays, got proprio {proprio.shape}, actions {actions.shape}"
            )
        return cls(
            proprio.mean(0),
            np.maximum(proprio.std(0), std_floor),
            actions.mean(0),
            np.maximum(actions.std(0), std_floor),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NormStats:
        """Inverse of :meth:`to_dict`; names the missing key."""
        missing = [k for k in _NORM_FIELDS if k not in data]
        if missing:
            raise ValueError(f"norm stats lack {missing}")
        return cls(*(np.asarray(data[k], dtype=np.float32) for k in _NORM_FIELDS))

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready form (the ``norm`` entry of checkpoint metadata and manifests)."""
        return {k: [float(v) for v in getattr(self, k)] for k in _NORM_FIELDS}

    def normalize_proprio(self, proprio: np.ndarray) -> np.ndarray:
        """Raw proprio (..., P) → normalized float32."""
        return ((np.asarray(proprio, dtype=np.float32) - self.proprio_mean) / self.proprio_std).astype(
            np.float32
        )

    def normalize_actions(self, actions: np.ndarray) -> np.ndarray:
        """Raw actions (..., A) → normalized float32."""
        return ((np.asarray(actions, dtype=np.float32) - self.action_mean) / self.action_std).astype(
            np.float32
        )

    def unnormalize_actions(self, actions: np.ndarray) -> np.ndarray:
        """Normalized actions (..., A) → raw float32."""
        return (np.asarray(actions, dtype=np.float32) * self.action_std + self.action_mean).astype(np.float32)


@dataclass
class LoadedPolicy:
    """A loaded checkpoint: the model (eval mode), its config, norm stats, metadata and file path."""

    model: ReferenceVLA
    config: VLAConfig
    norm: NormStats
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def instructions(self) -> list[str]:
        """Instructions the policy was trained on (may be empty)."""
        return list(self.meta.get("instructions", []))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All ``daptq.*`` metadata entries of a safetensors file, JSON-decoded.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a safetensors file, or metadata that is not JSON.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as err:  # safetensors raises SafetensorError / OSError variants
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("daptq."):
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON: {err}") from err
    return out


def parse_checkpoint_meta(meta: Mapping[str, Any], source: str = "checkpoint") -> tuple[VLAConfig, NormStats]:
    """Validate the ``daptq.checkpoint`` JSON; return its config and norm stats.

    Also used for the ``base`` entry of quantized checkpoints.
    """
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source}: format is {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{source}: checkpoint version {meta.get('version')!r} is not supported "
            f"(expected {CHECKPOINT_VERSION})"
        )
    for key in ("config", "norm"):
        if not isinstance(meta.get(key), Mapping):
            raise CheckpointError(f"{source}: metadata lacks the {key!r} mapping")
    try:
        config = from_dict(VLAConfig, dict(meta["config"]), prefix="config.")
    except ConfigError as err:
        raise CheckpointError(f"{source}: invalid model config: {err}") from err
    try:
        norm = NormStats.from_dict(meta["norm"])
    except ValueError as err:
        raise CheckpointError(f"{source}: invalid norm stats: {err}") from err
    if norm.proprio_mean.shape != (config.proprio_dim,) or norm.action_mean.shape != (config.action_dim,):
        raise CheckpointError(
            f"{source}: norm stats sizes (proprio {norm.proprio_mean.shape[0]}, action "
            f"{norm.action_mean.shape[0]}) do not match the config "
            f"({config.proprio_dim}, {config.action_dim})"
        )
    return config, norm


def checkpoint_metadata(
    config: VLAConfig, norm: NormStats, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``daptq.checkpoint`` JSON object for ``config``/``norm`` plus ``extra`` entries."""
    reserved = {"format", "version", "config", "norm"}
    clash = reserved & set(extra or {})
    if clash:
        raise ValueError(f"extra metadata may not override {sorted(clash)}")
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": to_dict(config),
        "norm": norm.to_dict(),
        **dict(extra or {}),
    }


def save_checkpoint(
    path: str | Path, model: ReferenceVLA, norm: NormStats, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` (float32 state dict) + metadata to ``path`` (.safetensors).

    Args:
        path: output file; parent directories are created.
        model: the policy; its ``config`` goes into the metadata.
        norm: normalization statistics.
        extra: more metadata entries, e.g. ``{"instructions": [...], "train": {...}}``.
    """
    from safetensors.torch import save_file

    if not isinstance(model, ReferenceVLA):
        raise TypeError(f"save_checkpoint expects a ReferenceVLA, got {type(model).__name__}")
    meta = checkpoint_metadata(model.config, norm, extra)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={CHECKPOINT_KEY: json.dumps(meta)})
    logger.info("saved checkpoint %s (%d tensors)", path, len(tensors))
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedPolicy:
    """Load a full-precision checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not safetensors, not a daptq checkpoint (or a quantized one), or weights
            that do not fit the stored config.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta_all = read_metadata(path)
    if CHECKPOINT_KEY not in meta_all:
        hint = (
            (
                " (it is a quantized checkpoint: use daptq_ros.quant.checkpoint.load_quantized or "
                "TorchPolicy.from_checkpoint)"
            )
            if QUANT_KEY in meta_all
            else ""
        )
        raise CheckpointError(
            f"{path} is not a daptq checkpoint: metadata key {CHECKPOINT_KEY!r} missing{hint}"
        )
    meta = meta_all[CHECKPOINT_KEY]
    config, norm = parse_checkpoint_meta(meta, source=str(path))
    model = ReferenceVLA(config)
    state = load_file(str(path), device="cpu")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the stored config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if bad:
        raise CheckpointError(f"{path}: tensor shapes do not match the stored config: {bad[:5]}")
    model.load_state_dict(state)
    model.to(device).eval()
    return LoadedPolicy(model=model, config=config, norm=norm, meta=meta, path=path)
