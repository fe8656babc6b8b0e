"""`TorchPolicy`: the reference VLA (full precision or fake-quantized) as a StepPolicy.

Raw observations in, raw actions out: the policy converts the image (uint8 HxWx3 → float
(1,3,S,S) in [0,1], bilinear antialiased resize if needed), normalizes proprio, looks the
instruction up in the instruction cache (encoding it with MiniLM only if it is unknown and the
encoder is installed), runs the model and un-normalizes the predicted chunk. Chunks are executed
by :class:`daptq_ros.runtime.chunking.ChunkExecutor`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daptq_ros.model.config import VLAConfig
from daptq_ros.model.data import to_model_images
from daptq_ros.model.io import (
    CHECKPOINT_KEY,
    QUANT_KEY,
    CheckpointError,
    NormStats,
    load_checkpoint,
    parse_checkpoint_meta,
    read_metadata,
)
from daptq_ros.model.language import InstructionCache, InstructionEncoder, normalize_instruction
from daptq_ros.policy_api import Observation
from daptq_ros.runtime.chunking import ChunkExecutor, ChunkingConfig

logger = logging.getLogger(__name__)

INSTRUCTIONS_FILE = "instructions.safetensors"


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TorchPolicy:
    """StepPolicy around a :class:`~daptq_ros.model.vla.ReferenceVLA`-compatible module.

    Args:
        model: module with the Model I/O forward (``image, lang_tokens, lang_mask, proprio[, noise]``).
        config: its config (image size, chunk size, head type).
        norm: normalization statistics.
        instructions: instruction features (unknown ones are encoded when MiniLM is installed).
        chunking: chunk execution strategy.
        device: torch device the model runs on.
        meta: checkpoint metadata (informational).
        allow_encode: encode unknown instructions with MiniLM when it is importable.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: VLAConfig,
        norm: NormStats,
        instructions: InstructionCache | None = None,
        chunking: ChunkingConfig | None = None,
        device: str | torch.device = "cpu",
        meta: dict[str, Any] | None = None,
        allow_encode: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.config = config
        self.norm = norm
        self.chunk_size = config.chunk_size
        self.instructions = instructions if instructions is not None else InstructionCache()
        self.meta = meta or {}
        self._encoder = InstructionEncoder() if allow_encode and InstructionEncoder.available() else None
        self._executor = ChunkExecutor(config.chunk_size, chunking)
        self._lang: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rng = np.random.default_rng(0)
        self.instruction: str | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        chunking: ChunkingConfig | None = None,
        device: str | torch.device = "cpu",
        instructions: InstructionCache | str | Path | None = None,
        allow_encode: bool = True,
    ) -> TorchPolicy:
        """Load an FP or quantized checkpoint (told apart by metadata).

        Args:
            path: ``.safetensors`` checkpoint.
            chunking: chunk execution strategy.
            device: ``"cpu"``, ``"cuda"``, ``"auto"``...
            instructions: instruction cache or its path; default ``instructions.safetensors``
                next to the checkpoint (if present).
            allow_encode: encode unknown instructions with MiniLM when it is importable.
        """
        path = Path(path)
        meta_all = read_metadata(path)
        if QUANT_KEY in meta_all:
            model, config, norm, meta = _load_quantized(path, meta_all[QUANT_KEY])
        else:
            loaded = load_checkpoint(path)
            model, config, norm, meta = loaded.model, loaded.config, loaded.norm, loaded.meta
        if not isinstance(instructions, InstructionCache):
            cache_path = Path(instructions) if instructions is not None else path.parent / INSTRUCTIONS_FILE
            if cache_path.is_file():
                instructions = InstructionCache.load(cache_path)
            elif instructions is not None:
                raise FileNotFoundError(f"instruction cache not found: {cache_path}")
            else:
                logger.warning(
                    "no %s next to %s: instructions must be encoded with MiniLM", INSTRUCTIONS_FILE, path
                )
                instructions = None
        return cls(
            model,
            config,
            norm,
            instructions=instructions,
            chunking=chunking,
            device=device,
            meta=meta,
            allow_encode=allow_encode,
        )

    def reset(self, instruction: str, seed: int) -> None:
        """Start an episode: look up / encode the instruction, seed the noise generator."""
        tokens, mask = self.instructions.get_or_encode(instruction, self._encoder)
        self._lang = (
            torch.from_numpy(tokens)[None].to(self.device),
            torch.from_numpy(mask)[None].to(self.device),
        )
        self.instruction = normalize_instruction(instruction)
        self._rng = np.random.default_rng(seed)
        self._executor.reset()

    def _inputs(self, obs: Observation) -> dict[str, torch.Tensor]:
        if self._lang is None:
            raise RuntimeError("call reset(instruction, seed) before predicting")
        image = np.asarray(obs.image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"obs.image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
        proprio = np.asarray(obs.proprio, dtype=np.float32).reshape(-1)
        if proprio.shape != (self.config.proprio_dim,):
            raise ValueError(
                f"obs.proprio must have {self.config.proprio_dim} values, got shape {proprio.shape}"
            )
        return {
            "image": to_model_images(
                torch.from_numpy(np.ascontiguousarray(image))[None].to(self.device), self.config.image_size
            ),
            "lang_tokens": self._lang[0],
            "lang_mask": self._lang[1],
            "proprio": torch.from_numpy(self.norm.normalize_proprio(proprio))[None].to(self.device),
        }

    def predict_chunk(self, obs: Observation, noise: np.ndarray | None = None) -> np.ndarray:
        """Raw action chunk (chunk_size, action_dim) for ``obs``; see :class:`StepPolicy`."""
        inputs = self._inputs(obs)
        shape = (self.config.chunk_size, self.config.action_dim)
        if noise is None:
            noise = self._rng.standard_normal(shape).astype(np.float32)
        noise = np.asarray(noise, dtype=np.float32)
        if noise.shape != shape:
            raise ValueError(f"noise must have shape {shape}, got {noise.shape}")
        if self.config.uses_noise:
            inputs["noise"] = torch.from_numpy(noise)[None].to(self.device)
        with torch.inference_mode():
            out = self.model(**inputs)
        return self.norm.unnormalize_actions(out[0].float().cpu().numpy())

    def act(self, obs: Observation) -> np.ndarray:
        """Raw action (action_dim,) for this step (re-plans at chunk boundaries)."""
        return self._executor.step(lambda: self.predict_chunk(obs))


def _load_quantized(
    path: Path, quant_meta: dict[str, Any]
) -> tuple[torch.nn.Module, VLAConfig, NormStats, dict]:
    """Quantized checkpoint → (fake-quant model, config, norm, metadata) via the quant package."""
    try:
        from daptq_ros.quant.checkpoint import load_quantized
    except ImportError as err:
        raise CheckpointError(
            f"{path} is a quantized checkpoint but daptq_ros.quant.checkpoint is unavailable ({err})"
        ) from err
    base = quant_meta.get("base")
    if isinstance(base, dict) and CHECKPOINT_KEY in base:  # the whole FP metadata dict
        base = base[CHECKPOINT_KEY]
    if not isinstance(base, dict):
        raise CheckpointError(
            f"{path}: quantized checkpoint metadata lacks its 'base' FP checkpoint metadata"
        )
    config, norm = parse_checkpoint_meta(base, source=f"{path} (base)")
    model, _info = load_quantized(path)
    return model, config, norm, {**base, "quant": quant_meta}
