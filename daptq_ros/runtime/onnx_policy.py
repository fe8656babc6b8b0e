"""`OnnxStepPolicy`: the StepPolicy over an exported artifact directory, with no torch needed.

Pre-processing (uint8 RGB -> float [0, 1] NCHW at the manifest size, proprio normalization),
instruction features from ``instructions.safetensors``, flow-head noise from a generator seeded
in :meth:`OnnxStepPolicy.reset`, un-normalization and a NaN/Inf check on every chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from daptq_ros.policy_api import Observation
from daptq_ros.runtime.chunking import ChunkExecutor, ChunkingConfig
from daptq_ros.runtime.image import ImageConversionError, resize_rgb
from daptq_ros.runtime.instructions import InstructionTable
from daptq_ros.runtime.manifest import INSTRUCTIONS_NAME
from daptq_ros.runtime.providers import ProviderOptions
from daptq_ros.runtime.session import PolicySession

logger = logging.getLogger(__name__)


class NonFiniteActionError(RuntimeError):
    """The model produced NaN or Inf actions; they must never reach the robot."""


def draw_noise(rng: np.random.Generator, chunk_size: int, action_dim: int) -> np.ndarray:
    """One flow-head noise draw (chunk_size, action_dim), float32.

    Every StepPolicy implementation draws noise this way (float64 standard normal, cast to
    float32), so policies reset with the same seed see identical noise at the same chunk index.
    """
    return rng.standard_normal((chunk_size, action_dim)).astype(np.float32)


class OnnxStepPolicy:
    """StepPolicy backed by ONNX Runtime.

    Args:
        artifact_dir: directory with model.onnx, manifest.json, instructions.safetensors.
        providers: allowed execution providers (default TensorRT > CUDA > CPU).
        chunking: how predicted chunks are executed by :meth:`act`.
        threads: ORT intra-op threads (None = ORT default).
        provider_options: GPU provider options.
        allow_encode: encode instructions missing from the cache with MiniLM when installed.
    """

    def __init__(
        self,
        artifact_dir: str | Path,
        providers: Sequence[str] | None = None,
        chunking: ChunkingConfig | None = None,
        threads: int | None = None,
        provider_options: ProviderOptions | None = None,
        allow_encode: bool = True,
    ) -> None:
        self.session = PolicySession(
            artifact_dir, providers=providers, threads=threads, provider_options=provider_options
        )
        m = self.session.manifest
        self.manifest = m
        self.chunk_size = m.chunk_size
        self.action_dim = m.action_dim
        self.image_size: tuple[int, int] = (int(m.image.size[0]), int(m.image.size[1]))
        self.instructions = InstructionTable.load(Path(artifact_dir) / INSTRUCTIONS_NAME)
        self.allow_encode = allow_encode
        norm = m.normalization
        self._p_mean = np.asarray(norm["proprio_mean"], np.float32)
        self._p_std = np.asarray(norm["proprio_std"], np.float32)
        self._a_mean = np.asarray(norm["action_mean"], np.float32)
        self._a_std = np.asarray(norm["action_std"], np.float32)
        self.has_noise = m.input("noise") is not None
        for name in ("image", "lang_tokens", "lang_mask", "proprio"):
            if m.input(name) is None:
                raise ValueError(
                    f"{artifact_dir}: manifest inputs lack {name!r}; not a daptq policy artifact"
                )
        out = m.outputs[0]
        if tuple(out.shape[1:]) != (self.chunk_size, self.action_dim):
            raise ValueError(
                f"{artifact_dir}: output {out.name!r} shape {list(out.shape)} does not match chunk_size "
                f"{self.chunk_size} x {self.action_dim} actions"
            )
        self.executor = ChunkExecutor(self.chunk_size, chunking or ChunkingConfig())
        self._rng = np.random.default_rng(0)
        self._lang: tuple[np.ndarray, np.ndarray] | None = None
        self.instruction: str | None = None

    @property
    def provider(self) -> str:
        """The execution provider running the graph."""
        return self.session.provider

    # -- StepPolicy -------------------------------------------------------------------------------
    def reset(self, instruction: str, seed: int) -> None:
        """Start an episode: look up the instruction features and seed the noise generator.

        Raises:
            UnknownInstructionError: the instruction is not cached and cannot be encoded.
        """
        self._lang = self.instructions.lookup(instruction, allow_encode=self.allow_encode)
        self.instruction = instruction
        self._rng = np.random.default_rng(seed)
        self.executor.reset()

    def predict_chunk(self, obs: Observation, noise: np.ndarray | None = None) -> np.ndarray:
        """Raw action chunk (chunk_size, action_dim) for ``obs``; see :class:`StepPolicy`."""
        if self._lang is None:
            raise RuntimeError("call reset(instruction, seed) before predicting")
        if noise is None and self.has_noise:
            noise = draw_noise(self._rng, self.chunk_size, self.action_dim)
        return self.predict_chunk_raw(obs.image, self._lang, obs.proprio, noise)

    def act(self, obs: Observation) -> np.ndarray:
        """Raw action (action_dim,) for this control step (re-plans per the chunking config)."""
        return self.executor.step(lambda: self.predict_chunk(obs))

    # -- lower level (the ROS node) -----------------------------------------------------------------
    def set_instruction(self, instruction: str) -> None:
        """Change the instruction mid-episode (keeps the noise generator; clears queued actions)."""
        self._lang = self.instructions.lookup(instruction, allow_encode=self.allow_encode)
        self.instruction = instruction
        self.executor.reset()

    def preprocess(
        self,
        image_rgb: np.ndarray,
        lang: str | tuple[np.ndarray, np.ndarray],
        proprio: np.ndarray,
        noise: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """Graph feeds (batch 1) from raw inputs; resizes the image to the manifest size."""
        image_rgb = np.asarray(image_rgb)
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise ImageConversionError(
                f"image must be uint8 RGB (H, W, 3), got {image_rgb.dtype} {image_rgb.shape}"
            )
        image = resize_rgb(image_rgb, self.image_size)
        tokens, mask = self.instructions.lookup(lang, self.allow_encode) if isinstance(lang, str) else lang
        proprio = np.asarray(proprio, np.float32).reshape(-1)
        if proprio.shape != self._p_mean.shape:
            raise ValueError(f"proprio has {proprio.size} values, the model expects {self._p_mean.size}")
        if not np.all(np.isfinite(proprio)):
            raise ValueError(f"proprio contains NaN/Inf: {proprio.tolist()}")
        feeds = {
            "image": (image.astype(np.float32) * np.float32(1 / 255.0)).transpose(2, 0, 1)[None],
            "lang_tokens": np.asarray(tokens, np.float32)[None],
            "lang_mask": np.asarray(mask, np.float32)[None],
            "proprio": ((proprio - self._p_mean) / self._p_std)[None],
        }
        if self.has_noise:
            if noise is None:
                raise ValueError("this model has a flow head: pass noise (chunk_size, action_dim)")
            noise = np.asarray(noise, np.float32)
            if noise.shape != (self.chunk_size, self.action_dim):
                raise ValueError(
                    f"noise has shape {noise.shape}, expected ({self.chunk_size}, {self.action_dim})"
                )
            feeds["noise"] = noise[None]
        return feeds

    def predict_chunk_raw(
        self,
        image_rgb: np.ndarray,
        lang: str | tuple[np.ndarray, np.ndarray],
        proprio: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """One inference: raw (un-normalized) action chunk (chunk_size, action_dim).

        Args:
            image_rgb: uint8 RGB (H, W, 3), any size (resized to the manifest's).
            lang: an instruction string, or its features (tokens (L, D), mask (L,)).
            proprio: raw proprio (4,).
            noise: flow-head noise (chunk_size, action_dim); required when the graph has a
                ``noise`` input, ignored otherwise.

        Raises:
            NonFiniteActionError: the graph returned NaN/Inf.
        """
        feeds = self.preprocess(image_rgb, lang, proprio, noise)
        actions = self.session.run(feeds)[self.session.output_names[0]][0]
        if not np.all(np.isfinite(actions)):
            bad = np.argwhere(~np.isfinite(actions))
            raise NonFiniteActionError(
                f"model {self.session.model_path} returned {len(bad)} non-finite action value(s), first at "
                f"(step, dim) = {tuple(int(i) for i in bad[0])}"
            )
        return (actions * self._a_std + self._a_mean).astype(np.float32)

    @property
    def last_latency_s(self) -> float:
        """Wall time of the last ORT run (seconds)."""
        return self.session.last_latency_s
