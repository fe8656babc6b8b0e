"""Quantized checkpoint: one safetensors file (docs/architecture.md, "Checkpoints").

Tensors: float tensors under their state-dict names (compensation already folded in) and, per
quantized layer, ``NAME.weight_int`` (int8 storage of b-bit integers), ``NAME.weight_scale``
(float32, (out, n_groups)), ``NAME.weight_zero`` (int8, asymmetric only), ``NAME.input_scale``
(float32 scalar; static int8 symmetric activations, zero point 0). Metadata key ``daptq.quant``
holds JSON ``{"method", "recipe", "avg_bits", "layers", "base", ...}``; ``base`` is the FP
checkpoint metadata, used to rebuild the architecture on load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from daptq_ros.quant.engine import get_module, set_module
from daptq_ros.quant.fakequant import LayerSpec, make_quant_module

logger = logging.getLogger(__name__)

META_KEY = "daptq.quant"
FORMAT = "daptq-quant"
VERSION = 1
ModelFactory = Callable[[dict[str, Any]], nn.Module]


class CheckpointError(ValueError):
    """The file is not a daptq quantized checkpoint or does not match the model."""


@dataclass
class QuantInfo:
    """Metadata of a quantized checkpoint."""

    method: str
    recipe: dict[str, Any]
    avg_bits: float
    layers: dict[str, LayerSpec]
    base: dict[str, Any]
    meta: dict[str, Any]


def save_quantized(
    path: str | Path,
    model: nn.Module,
    result: Any,
    base: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (fake-quant modules) and ``result`` (a QuantResult) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "method": result.method,
        "recipe": result.recipe,
        "avg_bits": result.avg_bits,
        "budget": result.budget,
        "drift_loss": result.drift_loss,
        "size": result.size,
        "layers": {n: s.to_dict() for n, s in result.layers.items()},
        "base": base or {},
        "provenance": provenance or {},
    }
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    logger.info("wrote quantized checkpoint %s (%d tensors)", path, len(tensors))
    return path


def read_quant_meta(path: str | Path) -> dict[str, Any]:
    """The ``daptq.quant`` metadata of a file (CheckpointError if absent)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"quantized checkpoint not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    if raw is None:
        raise CheckpointError(f"{path} has no {META_KEY!r} metadata (not a quantized checkpoint)")
    return json.loads(raw)


def _default_factory(base: dict[str, Any]) -> nn.Module:
    """Rebuild the reference VLA from the embedded FP checkpoint metadata (lazy import)."""
    if base.get("format") != "daptq-vla":
        raise CheckpointError(
            f"base model format {base.get('format')!r} is not the reference VLA; pass model_factory"
        )
    from daptq_ros.config_util import load_config
    from daptq_ros.model.config import VLAConfig
    from daptq_ros.model.vla import ReferenceVLA

    return ReferenceVLA(load_config(VLAConfig, base["config"]))


def load_quantized(
    path: str | Path, model_factory: ModelFactory | None = None
) -> tuple[nn.Module, QuantInfo]:
    """Rebuild the fake-quant model saved by :func:`save_quantized`.

    Args:
        path: the quantized ``.safetensors`` file.
        model_factory: ``base_meta -> float model`` for custom policies; the reference VLA is
            rebuilt from its embedded config without one.
    """
    from safetensors.torch import load_file

    meta = read_quant_meta(path)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: unsupported quantized format {meta.get('format')!r} v{meta.get('version')}"
        )
    base = meta.get("base") or {}
    model = (model_factory or _default_factory)(base)
    layers = {n: LayerSpec.from_dict(d) for n, d in meta["layers"].items()}
    for name, spec in layers.items():
        if spec.is_float:
            continue
        try:
            module = get_module(model, name)
        except KeyError as err:
            raise CheckpointError(f"{path}: quantized layer {name!r} not in the rebuilt model") from err
        set_module(model, name, make_quant_module(module, spec))
    state = load_file(str(path))
    for name, module in model.named_modules():  # CSRC may have given a bias-free producer a bias
        key = f"{name}.bias" if name else "bias"
        if key in state and getattr(module, "bias", False) is None:
            module.bias = nn.Parameter(state[key].clone())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: state mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    info = QuantInfo(meta["method"], meta["recipe"], meta["avg_bits"], layers, base, meta)
    return model, info
