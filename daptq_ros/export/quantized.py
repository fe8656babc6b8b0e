"""Read a quantized checkpoint (``daptq_ros.quant.checkpoint.save_quantized``) for QDQ export.

The file holds float tensors under their state-dict names (compensation folded in) and, per
quantized layer, ``NAME.weight_int`` / ``NAME.weight_scale`` / optional ``NAME.weight_zero`` /
optional ``NAME.input_scale``; metadata ``daptq.quant`` = JSON with per-layer specs and the base
FP checkpoint metadata (docs/architecture.md, "Checkpoints"). This module reads it directly with
``safetensors.numpy`` (no dependency on the fake-quant modules) and builds:

- the :class:`LayerQuant` plan, and
- the *float twin*: the reference model with every quantized weight replaced by its dequantized
  value, whose FP32 export is the skeleton :func:`export_qdq` rewrites.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daptq_ros.export.onnx_export import ExportError
from daptq_ros.export.qdq import LayerQuant

logger = logging.getLogger(__name__)

QUANT_KEY = "daptq.quant"
QUANT_SUFFIXES = (".weight_int", ".weight_scale", ".weight_zero", ".input_scale")


@dataclass
class QuantizedCheckpoint:
    """Contents of a quantized checkpoint relevant to export.

    Attributes:
        plan: quantized layers (integers, scales, activation scales).
        float_tensors: every other tensor by state-dict name.
        meta: the ``daptq.quant`` metadata (method, recipe, avg_bits, layers, base).
        token_act_layers: layers with dynamic per-token activations (not static-QDQ exportable).
    """

    plan: list[LayerQuant]
    float_tensors: dict[str, np.ndarray]
    meta: dict[str, Any]
    token_act_layers: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.meta.get("method", "quantized"))

    @property
    def avg_bits(self) -> float | None:
        value = self.meta.get("avg_bits")
        return float(value) if value is not None else None

    @property
    def budget(self) -> float | None:
        recipe = self.meta.get("recipe") or {}
        value = recipe.get("budget", recipe.get("avg_bits")) if isinstance(recipe, dict) else None
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def base_meta(self) -> dict[str, Any]:
        return dict(self.meta.get("base") or {})


def read_quantized(path: str | Path) -> QuantizedCheckpoint:
    """Parse a quantized checkpoint into a plan plus float tensors.

    Raises:
        FileNotFoundError: no such file.
        ExportError: not safetensors, no ``daptq.quant`` metadata, or inconsistent layer tensors.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantized checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            raw_meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ExportError(f"{path} is not a readable safetensors file: {err}") from err
    if QUANT_KEY not in raw_meta:
        hint = " (it is an FP checkpoint: use --checkpoint)" if "daptq.checkpoint" in raw_meta else ""
        raise ExportError(f"{path} is not a daptq quantized checkpoint: metadata {QUANT_KEY!r} missing{hint}")
    try:
        meta = json.loads(raw_meta[QUANT_KEY])
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: metadata {QUANT_KEY!r} is not JSON: {err}") from err
    layers = meta.get("layers")
    if not isinstance(layers, dict):
        raise ExportError(f"{path}: {QUANT_KEY}.layers must map layer names to specs")
    plan, token_layers = [], []
    for name, spec in layers.items():
        w_bits = int(spec.get("w_bits", 16))
        if w_bits >= 16:
            continue  # kept float
        try:
            w_int, scale = tensors[f"{name}.weight_int"], tensors[f"{name}.weight_scale"]
        except KeyError as err:
            raise ExportError(f"{path}: layer {name!r} ({w_bits} bits) lacks tensor {err.args[0]!r}") from err
        a_bits = int(spec.get("a_bits", 16))
        granularity = spec.get("act_granularity", "tensor")
        input_scale = None
        if a_bits == 8 and granularity == "token":
            token_layers.append(name)
        elif a_bits == 8:
            if f"{name}.input_scale" not in tensors:
                raise ExportError(f"{path}: layer {name!r} has a_bits 8 but no {name}.input_scale tensor")
            input_scale = float(np.asarray(tensors[f"{name}.input_scale"]).reshape(-1)[0])
        try:
            plan.append(
                LayerQuant(
                    name=name,
                    w_int=w_int,
                    scale=scale,
                    w_bits=w_bits,
                    group_size=int(spec.get("group_size", 0)),
                    zero=tensors.get(f"{name}.weight_zero"),
                    input_scale=input_scale,
                    channel_bits=spec.get("channel_bits"),
                )
            )
        except ValueError as err:
            raise ExportError(f"{path}: {err}") from err
    quant_names = {f"{lq.name}{s}" for lq in plan for s in QUANT_SUFFIXES}
    floats = {k: v for k, v in tensors.items() if k not in quant_names}
    return QuantizedCheckpoint(plan=plan, float_tensors=floats, meta=meta, token_act_layers=token_layers)


def float_twin(ckpt: QuantizedCheckpoint) -> Any:
    """The reference VLA carrying the checkpoint's float tensors and dequantized weights.

    Raises:
        ExportError: the base metadata or the tensors do not fit a ``ReferenceVLA``.
    """
    import torch

    from daptq_ros.model.io import CheckpointError, parse_checkpoint_meta
    from daptq_ros.model.vla import ReferenceVLA

    try:
        config, _ = parse_checkpoint_meta(ckpt.base_meta, source="daptq.quant.base")
    except CheckpointError as err:
        raise ExportError(f"quantized checkpoint has unusable base metadata: {err}") from err
    model = ReferenceVLA(config)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ckpt.float_tensors.items()}
    for lq in ckpt.plan:
        state[f"{lq.name}.weight"] = torch.from_numpy(lq.dequantize())
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"quantized checkpoint does not fit its ReferenceVLA config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state)
    return model.eval()


def input_independent_layers(model: Any, names: Sequence[str], seeds: tuple[int, int] = (0, 1)) -> set[str]:
    """The layers of ``names`` whose input is the same for two different example inputs.

    Such a layer (the flow head's time MLP: its input is the fixed integration time of each step)
    is computed once by the exporter's constant folding, from the twin's dequantized weights, and
    has no MatMul/Gemm in the graph. ``model`` must provide ``example_inputs(batch, seed)``.
    """
    import torch

    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: seen[n].append(args[0].detach().clone())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            for seed in seeds:
                model(**model.example_inputs(1, seed=seed))
    finally:
        for h in hooks:
            h.remove()
    constant = set()
    for name, inputs in seen.items():
        per_seed = len(inputs) // len(seeds)
        if per_seed and all(
            torch.equal(inputs[i], inputs[i + per_seed]) for i in range(per_seed)
        ):
            constant.add(name)
    return constant
